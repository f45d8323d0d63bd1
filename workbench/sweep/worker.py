"""A sweep worker process's own setup: device pinning before torch touches CUDA, few torch threads, no
Ctrl-C of its own, death with the parent; and which device / label its rows record.

Part of :mod:`workbench.sweep`. Used by the local pool (:mod:`.local`) and the Dask engine (:mod:`.dask`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

#: set in a pinned worker's environment: the device string it loads on, and the label its rows record
DEVICE_ENV, LABEL_ENV = "WORKBENCH_SWEEP_DEVICE", "WORKBENCH_SWEEP_DEVICE_LABEL"
#: set in a pool worker's environment: the DataLoader decoder processes its encodes and training may start
DECODERS_ENV = "WORKBENCH_SWEEP_DECODERS"

#: why this worker process cannot run cells (set by :func:`_worker_init`, raised by :func:`run_guarded`)
_INIT_ERROR: str | None = None


class WorkerInitError(RuntimeError):
    """A worker process whose setup failed in a way no cell can run past (the sweep stops with it)."""


def _worker_init(threads: int | None, parent_pid: int | None = None, env: tuple = (),
                 decoders: int | None = None) -> None:
    """Set up a worker process: its device pinning, few torch threads, a budget of decoder processes,
    no bars, no Ctrl-C of its own, and die with the parent."""
    global _INIT_ERROR
    # First of all: CUDA_VISIBLE_DEVICES only counts if set before torch initialises CUDA.
    for name, value in env:
        os.environ[name] = value
    if parent_pid is not None:
        die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent handles it (saves, stops the workers),
    # so a worker does not print a traceback from inside sklearn or torch.
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (a Dask worker's event loop): Dask handles its own signals
        pass
    if threads:
        # torch reads OMP_NUM_THREADS when it loads: the worker need not load torch before its first cell
        # (a replaced worker starts in a second, not after a full torch import)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    if decoders is not None:
        os.environ[DECODERS_ENV] = str(int(decoders))
    os.environ.setdefault("TQDM_DISABLE", "1")
    visible = dict(env).get("CUDA_VISIBLE_DEVICES")
    _INIT_ERROR = cuda_started_too_early(visible) if visible is not None else None


def cuda_started_too_early(visible: str) -> str | None:
    """Why this process's GPU pinning did not take, or None.

    ``CUDA_VISIBLE_DEVICES`` counts only if set before CUDA is initialised in the process. A spawned
    worker re-imports the script that started the sweep; a top-level ``torch.cuda.is_available()``
    or ``.cuda()`` there runs before the worker's setup, and then the worker sees every GPU (and
    all of them would use the first). Detected by CUDA being initialised already, or by torch
    counting more devices than the ones pinned.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None   # nothing could have started CUDA in this process
    expected = len([v for v in visible.split(",") if v.strip()])
    if torch.cuda.is_initialized():
        how = "CUDA was already initialised in it"
    else:
        try:
            seen = torch.cuda.device_count() if (expected or torch.cuda.is_available()) else 0
        except Exception:   # a driver error: leave it to the cell, which reports it
            return None
        if seen <= expected:   # fewer: no CUDA here at all (or the GPU is gone): the cell will say so
            return None
        how = f"it sees {seen} GPU(s) instead of the {expected} it was pinned to"
    return (f"sweep: a worker process could not be pinned to its GPU (CUDA_VISIBLE_DEVICES={visible!r}): {how} "
            "before the sweep set CUDA_VISIBLE_DEVICES. The script that starts the sweep is re-imported by every "
            "worker, so a top-level torch.cuda call there (torch.cuda.is_available(), .cuda(), .to('cuda')) runs "
            "first. Move such calls under `if __name__ == \"__main__\":` (or into a function), then rerun; the "
            "finished cells are kept.")


def run_guarded(cell_fn, cell: dict, settings: dict):
    """Run ``cell_fn(cell, settings)`` in a pool worker, within its decoder budget, unless the worker's
    setup failed (then raise :class:`WorkerInitError`, which stops the sweep with its message)."""
    if _INIT_ERROR:
        raise WorkerInitError(_INIT_ERROR)
    apply_decoder_budget()
    return cell_fn(cell, settings)


def apply_decoder_budget() -> None:
    """In a pool worker: cap the decoder processes that ``num_workers="auto"`` starts (feature encodes
    and the training loop's image batches) at this worker's budget (:data:`DECODERS_ENV`)."""
    budget = os.environ.get(DECODERS_ENV)
    if budget is None:
        return
    from .. import features

    features.MAX_AUTO_WORKERS = min(features.MAX_AUTO_WORKERS, int(budget))


def _worker_device(settings: dict) -> tuple[str, str | None]:
    """(device to load on, label for the rows) of this worker: its pinning if it has one, else the spec's."""
    if os.environ.get(DEVICE_ENV):
        return os.environ[DEVICE_ENV], os.environ.get(LABEL_ENV) or os.environ[DEVICE_ENV]
    labels = settings.get("cuda_labels")
    if labels:  # a dask-cuda worker: its own GPU comes first in its CUDA_VISIBLE_DEVICES
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if first in labels:
            return "cuda:0", labels[first]
    return settings["device"], None


def _worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def die_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """Make this (worker) process end when ``parent_pid`` does, even if the parent is killed with SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, immediate. Everywhere: a daemon thread that
    polls the parent id (a dead parent's children are re-parented) and exits the process.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
