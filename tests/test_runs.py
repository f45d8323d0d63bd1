"""Runs that survive their faults: compare resumes like a sweep, sweeps validate first, record what fails and go on,
stop cleanly on Ctrl-C, take their workers down with them; summaries use each dataset's own metric."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import workbench as wb
from workbench import experiment, results as results_mod
from workbench.data import synthetic_shapes
from workbench.errors import ConfigError, Interrupted
from workbench.sweep import SweepSpec, cells, sweep
from workbench.sweep import cell as sweep_cell  # the part that encodes the pools and runs the cells

MINI = "pneumoniamnist_mini"


@pytest.fixture(scope="module")
def shared_features(tmp_path_factory):
    """One feature cache for every sweep here (keys are content-based), so each pool is encoded once."""
    return tmp_path_factory.mktemp("features")


def out_dir(tmp_path, shared_features) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "features").symlink_to(shared_features, target_is_directory=True)
    return out


def counting_runs(monkeypatch, fail_at: int | None = None, error: BaseException | None = None) -> list:
    """Wrap ``run_experiment`` (as compare and sweep cells call it) to count runs and fail on the Nth."""
    calls = []
    real = experiment.run_experiment

    def wrapped(*args, **kwargs):
        calls.append(args[3:5])
        if fail_at is not None and len(calls) == fail_at:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", wrapped)
    return calls


# -- compare: append as each run finishes, resume on rerun ------------------------------------------------

def test_compare_keeps_finished_runs_and_resumes_without_duplicates(backbone, tmp_path, monkeypatch, quiet):
    ds = synthetic_shapes(3, train_per_class=6, val_per_class=2, test_per_class=4)
    cache = wb.FeatureCache(backbone, tmp_path / "features", show_progress=False)
    args = (ds, backbone, ["zero_shot", "gda"], [1], [1, 2])
    kwargs = dict(cache=cache, out_dir=tmp_path / "out", split_dir=tmp_path / "splits")
    csv = tmp_path / "out" / "results.csv"

    calls = counting_runs(monkeypatch, fail_at=2, error=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        wb.compare(*args, **kwargs)
    assert len(pd.read_csv(csv)) == 1  # the run finished before the failure is on disk

    calls = counting_runs(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    with pytest.raises(Interrupted, match=r"interrupted — rerun the same command to resume \(2 of 4 runs done"):
        wb.compare(*args, **kwargs)
    assert len(calls) == 2 and len(pd.read_csv(csv)) == 2  # skipped the saved run, saved one more

    calls = counting_runs(monkeypatch)
    table = wb.compare(*args, **kwargs)
    assert len(calls) == 2  # only the two missing runs were computed
    on_disk = pd.read_csv(csv)
    assert len(table) == len(on_disk) == 4 and on_disk["cell_id"].is_unique
    assert list(table["method"]) == ["zero_shot", "gda", "zero_shot", "gda"]  # grid order, saved rows included
    assert set(table["cell_id"]) == set(on_disk["cell_id"])

    calls = counting_runs(monkeypatch)
    again = wb.compare(*args, **kwargs)
    assert calls == [] and (again["accuracy"].to_numpy() == table["accuracy"].to_numpy()).all()
    wb.compare(*args, **kwargs, resume=False)
    assert len(calls) == 4 and len(pd.read_csv(csv)) == 4  # recomputed and replaced, not appended


def test_interrupted_compare_without_out_dir_says_nothing_was_saved(backbone, monkeypatch, quiet):
    ds = synthetic_shapes(3, train_per_class=6, val_per_class=2, test_per_class=4)
    counting_runs(monkeypatch, fail_at=1, error=KeyboardInterrupt())
    with pytest.raises(Interrupted, match="after 0 of 1 runs; nothing was saved") as info:
        wb.compare(ds, backbone, ["zero_shot"], [1], [1])
    assert isinstance(info.value, KeyboardInterrupt) and (info.value.done, info.value.total) == (0, 1)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no trace from inside the run


def test_compare_and_sweep_share_keys_and_the_dataset_metric(backbone, tmp_path, shared_features, quiet):
    out = out_dir(tmp_path, shared_features)
    ds = wb.load_dataset(MINI)
    table = wb.compare(ds, backbone, ["zero_shot"], [1], [1, 2], out_dir=out,
                       cache=wb.FeatureCache(backbone, out / "features", show_progress=False))
    assert (table["metric"] == "balanced_accuracy").all()  # pneumoniamnist_mini.yaml: metric: balanced_accuracy
    spec = {"datasets": [MINI], "backbones": ["workbench-tiny"], "methods": ["zero_shot"], "shots": [1], "seeds": [1, 2],
            "output_dir": str(out)}
    assert [c["cell_id"] for c in cells(SweepSpec(**spec))] == list(table["cell_id"])
    again = sweep(spec, show_progress=False)  # the compare's rows count as the sweep's finished cells
    assert (again.done, again.skipped, again.pool_encoded) == (0, 2, 0)

    summary = wb.summarize(table)
    assert list(summary.columns) == ["dataset", "method", "shots", "metric", "mean", "std", "runs"]
    assert summary["metric"].iloc[0] == "balanced_accuracy"
    assert summary["mean"].iloc[0] == pytest.approx(100 * table["balanced_accuracy"].mean(), abs=0.01)
    forced = wb.summarize(table, metric="accuracy")
    assert forced["metric"].iloc[0] == "accuracy"
    assert forced["mean"].iloc[0] == pytest.approx(100 * table["accuracy"].mean(), abs=0.01)


def test_summarize_uses_each_datasets_own_metric():
    rows = [{"dataset": d, "method": "m", "shots": 1, "seed": s, "metric": metric, "accuracy": acc,
             "balanced_accuracy": bal}
            for d, metric, acc, bal in (("xray", "balanced_accuracy", 0.8, 0.5), ("rs", "accuracy", 0.6, 0.4))
            for s in (1, 2)]
    rows.append({"dataset": "old", "method": "m", "shots": 1, "seed": 1, "accuracy": 0.7, "balanced_accuracy": 0.1})
    s = wb.summarize(pd.DataFrame(rows)).set_index("dataset")
    assert s.loc["xray", "metric"] == "balanced_accuracy" and s.loc["xray", "mean"] == 50.0
    assert s.loc["rs", "metric"] == "accuracy" and s.loc["rs", "mean"] == 60.0
    assert s.loc["old", "metric"] == "accuracy" and s.loc["old", "mean"] == 70.0  # rows from before the column
    with pytest.raises(ConfigError, match="'f1' is not a column"):
        wb.summarize(pd.DataFrame(rows), metric="f1")


def test_one_progress_bar_per_compare(backbone, tmp_path, monkeypatch, quiet):
    import tqdm.auto

    made = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    ds = synthetic_shapes(3, train_per_class=6, val_per_class=2, test_per_class=4)
    wb.compare(ds, backbone, ["zero_shot"], [1, 2], [1], out_dir=tmp_path)
    kept = [kw for kw in made if kw.get("leave")]
    assert len(kept) == 1 and kept[0]["total"] == 2 and kept[0]["unit"] == "run"  # runs done / total, with ETA
    assert all(kw.get("leave") is False for kw in made if kw is not kept[0])  # inner bars vanish when done


# -- sweeps: validate first, then record what fails and go on ---------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"seeds": ["1"]}, r"'seeds' must be a list of integers.*'1' is not"),
    ({"seeds": [1.5]}, r"'seeds' must be a list of integers.*1\.5 is not"),
    ({"seeds": [True]}, r"'seeds' must be a list of integers.*True is not"),
    ({"shots": [0]}, r"'shots' must be a list of positive integers.*0 is not"),
    ({"shots": [2.0]}, r"'shots' must be a list of positive integers.*2\.0 is not"),
    ({"datasets": [MINI, "no/such/folder"]}, r"datasets\[1\] 'no/such/folder' does not exist"),
    ({"datasets": ["missing.csv"]}, r"datasets\[0\] 'missing.csv' does not exist"),
    ({"methods": [{"name": "gda", "params": [1]}]}, r"'params' must be a mapping"),
    ({"datasets": ["__bad_yaml__"]}, r"bad.yaml: missing required key"),
    ({"methods": [{"name": "gda", "params": {"alpa": 1}}]}, r"unknown parameter 'alpa'"),
    ({"templates": ["no placeholder"]}, r"'templates' must be a list of strings with a \{\}"),
    ({"workers": True}, r"workers must be a positive integer"),
])
def test_the_whole_spec_is_validated_before_any_cell(change, message, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_cell, "encode_pools", lambda *a, **k: pytest.fail("a cell ran before validation"))
    (tmp_path / "bad.yaml").write_text("name: bad\n")
    spec = {"datasets": [MINI], "methods": ["zero_shot"], "shots": [1], "seeds": [1], "output_dir": str(tmp_path),
            **change}
    spec["datasets"] = [str(tmp_path / "bad.yaml") if d == "__bad_yaml__" else d for d in spec["datasets"]]
    with pytest.raises(ConfigError, match=message):
        sweep(spec, show_progress=False)


def test_numpy_integers_are_the_same_cells_as_ints():
    base = {"datasets": [MINI], "methods": ["zero_shot"], "shots": [1, 2], "seeds": [1]}
    numpy_spec = SweepSpec(**{**base, "shots": list(np.array([1, 2])), "seeds": [np.int64(1)]})
    assert [c["cell_id"] for c in cells(numpy_spec)] == [c["cell_id"] for c in cells(SweepSpec(**base))]


def test_unwritable_results_folder_fails_up_front(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_cell, "encode_pools", lambda *a, **k: pytest.fail("work started"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    spec = {"datasets": [MINI], "methods": ["zero_shot"], "shots": [1], "seeds": [1]}
    with pytest.raises(ConfigError, match="results folder .*a_file/out.* is not writable"):
        sweep({**spec, "output_dir": str(blocker / "out")}, show_progress=False)

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real = results_mod.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # what a read-only mount answers (root ignores chmod)
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(results_mod.tempfile, "mkstemp", mkstemp)
    with pytest.raises(ConfigError, match="read_only.* is not writable \\(Permission denied\\)"):
        sweep({**spec, "output_dir": str(read_only)}, show_progress=False)
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match="is not writable"):
        wb.compare(wb.load_dataset(MINI), backbone, ["zero_shot"], [1], [1], out_dir=read_only)


def write_unloadable_yaml(tmp_path) -> Path:
    """A valid dataset YAML whose image folder is gone: the spec passes, loading fails."""
    spec = yaml.safe_load((wb.repo_root() / "domains" / "medical" / f"{MINI}.yaml").read_text())
    spec.update(name="gone", source={"kind": "folder", "path": str(tmp_path / "deleted_images")})
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_dataset_that_cannot_load_fails_only_its_cells(tmp_path, shared_features, quiet):
    out = out_dir(tmp_path, shared_features)
    spec = {"datasets": [str(write_unloadable_yaml(tmp_path)), MINI], "methods": ["zero_shot"], "shots": [1],
            "seeds": [1, 2], "output_dir": str(out)}
    summary = sweep(spec, show_progress=False)
    assert (summary.done, summary.failed) == (2, 2)
    assert set(summary.table["dataset"]) == {MINI}
    failures = pd.read_csv(out / "failures.csv")
    assert len(failures) == 2 and failures["dataset"].str.endswith("gone.yaml").all()
    assert failures["error"].str.contains("DataError: dataset could not be loaded: image folder .*deleted_images").all()


def test_failures_csv_on_a_full_disk_warns_and_the_sweep_goes_on(tmp_path, shared_features, monkeypatch, quiet):
    real = results_mod._write_atomically

    def full_disk(table, path):
        if path.name == "failures.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(table, path)

    monkeypatch.setattr(results_mod, "_write_atomically", full_disk)
    out = out_dir(tmp_path, shared_features)
    spec = {"datasets": [str(write_unloadable_yaml(tmp_path)), MINI], "methods": ["zero_shot"], "shots": [1],
            "seeds": [1], "output_dir": str(out)}
    with pytest.warns(UserWarning, match=r"could not record the failure of cell .*failures.csv.*No space left"):
        summary = sweep(spec, show_progress=False)
    assert (summary.done, summary.failed) == (1, 1) and len(summary.table) == 1


def test_a_row_cut_short_is_dropped_reported_and_recomputed(tmp_path, shared_features, quiet):
    out = out_dir(tmp_path, shared_features)
    spec = {"datasets": [MINI], "backbones": ["workbench-tiny"], "methods": ["zero_shot"], "shots": [1], "seeds": [1, 2],
            "output_dir": str(out)}
    first = sweep(spec, show_progress=False)
    csv = out / "results.csv"
    text = csv.read_text()
    csv.write_text(text[:-25])  # another tool crashed while writing the last row
    with pytest.warns(UserWarning, match=r"results.csv, line 3: malformed row"):
        resumed = sweep(spec, show_progress=False)
    assert (resumed.done, resumed.skipped) == (1, 1)
    table = pd.read_csv(csv)
    assert len(table) == 2 and set(table["cell_id"]) == set(first.table["cell_id"])  # no half row left
    assert csv.read_text().endswith("\n") and len(csv.read_text().splitlines()) == 3
    assert sorted(table["accuracy"]) == sorted(first.table["accuracy"])  # the recomputed cell, same numbers


def test_ctrl_c_in_a_sweep_stops_cleanly_and_the_rerun_resumes(tmp_path, shared_features, monkeypatch, quiet):
    out = out_dir(tmp_path, shared_features)
    spec = {"datasets": [MINI], "methods": ["zero_shot"], "shots": [1], "seeds": [1, 2, 3], "output_dir": str(out)}
    counting_runs(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    with pytest.raises(Interrupted, match=r"interrupted — rerun the same command to resume \(1 of 3 cells done"):
        sweep(spec, show_progress=False)
    assert len(pd.read_csv(out / "results.csv")) == 1
    calls = counting_runs(monkeypatch)
    resumed = sweep(spec, show_progress=False)
    assert len(calls) == 2 and (resumed.done, resumed.skipped) == (2, 1) and len(resumed.table) == 3


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((16, 16, 3), 60 + 120 * c, dtype=np.uint8) + rng.integers(0, 30, (16, 16, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_a_sweep_takes_a_folder_dataset(tmp_path, quiet):
    folder = write_image_folder(tmp_path / "pets")
    spec = {"datasets": [str(folder)], "methods": ["zero_shot"], "shots": [1], "seeds": [1],
            "output_dir": str(tmp_path / "out")}
    summary = sweep(spec, show_progress=False)
    assert summary.done == 1, summary.errors
    assert summary.table["dataset"].iloc[0] == "pets"


# -- workers die with their parent ------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_takes_the_workers_down(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from workbench.sweep import worker_pool
        pool = worker_pool(2)
        futures = [pool.submit(time.sleep, 120) for _ in range(2)]
        time.sleep(1.0)
        while len(pool._processes) < 2:
            time.sleep(0.1)
        print(" ".join(str(p) for p in pool._processes), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if _alive(p)]
    for p in alive:  # do not leave them behind if the test fails
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their killed parent"


def test_read_table_drops_only_broken_rows(tmp_path):
    path = tmp_path / "results.csv"
    pd.DataFrame({"cell_id": ["a", "b"], "accuracy": [0.5, 0.25], "pretrained": ["", "x"]}).to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = results_mod.read_table(path)  # a complete file: no warning
    assert list(table["pretrained"]) == ["", "x"]  # empty text stays text, not NaN
    path.write_text(path.read_text() + "c,0.7\n" + "d,0.1,y,extra\n")
    with pytest.warns(UserWarning) as caught:
        table = results_mod.read_table(path)
    assert list(table["cell_id"]) == ["a", "b"]
    assert [str(w.message).split(":")[0] for w in caught] == [f"{path}, line 4", f"{path}, line 5"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_pool_sweep_without_a_traceback(tmp_path, shared_features):
    psutil = pytest.importorskip("psutil")
    out = out_dir(tmp_path, shared_features)
    spec = {"datasets": [MINI], "methods": ["linear_probe"], "shots": [1, 2], "seeds": [1, 2, 3, 4],
            "output_dir": str(out), "workers": 2}
    script = textwrap.dedent(f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        from workbench.errors import Interrupted
        from workbench.sweep import sweep
        try:
            sweep({spec!r}, show_progress=False)
        except Interrupted as err:  # what the CLI does with it
            print(err, flush=True)
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    workers = []

    def command_line(child):  # a child that already exited (a zombie until reaped) has none
        try:
            return " ".join(child.cmdline())
        except psutil.Error:
            return ""

    while time.time() < deadline and proc.poll() is None:
        workers = [p for p in parent.children() if "spawn_main" in command_line(p)]
        if len(workers) == 2:
            break
        time.sleep(0.2)
    assert len(workers) == 2, "the pool did not start"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # Ctrl-C (the workers ignore it: only the parent decides)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted — rerun the same command to resume" in stdout and "cells done" in stdout
    assert "Traceback" not in stderr
    alive = psutil.wait_procs(workers, timeout=5)[1]
    assert not alive, "workers outlived the interrupted sweep"


def test_each_sweep_keeps_its_features_in_its_own_folder(tmp_path, shared_features, quiet):
    spec = {"datasets": [MINI], "methods": ["zero_shot"], "shots": [1], "seeds": [1]}
    sweep({**spec, "output_dir": str(out_dir(tmp_path, shared_features))}, show_progress=False)
    second = sweep({**spec, "output_dir": str(tmp_path / "second")}, show_progress=False)  # same process
    assert second.pool_encoded == 104  # its own cache (1-shot support + val + 100 test), not the first sweep's folder
    assert any((tmp_path / "second" / "features").iterdir())
