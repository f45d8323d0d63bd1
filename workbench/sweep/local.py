"""The local process pool: one spawn-context worker process per slot, each handed its next cell as it
finishes one; a worker that dies is replaced and its cell retried, then recorded as failed.

Part of :mod:`workbench.sweep`.
"""
from __future__ import annotations

import collections
import os
import signal
import warnings

from ..errors import ConfigError
from .cell import run_cell
from .devices import WorkerSlot
from .worker import DEVICE_ENV, LABEL_ENV, WorkerInitError, _worker_init, run_guarded


def worker_pool(workers: int, threads: int | None = None, slot: WorkerSlot | None = None,
                decoders: int | None = None):
    """A spawn-context process pool whose workers die with this process and ignore Ctrl-C (and are pinned
    to ``slot``'s device, if given; ``decoders``: the DataLoader decoder processes each may start)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    env = () if slot is None else (*slot.env, (DEVICE_ENV, slot.device or ""), (LABEL_ENV, slot.label or ""))
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads, os.getpid(), env, decoders))


def decoder_budgets(slots: list[WorkerSlot]) -> list[int]:
    """Decoder processes per worker: none for a CPU worker (its encoder uses the cores), else an equal
    share of the cores this process may use (its CPU affinity, not the machine's count) less one
    for the worker itself (:func:`workbench.distributed.decoder_budget`)."""
    from ..distributed import decoder_budget

    return [0 if slot.device == "cpu" else decoder_budget(len(slots)) for slot in slots]


def _stop_workers(pool) -> None:
    """Cancel queued cells and end the running ones now (after Ctrl-C): their cells are simply not saved."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)


def _run_pool(slots: list[WorkerSlot], todo: list[dict], settings: dict, collect, cell_fn=run_cell,
              retries: int = 1) -> None:
    """Run ``todo`` on one worker process per slot, handing each worker its next cell as it finishes one.

    Each worker has its own single-process pool, so a worker that dies (killed, out of memory)
    breaks only its own cell: the worker is replaced and the cell retried up to ``retries``
    times, then recorded as failed. Results reach ``collect`` (the only writer) once per cell.
    """
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // len(slots))
    decoders = decoder_budgets(slots)
    queue = collections.deque(todo)
    losses: collections.Counter = collections.Counter()
    pools = [worker_pool(1, threads, slot, decoders[i]) for i, slot in enumerate(slots)]
    procs: list[list] = [[] for _ in slots]
    running: dict = {}  # future -> (slot index, cell)

    def submit(i: int) -> None:
        if queue:
            cell = queue.popleft()
            try:
                fut = pools[i].submit(run_guarded, cell_fn, cell, settings)
            except BrokenProcessPool:  # its worker died while idle: a fresh one takes the cell
                _stop_workers(pools[i])
                pools[i] = worker_pool(1, threads, slots[i], decoders[i])
                fut = pools[i].submit(run_guarded, cell_fn, cell, settings)
            running[fut] = (i, cell)
            procs[i] = list((getattr(pools[i], "_processes", None) or {}).values())

    try:
        for i in range(len(pools)):
            submit(i)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                i, cell = running.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    how = _how_it_ended(procs[i])
                    _stop_workers(pools[i])
                    pools[i] = worker_pool(1, threads, slots[i], decoders[i])
                    losses[cell["cell_id"]] += 1
                    where = f" on {slots[i].label}" if slots[i].label else ""
                    if losses[cell["cell_id"]] <= retries:
                        warnings.warn(f"sweep: the worker process{where} was lost ({how}) while running cell "
                                      f"{_describe(cell)}; retrying it on a fresh worker.", stacklevel=2)
                        queue.appendleft(cell)
                    else:
                        result = {"cell_id": cell["cell_id"], "status": "failed", "cell": cell,
                                  "error": f"WorkerLost: the worker process{where} was lost ({how}) while running "
                                           f"this cell, {losses[cell['cell_id']]} times; a SIGKILL is often the "
                                           "out-of-memory killer: lower 'workers' or free memory, then rerun to "
                                           "retry it."}
                        collect(result)
                except WorkerInitError as err:   # no cell can run on this machine as started: stop, say why
                    raise ConfigError(str(err)) from None
                except Exception as err:  # e.g. a cell that cannot be sent to the worker
                    collect({"cell_id": cell["cell_id"], "status": "failed", "cell": cell,
                             "error": f"{type(err).__name__}: {err}"})
                else:
                    collect(result)
                submit(i)
    except BaseException:
        for pool in pools:
            _stop_workers(pool)
        raise
    for pool in pools:
        pool.shutdown(wait=True)


def _how_it_ended(procs: list) -> str:
    """'killed by SIGKILL', 'exit code 3', ... of a lost worker process (best effort)."""
    for proc in procs:
        proc.join(timeout=10)   # a loaded machine can take seconds to reap the dead process
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        if code is not None:
            return f"exit code {code}"
    return "it ended unexpectedly"


def _describe(cell: dict) -> str:
    return f"{cell['cell_id']} ({cell['dataset']}, {cell['method_label']}, K={cell['shots']}, seed {cell['seed']})"
