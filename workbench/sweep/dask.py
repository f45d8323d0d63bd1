"""The Dask engine: a client of a running cluster or of a local one this sweep starts (one worker per
device with ``devices``), and the cells sent to it.

Part of :mod:`workbench.sweep`. ``dask`` below is the top-level Dask package (absolute imports).
"""
from __future__ import annotations

import contextlib

from ..errors import ConfigError
from .cell import run_cell
from .devices import WorkerSlot
from .spec import SweepSpec
from .worker import DEVICE_ENV, LABEL_ENV, _worker_init


@contextlib.contextmanager
def _dask_client(spec: SweepSpec, slots: list[WorkerSlot] | None, settings: dict):
    """A client of ``dask_address``, or of a local cluster this sweep starts (and ends)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("engine 'dask' needs dask.distributed: pip install -e '.[cluster]'.") from None
    cluster = None
    if spec.dask_address:
        client = Client(spec.dask_address)
    else:
        cluster = (_local_device_cluster(slots, settings) if slots else
                   LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=None))
        client = Client(cluster)
    try:
        from ..distributed import decoder_budget

        # local workers share this machine's cores: each gets its share of decoder processes
        workers = None if spec.dask_address else (len(slots) if slots else spec.workers)
        client.run(_worker_init, 1, None, (), None if workers is None else decoder_budget(workers))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _local_device_cluster(slots: list[WorkerSlot], settings: dict):
    """One Dask worker per device: dask-cuda's LocalCUDACluster for GPUs when installed, else one
    Nanny per slot started with its own CUDA_VISIBLE_DEVICES (and the label its rows record)."""
    from dask.distributed import Nanny, Scheduler, SpecCluster

    # dask-cuda starts one worker per listed GPU: only when each GPU is listed once (spread workers may share)
    if all(slot.device != "cpu" for slot in slots) and len({slot.label for slot in slots}) == len(slots):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:
            physical = [dict(slot.env)["CUDA_VISIBLE_DEVICES"] for slot in slots]
            settings["cuda_labels"] = {p: slot.label for p, slot in zip(physical, slots)}
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=physical, threads_per_worker=1, dashboard_address=None)
    workers = {f"device-{i}": {"cls": Nanny, "options": {
        "nthreads": 1, "env": {**dict(slot.env), DEVICE_ENV: slot.device, LABEL_ENV: slot.label}}}
        for i, slot in enumerate(slots)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def _run_dask(client, todo: list[dict], settings: dict, collect, cell_fn=run_cell) -> None:
    """Run ``todo`` on the cluster. Dask reschedules the cell of a worker that dies (up to its
    ``distributed.scheduler.allowed-failures``); then the cell is recorded as failed."""
    from dask.distributed import as_completed

    futures = client.map(cell_fn, todo, settings=settings, pure=False)
    cell_of = {fut.key: cell for fut, cell in zip(futures, todo)}
    for fut in as_completed(futures):
        try:
            result = fut.result()
        except Exception as err:  # run_cell never raises: the worker(s) running it died, or the cluster went away
            cell = cell_of[fut.key]
            result = {"cell_id": cell["cell_id"], "status": "failed", "cell": cell,
                      "error": f"WorkerLost: {type(err).__name__}: {err}"}
        collect(result)
