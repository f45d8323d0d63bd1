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
    assert set(table["family"]) <= {"features", "prompts", "weights", "pairs"}


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


# -- the rooms and their imports (ARCHITECTURE.md) -------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """workbench module -> the workbench modules it imports, read statically (ast) from every file.

    Every import counts: at module level, inside functions (lazy imports still run, and a lazy
    circle is a circle the first time both functions run) and under ``TYPE_CHECKING`` (type
    checkers follow it). ``from .pkg import name`` counts as an import of ``pkg.name`` when that is
    a module, else of ``pkg``. The implicit import of a module's parent package is not counted:
    a package's ``__init__`` that gathers its own parts is not a circle.
    """
    files = {_module_name(p): p for p in (ROOT / "workbench").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = (".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                        if node.level else node.module or "")
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {t for t in found if t in files and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_lazy_circle_and_a_long_one():
    assert import_cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()   # the parser sees lazy, relative and `from . import x` imports
    assert "workbench.protocols" in graph["workbench.experiment"]           # inside a function
    assert "workbench.sweep.cell" in graph["workbench.sweep.driver"]        # from . import cell as _cell
    assert "workbench.record" in graph["workbench.protocols"]


def test_no_import_circle_within_workbench():
    cycles = import_cycles(import_graph())
    assert not cycles, (f"import circle(s) within workbench/: {cycles}. Move what both sides need into a module "
                        "below both (as record.py is for experiment and protocols), see ARCHITECTURE.md.")


def rooms() -> dict[str, tuple[int, str]]:
    """The rooms table of ARCHITECTURE.md: module pattern -> (rank, room)."""
    table = (ROOT / "ARCHITECTURE.md").read_text().split("## Rooms", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            for pattern in re.findall(r"`([^`]+)`", cells[2]):
                out[pattern] = (int(cells[0]), cells[1])
    return out


def room_of(module: str, table: dict) -> list[tuple[int, str]]:
    rel = module.removeprefix("workbench").removeprefix(".").replace(".", "/") or "__init__"
    return [room for pattern, room in table.items()
            if (pattern.endswith("/") and (rel + "/").startswith(pattern)) or rel == pattern]


def test_every_module_has_one_room_and_imports_only_its_own_or_lower_rooms():
    table = rooms()
    assert len({room for room in table.values()}) >= 6, table
    graph = import_graph()
    homeless = sorted(m for m in graph if len(room_of(m, table)) != 1)
    assert not homeless, (f"ARCHITECTURE.md's rooms table gives no room (or several) to {homeless}: add each to "
                          "one row of the table")
    upward = [f"{m} ({room_of(m, table)[0][1]}) imports {t} ({room_of(t, table)[0][1]})"
              for m in sorted(graph) for t in sorted(graph[m]) if room_of(t, table)[0][0] > room_of(m, table)[0][0]]
    assert not upward, "imports from a higher room (see ARCHITECTURE.md):\n" + "\n".join(upward)


def test_readme_layout_points_to_the_architecture():
    readme = (ROOT / "README.md").read_text()
    assert "ARCHITECTURE.md" in readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
