"""The tutorial notebooks: committed stripped, thin, parameterised, and safe against misspelt parameters."""
import ast
import json
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

import workbench as wb
from workbench.errors import ConfigError
from workbench.notebook import check_parameters, declared_parameters

NOTEBOOKS = sorted((wb.repo_root() / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_thin_and_parameterised(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert first_code is tagged[0], "the parameters cell must be the first code cell"
    for name, info in declared_parameters(path).items():
        assert info["help"], f"parameter {name} needs a '# help' comment"
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        tree = ast.parse(src)
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.For, ast.While)) for n in ast.walk(tree)), \
            "notebook cells only call workbench: move loops/functions into the package"
        if cell is not tagged[0]:  # the parameters cell is declarations only; other cells stay short
            assert len(src.splitlines()) <= 12


def test_notebooks_are_committed_stripped_by_nbstripout():
    """The .ipynb files are the one source (edited in JupyterLab); nbstripout keeps them output-free."""
    proc = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *map(str, NOTEBOOKS)],
                          capture_output=True, text=True, cwd=wb.repo_root())
    assert proc.returncode == 0, f"run `nbstripout notebooks/*.ipynb` before committing: {proc.stdout}{proc.stderr}"


def test_check_parameters_rejects_unknown_names_types_and_values():
    defaults = {k: v["default"] for k, v in declared_parameters("00_quickstart.ipynb").items()}
    assert check_parameters(dict(defaults), "00_quickstart.ipynb") == defaults
    with pytest.raises(ConfigError, match="unknown parameter 'shot'.*Did you mean 'shots'"):
        check_parameters(dict(defaults, shot=4), "00_quickstart.ipynb")
    with pytest.raises(ConfigError, match="'shots' should be list"):
        check_parameters(dict(defaults, shots={"k": 4}), "00_quickstart.ipynb")  # (a plain 4 reads as [4])
    with pytest.raises(ConfigError, match="unknown method 'tip'"):
        check_parameters(dict(defaults, methods=["tip"]), "00_quickstart.ipynb")
    with pytest.raises(ConfigError, match="no dataset named 'eurosatt'"):
        check_parameters(dict(defaults, dataset="eurosatt"), "00_quickstart.ipynb")


def test_list_parameters_accept_papermills_plain_forms_and_say_how_to_quote():
    defaults = {k: v["default"] for k, v in declared_parameters("00_quickstart.ipynb").items()}
    values = check_parameters(dict(defaults, seeds=1, shots="1,4", methods="zero_shot,gda"), "00_quickstart.ipynb")
    assert values["seeds"] == [1] and values["shots"] == [1, 4] and values["methods"] == ["zero_shot", "gda"]
    assert check_parameters(dict(defaults, methods="gda", shots="[2, 8]"), "00_quickstart.ipynb")["shots"] == [2, 8]
    with pytest.raises(ConfigError, match="should be list\\[int\\].*got 'a,b'.*-p shots '\\[1, 4, 16\\]'.*-y \"shots: "):
        check_parameters(dict(defaults, shots="a,b"), "00_quickstart.ipynb")
    with pytest.raises(ConfigError, match="should be list\\[int\\].*got 1.5"):
        check_parameters(dict(defaults, shots=1.5), "00_quickstart.ipynb")
    with pytest.raises(ConfigError, match="unknown method 'tip'"):
        check_parameters(dict(defaults, methods="zero_shot,tip"), "00_quickstart.ipynb")


def test_domains_notebook_declares_every_dataset_yaml_key():
    """papermill warns "Passed unknown parameter" for any -f key the parameters cell does not declare."""
    from workbench.domains import TOP_KEYS

    assert set(TOP_KEYS) <= set(declared_parameters("05_domains.ipynb"))


def test_data_options_fit_the_kind_of_data(tmp_path):
    from workbench.notebook import data_options

    names = {"a": "class a"}
    csv = tmp_path / "labels.csv"
    csv.write_text("file,diagnosis\n")
    assert data_options(str(csv), names, "file", "diagnosis") == {"class_names": names, "path_column": "file",
                                                                  "label_column": "diagnosis"}
    assert data_options("data/whu_rs19_mini", names) == {"class_names": names}
    assert data_options("data/pneumoniamnist_mini/pneumoniamnist_mini.npz", {}) == {}
    with pytest.warns(UserWarning, match="class_names is ignored"):
        assert data_options("pneumoniamnist_mini", names) == {}
    assert data_options("domains/medical/pneumoniamnist_mini.yaml", {}) == {}
    defaults = {k: v["default"] for k, v in declared_parameters("07_bring_your_own_data.ipynb").items()}
    with pytest.raises(ConfigError, match="parameter 'data_path': 'no/such/folder' is neither"):
        check_parameters(dict(defaults, data_path="no/such/folder"), "07_bring_your_own_data.ipynb")


def _papermill(tmp_path, *params):
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(wb.repo_root() / "notebooks" / "00_quickstart.ipynb"), str(out),
           "--cwd", str(tmp_path), "-p", "output_dir", str(tmp_path / "results"), *params]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600), out


def test_papermill_misspelt_parameter_fails_in_the_first_cell(tmp_path):
    proc, out = _papermill(tmp_path, "-p", "shot", "4")
    assert proc.returncode != 0
    assert "unknown parameter 'shot'" in proc.stdout + proc.stderr
    executed = json.loads(out.read_text())
    ran = [c for c in executed["cells"] if c["cell_type"] == "code" and c.get("execution_count")]
    assert len(ran) == 3  # parameters, injected parameters, the check: nothing after it ran


def test_papermill_wrong_value_ends_with_the_notebooks_error_and_how_to_quote(tmp_path):
    proc, _ = _papermill(tmp_path, "-p", "shots", "one,two")
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("ConfigError: 00_quickstart.ipynb: parameter 'shots' should be list[int]")
    assert "-p shots '[1, 4, 16]'" in last and "-y" in last


def test_bring_your_own_data_takes_an_npz_and_chooses_on_validation(tmp_path):
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(wb.repo_root() / "notebooks" / "07_bring_your_own_data.ipynb"),
           str(out), "--cwd", str(tmp_path), "-p", "output_dir", str(tmp_path / "results"),
           "-p", "data_path", "data/pneumoniamnist_mini/pneumoniamnist_mini.npz", "-y", "class_names: {}",
           "-p", "methods", "zero_shot,linear_probe", "-p", "shots", "2", "-p", "seeds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "results" / "results.csv")
    assert set(table["dataset"]) == {"pneumoniamnist_mini"} and len(table) >= 2
    executed = nbformat.read(out, as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "chosen on validation, test scored once" in printed


def test_papermill_runs_with_other_parameters_from_another_folder(tmp_path):
    proc, _ = _papermill(tmp_path, "-p", "dataset", "pneumoniamnist_mini", "-p", "shots", "[1, 2]",
                         "-p", "seeds", "[1]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "results" / "results.csv")
    assert sorted(set(table["shots"])) == [1, 2] and set(table["dataset"]) == {"pneumoniamnist_mini"}
    assert len(table) == 6   # 3 default methods x 2 shots x 1 seed


def test_training_free_notebook_records_the_selection_protocol(tmp_path):
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(wb.repo_root() / "notebooks" / "02_training_free.ipynb"), str(out),
           "--cwd", str(tmp_path), "-p", "output_dir", str(tmp_path / "results"), "-p", "shots", "[2]",
           "-p", "seeds", "[1]", "-p", "selection", "full_val", "-p", "methods", '["zero_shot", "gda", "tip_adapter"]']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    choices = wb.report.fit_choices(tmp_path / "results")
    assert set(choices["method"]) == {"zero_shot", "gda", "tip_adapter"}
    assert set(choices.dropna(subset=["selection"])["selection"]) == {"full_val"}
    assert (choices[choices.method == "gda"]["selection_images"] == 40).all()  # the whole val split: 20 per class


def test_domains_notebook_takes_a_dataset_yaml_with_f(tmp_path):
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(wb.repo_root() / "notebooks" / "05_domains.ipynb"), str(out),
           "--cwd", str(tmp_path), "-f", str(wb.repo_root() / "domains" / "agriculture" / "leaf_disease_synthetic.yaml"),
           "-p", "output_dir", str(tmp_path / "results"), "-p", "shots", "2", "-p", "seeds", "1",
           "-p", "methods", "zero_shot,gda"]  # papermill's plain forms: an int and a comma-separated string
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown parameter" not in proc.stderr.lower(), proc.stderr  # every YAML key is a declared parameter
    table = pd.read_csv(tmp_path / "results" / "leaf_disease_synthetic" / "results.csv")
    assert set(table["domain"]) == {"agriculture"} and set(table["method"]) == {"zero_shot", "gda"}
    bad = subprocess.run(cmd + ["-p", "domian", "medical"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown parameter 'domian'" in bad.stdout + bad.stderr


def test_domains_notebook_takes_a_dataset_yaml_path_as_one_string(tmp_path):
    """The safe way (issue 20): the YAML's path is one string parameter; the workbench reads the file."""
    out = tmp_path / "out.ipynb"
    yaml_path = wb.repo_root() / "domains" / "agriculture" / "leaf_disease_synthetic.yaml"
    cmd = [sys.executable, "-m", "papermill", str(wb.repo_root() / "notebooks" / "05_domains.ipynb"), str(out),
           "--cwd", str(tmp_path), "-p", "dataset_yaml", str(yaml_path), "-p", "output_dir", str(tmp_path / "results"),
           "-p", "shots", "1", "-p", "seeds", "1", "-p", "methods", "zero_shot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "results" / "leaf_disease_synthetic" / "results.csv")
    assert set(table["domain"]) == {"agriculture"} and set(table["method"]) == {"zero_shot"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_documents_every_parameter(path):
    proc = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    text = proc.stdout + proc.stderr
    # papermill prints this (and drops the parameter) when a help comment confuses its parser
    assert "Unable to parse" not in text and "unknown parameter" not in text.lower(), text
    import re

    listed = set(re.findall(r"^  (\w+): ", proc.stdout, re.M))  # each documented parameter starts its own line
    for name, info in declared_parameters(path).items():
        assert name in listed, f"{path.name}: papermill --help-notebook does not list {name!r}:\n{proc.stdout}"
        assert info["help"].split()[0] in proc.stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_fits_the_hooks_25_line_limit(path):
    """The before-stop hook flags a code cell over 25 lines (the parameters cell included)."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert len("".join(cell["source"]).splitlines()) <= 25, f"{path.name} cell {i}"


def test_a_notebook_annotation_is_parsed_never_executed(tmp_path):
    from workbench.notebook import _type_ok

    marker = tmp_path / "ran"
    assert _type_ok([1, 2], "list[int]") and not _type_ok(["a"], "list[int]")
    assert _type_ok(0.5, "Union[float, str]") and _type_ok("val", "float | str") and not _type_ok([1], "float | str")
    assert _type_ok(None, "Optional[int]") and _type_ok({"a": 1}, "dict")
    # a crafted annotation in someone else's notebook is not run: no type check, and no side effect
    assert _type_ok(1, f"__import__('pathlib').Path({str(marker)!r}).touch()")
    assert not marker.exists()
