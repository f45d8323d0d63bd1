"""Which device each sweep worker gets: the ``devices`` list checked against the GPUs this process sees,
and one :class:`WorkerSlot` (label, device string, environment) per worker.

Part of :mod:`workbench.sweep`.
"""
from __future__ import annotations

import numbers
import os
import warnings
from dataclasses import dataclass

from ..errors import ConfigError


def _check_devices_syntax(devices) -> None:
    """``devices``: "all", or a non-empty list of GPU indices (ints) and ``cpu`` / ``cpu:N`` entries."""
    fix = "Write e.g. devices: [0, 1] (GPU indices), devices: all, or devices: [cpu, cpu] (two CPU workers)."
    if devices == "all":
        return
    if not isinstance(devices, list) or not devices:
        raise ConfigError(f"sweep: 'devices' must be 'all' or a non-empty list, got {devices!r}. {fix}")
    for d in devices:
        ok = (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0) or (
            isinstance(d, str) and (d == "cpu" or (d.startswith("cpu:") and d[4:].isdigit())))
        if not ok:
            raise ConfigError(f"sweep: 'devices' entry {d!r} is not a GPU index (0, 1, ...) or 'cpu'. {fix}")
    gpus = [int(d) for d in devices if not isinstance(d, str)]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"sweep: 'devices' lists a GPU twice ({devices!r}); one worker per GPU. {fix}")


def visible_gpus() -> list[str]:
    """Names of the GPUs this process sees, by torch index (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class WorkerSlot:
    """One worker's device: its label in the results, the device string it loads on, the env it needs."""
    label: str | None = None         # recorded in each row's ``device``; None: whatever ``device`` resolves to
    device: str | None = None        # passed to load_backbone; None: the spec's ``device``
    env: tuple = ()                  # (name, value) pairs set in the worker before torch touches CUDA


def device_slots(devices) -> list[WorkerSlot]:
    """One slot per entry of ``devices``; a GPU not visible here is a ConfigError listing the visible ones.

    GPU ``i`` is torch's index in this process; the worker gets the matching physical id in
    ``CUDA_VISIBLE_DEVICES`` (mapped through this process's own ``CUDA_VISIBLE_DEVICES``, if
    set), so it sees exactly that GPU, as its ``cuda:0``.
    """
    _check_devices_syntax(devices)
    entries = devices if isinstance(devices, list) else None
    needs_gpus = entries is None or any(not isinstance(d, str) for d in entries)
    names = visible_gpus() if needs_gpus else []
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names)) or "none"
    if entries is None:  # "all"
        if not names:
            raise ConfigError("sweep: devices: all, but no GPU is visible to this process (torch.cuda.is_available() "
                              f"is False; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Use "
                              "'workers: N' for CPU workers, or run where the GPUs are.")
        entries = list(range(len(names)))
    missing = [d for d in entries if not isinstance(d, str) and int(d) >= len(names)]
    if missing:
        raise ConfigError(f"sweep: devices {missing} not visible to this process; visible GPUs: {listing} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). List only those indices, "
                          "or 'devices: all'.")
    parent_visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    slots = []
    for position, d in enumerate(entries):
        if isinstance(d, str):  # a CPU worker: it must not touch a GPU either
            label = d if ":" in d else f"cpu:{position}"
            slots.append(WorkerSlot(label, "cpu", (("CUDA_VISIBLE_DEVICES", ""),)))
        else:
            physical = parent_visible[int(d)] if parent_visible else str(int(d))
            slots.append(WorkerSlot(f"cuda:{int(d)}", "cuda:0", (("CUDA_VISIBLE_DEVICES", physical),)))
    return slots


def spread_workers(workers: int, device: str) -> list[WorkerSlot] | None:
    """``workers: N`` without ``devices``: the slots that spread the N workers over the visible GPUs.

    Without this every worker would load its model on ``cuda:0``. With several visible GPUs, worker
    ``i`` is pinned to GPU ``i mod G`` (as ``devices`` would pin it); with one GPU the workers share
    it, with a warning (each holds its own copy of the model there). None (no pinning) when the
    sweep runs on the CPU, on a device the spec names (``cuda:1``), or with one worker.
    """
    if workers < 2 or device not in ("auto", "cuda"):
        return None
    names = visible_gpus()
    if not names:
        return None
    if len(names) == 1:
        warnings.warn(f"sweep: {workers} workers share the only visible GPU (0: {names[0]}); each loads its own "
                      "copy of the model there. Lower 'workers' if it runs out of memory.", stacklevel=3)
        return None
    gpus = device_slots(list(range(len(names))))
    return [gpus[i % len(gpus)] for i in range(workers)]

