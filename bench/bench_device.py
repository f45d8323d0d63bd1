"""The benchmarks' one device: resolved once, then passed to every synchronize / peak-memory / name call.

``torch.cuda.synchronize()``, ``torch.cuda.max_memory_allocated()`` and
``torch.cuda.get_device_name()`` without an argument act on the *current* CUDA device, which is
GPU 0 unless someone called ``torch.cuda.set_device``. A benchmark run with ``--device cuda:1``
therefore timed GPU 1 but synchronised, measured and named GPU 0 (and divided by GPU 0's zero
peak). ``BenchDevice`` resolves the device once (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``
through ``workbench.backbones.resolve_device``; a bare ``cuda`` becomes the current index), makes
it the current CUDA device, and hands the same ``torch.device`` to every call.

Used by ``bench/features.py``, ``bench/fine_tuning.py``, ``bench/prompt_learners.py`` and
``bench/gpu.py``; tested on CPU with a fake ``torch.cuda`` (tests/test_bench.py).
"""
from __future__ import annotations

import platform
import resource

import torch


class BenchDevice:
    """One resolved device and the timing / memory calls that must name it."""

    def __init__(self, spec: str | torch.device = "auto"):
        from workbench.backbones import resolve_device

        dev = resolve_device(spec)
        if dev.type == "cuda":
            if dev.index is None:  # a bare "cuda": pin the index now, so every later call names the same GPU
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        self.device = dev

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        """Peak allocated memory on this GPU since :meth:`reset_peak`; on CPU the process's max RSS."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @property
    def peak_kind(self) -> str:
        return "GPU max allocated" if self.cuda else "process max RSS"

    def name(self) -> str:
        if self.cuda:
            return f"{torch.cuda.get_device_name(self.device)} ({self.device})"
        if self.device.type == "cpu":
            return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        return str(self.device)

    def describe(self) -> dict:
        """What a figure was measured on: device, its name, torch / CUDA / cuDNN versions."""
        cudnn = torch.backends.cudnn.version() if self.cuda else None
        return {"device": str(self.device), "device_name": self.name(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "cudnn": cudnn}

    def header(self) -> str:
        d = self.describe()
        return (f"device {d['device']} = {d['device_name']}; torch {d['torch']}, CUDA {d['cuda'] or 'none'}"
                f"{', cuDNN ' + str(d['cudnn']) if d['cudnn'] else ''}")


def ratio(num: float, den: float, fmt: str = ".2f") -> str:
    """``num / den`` formatted, or ``n/a`` when the denominator is zero or missing (never a ZeroDivisionError)."""
    if not den or num is None:
        return "n/a"
    return f"{num / den:{fmt}}x"
