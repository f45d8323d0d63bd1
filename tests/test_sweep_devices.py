"""GPU-aware sweeps, on CPU: one worker per device, each cell's recorded device is its worker's; a GPU
that is not there, a worker lost mid-sweep, and Dask workers that cannot see the sweep's folders."""
import os
import signal
import warnings

import pandas as pd
import pytest

from workbench.errors import ConfigError
from workbench.results import ResultsTable, make_cell
from workbench.sweep import WorkerSlot, device_slots, sweep

from workbench.sweep import cell as sweep_cell, dask as sweep_dask, devices as sweep_devices  # the sweep's parts
from workbench.sweep import local as sweep_local, probe as sweep_probe, worker as sweep_worker
MINI = "pneumoniamnist_mini"
TINY = {"datasets": [MINI], "methods": ["zero_shot", "linear_probe"], "shots": [1], "seeds": [1, 2]}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the sweep starts encoding (bad input must be refused before)."""
    monkeypatch.setattr(sweep_cell, "encode_pools", lambda *a, **k: pytest.fail("work started before the check"))


# -- device lists ---------------------------------------------------------------------------------

def test_each_gpu_gets_a_worker_pinned_to_it(monkeypatch):
    monkeypatch.setattr(sweep_devices, "visible_gpus", lambda: ["GPU-A", "GPU-B", "GPU-C"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # this process sees physical GPUs 4, 5, 6 as 0, 1, 2
    slots = device_slots([0, 2])
    assert [s.label for s in slots] == ["cuda:0", "cuda:2"]
    assert [dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in slots] == ["4", "6"]
    assert {s.device for s in slots} == {"cuda:0"}  # each worker sees only its own GPU, as cuda:0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in device_slots("all")] == ["0", "1", "2"]
    cpu = device_slots(["cpu", "cpu"])
    assert [s.label for s in cpu] == ["cpu:0", "cpu:1"] and {dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in cpu} == {""}


def test_a_gpu_that_does_not_exist_fails_before_any_work(monkeypatch, tmp_path, no_work):
    spec = {**TINY, "output_dir": str(tmp_path)}
    monkeypatch.setattr(sweep_devices, "visible_gpus", lambda: ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    with pytest.raises(ConfigError, match=r"devices \[3\] not visible.*visible GPUs: 0: NVIDIA H100 80GB HBM3, "
                                          r"1: NVIDIA H100 80GB HBM3"):
        sweep({**spec, "devices": [0, 3]}, show_progress=False)
    with pytest.raises(ConfigError, match=r"devices \[1\] not visible.*visible GPUs: 0: GPU-X"):
        monkeypatch.setattr(sweep_devices, "visible_gpus", lambda: ["GPU-X"])
        sweep(spec, devices=[0, 1], show_progress=False)  # the argument, as the spec key
    monkeypatch.setattr(sweep_devices, "visible_gpus", lambda: [])
    with pytest.raises(ConfigError, match="visible GPUs: none"):
        sweep({**spec, "devices": [0]}, show_progress=False)
    with pytest.raises(ConfigError, match="devices: all, but no GPU is visible"):
        sweep({**spec, "devices": "all"}, show_progress=False)
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("devices, message", [
    ([0, 0], "lists a GPU twice"), (["gpu0"], "entry 'gpu0' is not a GPU index"), ([], "non-empty list"),
    ([-1], "entry -1 is not a GPU index"), ([True], "entry True is not a GPU index")])
def test_device_list_syntax_errors_say_what_to_write(devices, message, tmp_path, no_work):
    with pytest.raises(ConfigError, match=message + r".*devices: \[0, 1\]"):
        sweep({**TINY, "output_dir": str(tmp_path), "devices": devices}, show_progress=False)


def test_devices_and_an_other_worker_count_or_a_single_device_conflict(tmp_path, no_work):
    with pytest.raises(ConfigError, match="one worker per device \\(2\\); 'workers: 3' disagrees"):
        sweep({**TINY, "output_dir": str(tmp_path), "devices": ["cpu", "cpu"], "workers": 3}, show_progress=False)
    with pytest.raises(ConfigError, match="either 'device'.*or 'devices'"):
        sweep({**TINY, "output_dir": str(tmp_path), "devices": ["cpu"], "device": "cpu"}, show_progress=False)


def test_each_cell_records_the_device_of_the_worker_that_ran_it(tmp_path, quiet):
    summary = sweep({**TINY, "output_dir": str(tmp_path), "devices": ["cpu", "cpu"]}, show_progress=False)
    assert (summary.done, summary.failed) == (4, 0), summary.errors
    table = summary.table
    assert len(table) == 4 and table["cell_id"].is_unique
    # two worker processes, one label each, and each row carries its own worker's label
    by_worker = table.groupby("worker")["device"].unique()
    assert len(by_worker) == 2 and sorted(d for ds in by_worker for d in ds) == ["cpu:0", "cpu:1"]
    assert all(len(ds) == 1 for ds in by_worker)
    # the workers' pools are the parent's (a disk hit): no eval-transform encode inside the cells
    assert summary.cell_encoded == 0 and summary.pool_encoded > 0
    # and the parent let go of the model it encoded them with (on a GPU: memory the first worker needs)
    assert not [key for key in sweep_cell._STATE if key[0] in ("backbone", "cache")]


def report_environment(cell: dict, settings: dict) -> dict:
    """A cell function for the worker pool: what the worker process sees."""
    import torch

    return {"cell_id": cell["cell_id"], "status": "done", "row": {
        "cell_id": cell["cell_id"], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": sweep_worker._worker_device(settings)[1], "cuda_initialised": torch.cuda.is_initialized(),
        "threads": torch.get_num_threads(), "pid": os.getpid()}}


def test_workers_get_their_cuda_visible_devices_before_torch_starts_cuda(tmp_path):
    slots = [WorkerSlot("cuda:1", "cuda:0", (("CUDA_VISIBLE_DEVICES", "1"),)),
             WorkerSlot("cuda:3", "cuda:0", (("CUDA_VISIBLE_DEVICES", "3"),))]
    rows = []
    todo = [{"cell_id": f"c{i}"} for i in range(4)]
    sweep_local._run_pool(slots, todo, {"device": "auto"}, lambda r: rows.append(r["row"]), cell_fn=report_environment)
    table = pd.DataFrame(rows)
    assert sorted(table["cell_id"]) == ["c0", "c1", "c2", "c3"]
    assert set(zip(table["visible"], table["device"])) == {("1", "cuda:1"), ("3", "cuda:3")}
    assert table.groupby("pid")["device"].nunique().eq(1).all()
    assert not table["cuda_initialised"].any()
    assert set(table["threads"]) == {max(1, (os.cpu_count() or 1) // 2)}  # the cores shared between the workers


# -- a worker lost mid-sweep ----------------------------------------------------------------------

def dies_once_or_always(cell: dict, settings: dict) -> dict:
    """Kill this worker process (as the out-of-memory killer would) on the cell's first try, or on every try."""
    marker = os.path.join(settings["output_dir"], f"tried-{cell['cell_id']}")
    first = not os.path.exists(marker)
    open(marker, "a").close()
    if cell["method"] == "always_dies" or first and cell["method"] == "dies_once":
        os.kill(os.getpid(), signal.SIGKILL)
    row = {"cell_id": cell["cell_id"], "method": cell["method"], "accuracy": 0.5, "pid": os.getpid()}
    return {"cell_id": cell["cell_id"], "status": "done", "row": row}


def test_a_lost_worker_is_replaced_its_cell_retried_once_then_recorded_as_failed(tmp_path):
    todo = [make_cell(MINI, "workbench-tiny", "", method, 1, seed)
            for method in ("fine", "dies_once", "always_dies") for seed in (1, 2)]
    table = ResultsTable(tmp_path)
    done, failed = [], []

    def collect(result):  # what the sweep does with each result
        if result["status"] == "done":
            table.append(result["row"])
            done.append(result["cell_id"])
        else:
            table.record_failure(result["cell"], result["error"])
            failed.append(result["cell_id"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep_local._run_pool([WorkerSlot(), WorkerSlot()], todo, {"output_dir": str(tmp_path)}, collect,
                              cell_fn=dies_once_or_always)
    rows = table.read()
    assert len(rows) == 4 and rows["cell_id"].is_unique and len(done) == 4  # one row per cell, no duplicate
    assert set(rows["method"]) == {"fine", "dies_once"}
    always = {c["cell_id"] for c in todo if c["method"] == "always_dies"}
    assert set(failed) == always  # each reported once
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert set(failures["cell_id"]) == always
    # how it ended is best effort (the pool's own thread may reap the process first): the count is not
    assert failures["error"].str.contains("worker process was lost \\((killed by SIGKILL|it ended unexpectedly)\\) "
                                          "while running this cell, 2 times").all()
    retried = [str(w.message) for w in caught if "retrying it on a fresh worker" in str(w.message)]
    assert len(retried) == 4  # 2 dies_once + 2 always_dies
    assert all(__import__("re").search(r"was lost \((killed by SIGKILL|it ended unexpectedly)\)", m) for m in retried)


def test_a_worker_that_died_while_idle_is_replaced_before_its_next_cell(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    real = sweep_local.worker_pool
    dead = real(1)
    with pytest.raises(BrokenProcessPool):
        dead.submit(os._exit, 1).result()  # this pool's only worker is gone before the sweep hands it a cell
    pools = iter([dead])
    monkeypatch.setattr(sweep_local, "worker_pool", lambda *a, **k: next(pools, None) or real(*a, **k))
    results = []
    todo = [make_cell(MINI, "workbench-tiny", "", "fine", 1, 1)]
    sweep_local._run_pool([WorkerSlot()], todo, {"output_dir": str(tmp_path)}, results.append,
                          cell_fn=dies_once_or_always)
    assert [r["status"] for r in results] == ["done"]


# -- Dask ----------------------------------------------------------------------------------------

def test_a_lost_dask_worker_s_cell_is_rescheduled_then_recorded_as_failed(tmp_path):
    dask = pytest.importorskip("dask")
    distributed = pytest.importorskip("dask.distributed")
    todo = [make_cell(MINI, "workbench-tiny", "", method, 1, 1) for method in ("dies_once", "always_dies")]
    results = []
    # one task per worker thread at a time, so a death counts against the cell that ran, not a queued one
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0}):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            sweep_dask._run_dask(client, todo, {"output_dir": str(tmp_path)}, results.append,
                                 cell_fn=dies_once_or_always)
    by_method = {r["cell"]["method"] if r["status"] == "failed" else r["row"]["method"]: r for r in results}
    assert len(results) == 2 and set(by_method) == {"dies_once", "always_dies"}  # one result per cell
    assert by_method["dies_once"]["status"] == "done"  # rescheduled on the restarted worker
    assert by_method["always_dies"]["status"] == "failed"
    assert by_method["always_dies"]["error"].startswith("WorkerLost: KilledWorker")


def test_dask_workers_per_device_record_their_device(tmp_path, quiet):
    pytest.importorskip("dask.distributed")
    summary = sweep({**TINY, "methods": ["zero_shot"], "output_dir": str(tmp_path), "engine": "dask",
                     "devices": ["cpu:0", "cpu:1"]}, show_progress=False)
    assert summary.done == 2, summary.errors
    assert set(summary.table["device"]) <= {"cpu:0", "cpu:1"}
    assert summary.table.groupby("worker")["device"].nunique().eq(1).all()


def _see_folder_elsewhere(hidden: str) -> None:
    """On one Dask worker: look for ``hidden`` at a path that does not exist there (another machine's view)."""
    real = sweep_probe._probe_folder

    def probe(folder, token):
        return real(folder.replace(hidden, "/nonexistent/mount"), token)

    sweep_probe._probe_folder = probe


def _write_elsewhere(elsewhere: str) -> None:
    """On one Dask worker: read the client's markers, but write its own to other storage."""
    real = sweep_probe._probe_folder

    def probe(folder, token):
        problem, mine = real(folder, token)
        if mine:
            os.replace(os.path.join(folder, mine), os.path.join(elsewhere, mine))
        return problem, mine

    sweep_probe._probe_folder = probe


def test_a_cluster_worker_that_cannot_see_the_sweep_folders_fails_the_sweep_up_front(tmp_path, no_work):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        spec = {**TINY, "output_dir": str(tmp_path / "out"), "engine": "dask",
                "dask_address": cluster.scheduler_address}
        folders = sweep_probe.shared_folders(None, tmp_path / "out")
        sweep_probe.check_shared_folders(client, folders)  # every worker sees them: passes, markers cleaned up
        assert not [p for f in folders.values() for p in f.iterdir() if p.name.startswith(".workbench-probe-")]
        blind = sorted(client.scheduler_info()["workers"])[0]
        client.run(_see_folder_elsewhere, str(tmp_path / "out"), workers=[blind])
        with pytest.raises(ConfigError) as err:
            sweep(spec, show_progress=False)
    message = str(err.value)
    for folder in ("results folder (output_dir)", "feature cache (output_dir/features)",
                   "split files (output_dir/splits)"):
        assert f"worker {blind}: {folder}" in message
    assert "cannot read the client's marker" in message and "Nothing was run" in message
    assert message.count("worker tcp://") == 3  # only the blind worker is named
    assert not (tmp_path / "out" / "results.csv").exists()
    # the other way round: a worker whose writes this machine does not see
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        (tmp_path / "elsewhere").mkdir()
        client.run(_write_elsewhere, str(tmp_path / "elsewhere"))
        with pytest.raises(ConfigError, match=r"worker tcp://\S+: feature cache \(output_dir/features\) '[^']+': "
                                              "writes files there that this machine does not see"):
            sweep_probe.check_shared_folders(client, folders)


# -- the first GPU run (issue 27): decoder budgets, workers spread over GPUs, CUDA started too early ----

def test_decoder_budget_follows_cpu_affinity_and_torchrun_ranks_not_cpu_count(monkeypatch):
    from workbench import distributed

    monkeypatch.setattr(os, "cpu_count", lambda: 64)                   # the machine ...
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)   # ... and our share
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.usable_cpus() == 4
    assert [distributed.decoder_budget(n) for n in (1, 2, 4)] == [3, 1, 0]   # one core left per process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                        # two torchrun ranks on this machine
    assert distributed.decoder_budget() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert distributed.decoder_budget(1) == distributed.MAX_DECODERS_PER_PROCESS
    slots = [WorkerSlot("cpu:0", "cpu", (("CUDA_VISIBLE_DEVICES", ""),)), WorkerSlot("cuda:0", "cuda:0")]
    assert sweep_local.decoder_budgets(slots) == [0, distributed.MAX_DECODERS_PER_PROCESS]   # CPU: in-line


def report_decoders(cell: dict, settings: dict) -> dict:
    """A cell function: how many decoder processes num_workers='auto' would start in this worker on a GPU."""
    from workbench.features import resolve_num_workers

    return {"cell_id": cell["cell_id"], "status": "done", "row": {
        "cell_id": cell["cell_id"], "auto": resolve_num_workers("auto", 10_000, 64, "cuda"),
        "budget": os.environ.get(sweep_worker.DECODERS_ENV)}}


def test_pool_workers_start_no_decoders_beyond_their_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_local, "decoder_budgets", lambda slots: [0] * len(slots))
    rows = []
    sweep_local._run_pool([WorkerSlot(), WorkerSlot()], [{"cell_id": "c0"}, {"cell_id": "c1"}], {"device": "auto"},
                          lambda r: rows.append(r["row"]), cell_fn=report_decoders)
    assert [(r["auto"], r["budget"]) for r in rows] == [(0, "0"), (0, "0")]   # not min(8, cores - 1)
    monkeypatch.undo()
    rows = []
    sweep_local._run_pool([WorkerSlot()], [{"cell_id": "c0"}], {"device": "auto"}, lambda r: rows.append(r["row"]),
                          cell_fn=report_decoders)
    from workbench.distributed import decoder_budget

    assert rows[0]["budget"] == str(decoder_budget(1)) and rows[0]["auto"] <= decoder_budget(1)


def test_workers_without_devices_are_spread_over_the_visible_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sweep_devices, "visible_gpus", lambda: ["GPU-A", "GPU-B"])
    slots = sweep_devices.spread_workers(3, "auto")
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0"]
    assert sweep_devices.spread_workers(3, "cpu") is None and sweep_devices.spread_workers(3, "cuda:1") is None
    assert sweep_devices.spread_workers(1, "auto") is None
    # the sweep itself: `workers: 2` on a two-GPU machine gives each GPU one worker
    seen = []
    monkeypatch.setattr(sweep_cell, "encode_pools", lambda *a, **k: {})
    monkeypatch.setattr(sweep_local, "_run_pool", lambda slots, todo, settings, collect: seen.append(slots))
    sweep({**TINY, "output_dir": str(tmp_path)}, workers=2, show_progress=False)
    assert [s.label for s in seen[0]] == ["cuda:0", "cuda:1"]
    # one GPU: the workers share it, and the user is told
    monkeypatch.setattr(sweep_devices, "visible_gpus", lambda: ["GPU-A"])
    with pytest.warns(UserWarning, match="2 workers share the only visible GPU"):
        assert sweep_devices.spread_workers(2, "auto") is None


def test_cuda_started_before_the_worker_was_pinned_is_detected(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    message = sweep_worker.cuda_started_too_early("1")
    assert "CUDA was already initialised" in message and 'if __name__ == "__main__":' in message
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)          # the count was taken before pinning
    assert "it sees 4 GPU(s) instead of the 1" in sweep_worker.cuda_started_too_early("1")
    assert "instead of the 0" in sweep_worker.cuda_started_too_early("")   # a CPU worker that sees GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sweep_worker.cuda_started_too_early("1") is None              # pinned as asked
    # the worker initialiser records it, and the worker's first cell stops with it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(sweep_worker, "_INIT_ERROR", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    handler = signal.getsignal(signal.SIGINT)
    try:
        sweep_worker._worker_init(None, None, (("CUDA_VISIBLE_DEVICES", "1"),))
    finally:
        signal.signal(signal.SIGINT, handler)
    with pytest.raises(sweep_worker.WorkerInitError, match="could not be pinned to its GPU"):
        sweep_worker.run_guarded(report_decoders, {"cell_id": "c0"}, {})


def init_failed(cell: dict, settings: dict) -> dict:
    raise sweep_worker.WorkerInitError("sweep: a worker process could not be pinned to its GPU (test)")


def test_a_worker_that_could_not_be_pinned_stops_the_sweep_with_its_message(tmp_path):
    with pytest.raises(ConfigError, match=r"could not be pinned to its GPU \(test\)"):
        sweep_local._run_pool([WorkerSlot()], [{"cell_id": "c0"}, {"cell_id": "c1"}], {"device": "auto"},
                              lambda r: pytest.fail("a cell ran"), cell_fn=init_failed)
