"""Sweeps: the grid runs, resumes after a kill with no duplicate or lost row, repeats its numbers, records failures."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

import workbench as wb
from workbench.data.sampling import sample_few_shot
from workbench.errors import ConfigError
from workbench.sweep import SweepSpec, cells, sweep

GRID = {"datasets": ["pneumoniamnist_mini", "whu_rs19_mini"], "backbones": ["workbench-tiny"],
        "methods": ["zero_shot", "linear_probe", "tip_adapter", "gda"], "shots": [1, 2], "seeds": [1, 2]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_ref")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whu_rs19_mini: fewer images than asked for the K-shot val set
        summary = sweep({**GRID, "output_dir": str(out)}, show_progress=False)
    return summary


def test_grid_runs_once_with_one_encoding_pass(reference):
    assert (reference.done, reference.skipped, reference.failed) == (32, 0, 0)
    table = reference.table
    assert len(table) == 32 and table["cell_id"].is_unique
    assert set(table["method"]) == set(GRID["methods"]) and set(table["shots"]) == {1, 2}
    # the images the cells need through the eval transform once (the pools): the K-shot support and
    # validation images of every (K, seed) plus test -- not every image of every split (260 + 190) ...
    needed = 0
    for name in GRID["datasets"]:
        dataset = wb.load_dataset(name)
        ids = {s.id for s in dataset.split("test")}
        for k in GRID["shots"]:
            for seed in GRID["seeds"]:
                split = sample_few_shot(dataset, k, seed)
                ids |= set(split.train_ids) | set(split.val_ids)
        needed += len(ids)
    assert reference.pool_encoded == needed < 260 + 190
    # ... and inside the cells only the support sets' augmented views (Tip-Adapter and GDA share them)
    views = sum(10 * k * c for c in (2, 19) for k in (1, 2) for _ in (1, 2))
    assert reference.cell_encoded == views


def test_rerun_skips_everything(reference):
    again = sweep({**GRID, "output_dir": str(reference.output_dir)}, show_progress=False)
    assert (again.done, again.skipped, again.pool_encoded) == (0, 32, 0)
    assert len(again.table) == 32


def test_killed_sweep_resumes_with_the_same_numbers(reference, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**GRID, "output_dir": str(tmp_path / "out")}))
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "sweep", str(spec)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "out" / "results.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        if results.exists() and len(pd.read_csv(results)) >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(pd.read_csv(results))
    assert 6 <= partial < 32, "the kill should land midway"
    resumed = sweep(str(spec), show_progress=False)
    assert resumed.skipped == partial and resumed.done == 32 - partial
    table = resumed.table
    assert len(table) == 32 and table["cell_id"].is_unique
    ref = reference.table.set_index("cell_id")
    got = table.set_index("cell_id").loc[ref.index]
    for col in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert (got[col] == ref[col]).all(), col


def test_failed_cell_is_recorded_and_the_others_finish(tmp_path, quiet):
    spec = {"datasets": ["whu_rs19_mini", "pneumoniamnist_mini"], "methods": [
        "zero_shot", {"name": "gda", "params": {"selection": "full_val"}, "label": "gda_full_val"}],
        "shots": [1], "seeds": [1], "output_dir": str(tmp_path)}
    summary = sweep(spec, show_progress=False)
    assert (summary.done, summary.failed) == (3, 1)  # whu_rs19_mini has no val split for full_val
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert failures.iloc[0]["dataset"] == "whu_rs19_mini" and "no 'val' split" in failures.iloc[0]["error"]
    assert set(summary.table["method_label"]) == {"zero_shot", "gda_full_val"}


def test_local_process_pool_gives_the_same_rows(reference, tmp_path):
    grid = {**GRID, "datasets": ["pneumoniamnist_mini"], "output_dir": str(tmp_path), "workers": 2}
    summary = sweep(grid, show_progress=False)
    assert summary.done == 16
    ref = reference.table.set_index("cell_id")
    got = summary.table.set_index("cell_id")
    assert (got["accuracy"] == ref.loc[got.index, "accuracy"]).all()


def test_dask_local_cluster_gives_the_same_rows(reference, tmp_path):
    pytest.importorskip("dask.distributed")
    grid = {**GRID, "datasets": ["pneumoniamnist_mini"], "methods": ["zero_shot", "gda"], "output_dir": str(tmp_path),
            "workers": 2, "engine": "dask"}
    summary = sweep(grid, show_progress=False)
    assert summary.done == 8
    ref = reference.table.set_index("cell_id")
    got = summary.table.set_index("cell_id")
    assert (got["accuracy"] == ref.loc[got.index, "accuracy"]).all()


def test_notebook_runner_saves_each_run(tmp_path):
    spec = {"datasets": ["pneumoniamnist_mini"], "methods": ["linear_probe"], "shots": [2], "seeds": [1],
            "output_dir": str(tmp_path), "runner": "notebook", "notebook": "00_quickstart.ipynb"}
    summary = sweep(spec, show_progress=False)
    assert summary.done == 1, summary.errors
    cell_id = summary.table["cell_id"].iloc[0]
    assert (tmp_path / "notebook_runs" / cell_id / "00_quickstart.ipynb").is_file()
    assert summary.table["method"].iloc[0] == "linear_probe"


def test_spec_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GRID, "seed": [1]}))
    with pytest.raises(ConfigError, match="unknown key 'seed'.*Did you mean 'seeds'"):
        SweepSpec.from_yaml(bad)
    with pytest.raises(ConfigError, match="unknown method 'gdaa'"):
        SweepSpec(**{**GRID, "methods": ["gdaa"]})
    with pytest.raises(ConfigError, match="unknown parameter 'alpa'"):
        SweepSpec(**{**GRID, "methods": [{"name": "gda", "params": {"alpa": 1}}]})
    with pytest.raises(ConfigError, match="no dataset named 'eurosatt'"):
        SweepSpec(**{**GRID, "datasets": ["eurosatt"]})
    ids = [c["cell_id"] for c in cells(SweepSpec(**GRID))]
    assert len(set(ids)) == 32 and ids == [c["cell_id"] for c in cells(SweepSpec(**GRID))]


def test_report_writes_tables_and_figures(reference, tmp_path):
    from workbench.cli import main

    assert main(["report", str(reference.output_dir / "results.csv"), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "README.md").read_text()
    assert "Mean ± std" in text and "Ranking" in text and "ECE" in text
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "reliability.png").is_file()
    ranking = wb.report.ranking(reference.table)
    assert list(ranking.columns) == ["method", "mean_rank", "mean_metric", "wins", "settings"]
    assert ranking["mean_rank"].is_monotonic_increasing
    run_id = reference.table["run_id"].iloc[0]
    recall = wb.report.per_class_recall(reference.output_dir, run_id)
    assert len(recall) in (2, 19)
    record = json.loads((reference.output_dir / "runs" / run_id / "provenance.json").read_text())
    assert sum(b["count"] for b in record["metrics"]["calibration"]) == record["row"]["n_test"]


# -- names and notebooks that would reach outside the sweep (issue 20) --------------------------------

SMALL = {"datasets": ["pneumoniamnist_mini"], "methods": ["zero_shot"], "shots": [1], "seeds": [1]}


def test_a_notebook_outside_notebooks_runs_only_with_the_users_opt_in(tmp_path):
    from workbench.sweep.spec import notebook_path

    nb = {**SMALL, "runner": "notebook", "output_dir": str(tmp_path / "out")}
    assert notebook_path("00_quickstart.ipynb") == wb.repo_root().resolve() / "notebooks" / "00_quickstart.ipynb"
    SweepSpec(**nb, notebook="00_quickstart.ipynb")   # in notebooks/: fine
    outside = tmp_path / "evil.ipynb"
    outside.write_text("{}")
    for name in ("../README.md", str(outside), "../../../../../../tmp/x.ipynb"):
        with pytest.raises(ConfigError, match=r"is outside notebooks/.*allow_notebook_outside=True"):
            SweepSpec(**nb, notebook=name)
    assert SweepSpec(**nb, notebook=str(outside), allow_notebook_outside=True).notebook == str(outside)
    # a spec file cannot opt itself in ...
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**nb, "notebook": str(outside), "allow_notebook_outside": True}))
    with pytest.raises(ConfigError, match="'allow_notebook_outside' cannot be set in a spec file"):
        SweepSpec.from_yaml(spec)
    # ... the user running it can (max_cells=0: checked and set up, nothing run)
    spec.write_text(yaml.safe_dump({**nb, "notebook": str(outside)}))
    with pytest.raises(ConfigError, match="is outside notebooks/"):
        sweep(spec, max_cells=0, show_progress=False)
    summary = sweep(spec, max_cells=0, show_progress=False, allow_notebook_outside=True)
    assert summary.done == 0 and summary.failed == 0


def test_names_that_would_move_a_file_outside_output_dir_are_refused(tmp_path, monkeypatch):
    source = yaml.safe_load((wb.repo_root() / "domains/medical/pneumoniamnist_mini.yaml").read_text())
    bad = tmp_path / "escape.yaml"
    bad.write_text(yaml.safe_dump({**source, "name": "../../../escape"}))
    with pytest.raises(ConfigError, match=r"datasets\[0\] .*escape.yaml.*: the YAML's 'name' '\.\./\.\./\.\./escape' "
                                          r"is not a usable name.*e\.g\. to 'escape'"):
        SweepSpec(**{**SMALL, "datasets": [str(bad)]})
    with pytest.raises(ConfigError, match=r"method 'zero_shot': 'label' '\.\./x' is not a usable name"):
        SweepSpec(**{**SMALL, "methods": [{"name": "zero_shot", "label": "../x"}]})
    from workbench.sweep.spec import check_name

    assert check_name("pneumoniamnist_mini", "name") == "pneumoniamnist_mini"
    for name in ("..", ".", "a\\b", "a\x00b", "", None, "x" * 201):
        with pytest.raises(ConfigError, match="is not a usable name"):
            check_name(name, "name")
    # a name that only shows up when the data loads (a Hub set, a folder): the cell fails, nothing is written
    import dataclasses

    from workbench.sweep import cell as sweep_cell

    real = sweep_cell._dataset
    monkeypatch.setattr(sweep_cell, "_dataset", lambda name: dataclasses.replace(real(name), name="../../escaped"))
    out = tmp_path / "deep" / "out"
    result = sweep_cell.run_cell(cells(SweepSpec(**SMALL, output_dir=str(out)))[0],
                                 {"output_dir": str(out), "device": "cpu", "shots": [1], "seeds": [1]})
    assert result["status"] == "failed" and "'../../escaped' is not a usable name" in result["error"]
    assert not list(tmp_path.rglob("*escaped*"))


def test_a_cell_clears_the_caches_augmented_views_when_it_ends(tmp_path, monkeypatch):
    from workbench.features import FeatureCache
    from workbench.sweep import cell as sweep_cell

    cleared = []
    monkeypatch.setattr(FeatureCache, "clear_views", lambda self: cleared.append(self) or 0)
    out = tmp_path / "out"
    result = sweep_cell.run_cell(cells(SweepSpec(**SMALL, output_dir=str(out)))[0],
                                 {"output_dir": str(out), "device": "cpu", "shots": [1], "seeds": [1]})
    assert result["status"] == "done" and len(cleared) == 1


def test_a_sweep_spec_goes_through_the_safe_yaml_reader(tmp_path):
    from workbench.errors import ConfigError

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    with pytest.raises(ConfigError, match="sweep spec"):
        SweepSpec.from_yaml(bomb)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("datasets: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"tagged\.yaml.*line 1"):
        SweepSpec.from_yaml(tagged)
