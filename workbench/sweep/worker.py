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


def _worker_init(threads: int | None, parent_pid: int | None = None, env: tuple = ()) -> None:
    """Set up a worker process: its device pinning, few torch threads, no bars, no Ctrl-C of its own,
    and die with the parent."""
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
    os.environ.setdefault("TQDM_DISABLE", "1")


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
