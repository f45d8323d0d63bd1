"""The layout rules that keep the house readable as methods move in (issue: a house for thirty methods)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import workbench as wb
from workbench.errors import ConfigError
from workbench.methods.registry import METHODS, register

ROOT = wb.repo_root()
METHOD_FILES = sorted((ROOT / "workbench" / "methods").glob("*/*.py"))

# Attributes that belong to a tower's inside: a method that names them is doing surgery itself
# instead of composing workbench.towers.
TOWER_INTERNALS = {"token_embedding", "positional_embedding", "ln_final", "text_projection", "attn_mask",
                   "in_proj_weight", "resblocks", "class_embedding", "conv1", "ln_pre", "ln_post"}


def test_every_method_is_listed_with_family_training_reference_and_cost():
    table = wb.available_methods(details=True)
    assert list(table.index) == wb.available_methods()
    assert set(table.columns) == {"family", "trains", "reference", "cost", "tasks", "unlabeled"}
    assert not table.isna().any().any() and (table != "").all().all()
    assert set(table["family"]) <= {"features", "prompts", "weights"}


@pytest.mark.parametrize("entry", METHODS, ids=lambda e: e.name)
def test_each_method_lives_in_its_family_folder(entry):
    assert entry.module.split(".")[0] == entry.family
    cls = wb.methods.method_class(entry.name)
    assert cls.name == entry.name and cls.__module__ == f"workbench.methods.{entry.module}"


def test_importing_workbench_loads_no_method_module():
    code = ("import sys, workbench as wb; "
            "loaded = [m for m in sys.modules if m.startswith('workbench.methods.') and m.count('.') > 2]; "
            "print(loaded); wb.get_method('gda'); "
            "print('workbench.methods.features.gda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first == "[]", f"import workbench imported method modules: {first}"
    assert second == "True"  # registered without the user importing its file


def test_a_users_own_method_registers_with_the_decorator_alone():
    @register("my_test_method")
    class Mine(wb.methods.Method):
        """My own method."""

    try:
        assert "my_test_method" in wb.available_methods()
        assert wb.available_methods(details=True).loc["my_test_method", "family"] == "user"
        assert isinstance(wb.get_method("my_test_method"), Mine)
    finally:  # keep the registry as the other tests expect it
        from workbench.methods import registry
        registry._CLASSES.pop("my_test_method")
        registry._ENTRIES.pop("my_test_method")
    with pytest.raises(ConfigError, match="unknown method 'my_test_method'"):
        wb.get_method("my_test_method")


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_method_files_compose_towers_instead_of_reaching_inside_them(path):
    tree = ast.parse(path.read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & TOWER_INTERNALS
    assert not used, f"{path.name} reaches into tower internals {sorted(used)}: add a function to workbench/towers/"


def test_readme_layout_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not re.match(r"^[\w.]+/?$", m.group(2)):
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2).rstrip("/")]
        named.add("/".join(stack))
    for rel in named:
        assert (ROOT / rel).exists(), f"README layout names {rel}, which does not exist"
    package = ROOT / "workbench"
    actual = {f"workbench/{p.relative_to(package)}".removesuffix(".py") for p in package.iterdir()
              if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    actual |= {f"workbench/{p.relative_to(package)}".removesuffix(".py") for sub in ("towers", "methods")
               for p in (package / sub).iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    listed = {n.removesuffix(".py") for n in named}
    missing = sorted(actual - listed)
    assert not missing, f"README layout does not mention {missing}"


def test_no_notebook_generator_is_left():
    assert not list(ROOT.glob("tools/*notebook*")) and not list(ROOT.glob("tools/nbtools*"))
