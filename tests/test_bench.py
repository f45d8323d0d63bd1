"""The benchmarks' device plumbing (issue 27) and the one GPU-figures script (issue 22), on CPU."""
import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

import workbench as wb

BENCH = wb.repo_root() / "bench"


@pytest.fixture()
def bench_device(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_device")


@pytest.fixture()
def fake_two_gpus(monkeypatch):
    """``torch.cuda`` as on a 2-GPU machine; every call records the device it was given."""
    calls = []
    fake = {
        "is_available": lambda: True,
        "device_count": lambda: 2,
        "current_device": lambda: 0,
        "set_device": lambda d=None: calls.append(("set_device", d)),
        "synchronize": lambda d=None: calls.append(("synchronize", d)),
        "reset_peak_memory_stats": lambda d=None: calls.append(("reset_peak_memory_stats", d)),
        "max_memory_allocated": lambda d=None: calls.append(("max_memory_allocated", d)) or (3 * 2**20 if d is not None
                                                                                             and torch.device(d).index == 1 else 0),
        "get_device_name": lambda d=None: calls.append(("get_device_name", d)) or f"Fake GPU {torch.device(d).index if d is not None else 0}",
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    return calls


def test_a_second_gpu_is_named_in_every_synchronize_peak_and_name_call(bench_device, fake_two_gpus):
    dev = bench_device.BenchDevice("cuda:1")
    assert dev.device == torch.device("cuda", 1) and dev.cuda
    dev.synchronize()
    dev.reset_peak()
    assert dev.peak_mib() == 3.0  # GPU 1's peak, not GPU 0's zero
    assert dev.name() == "Fake GPU 1 (cuda:1)"
    described = dev.describe()
    assert described["device"] == "cuda:1" and described["torch"] == torch.__version__ and described["cudnn"] == 90100
    assert "Fake GPU 1" in dev.header() and f"CUDA {torch.version.cuda or 'none'}" in dev.header()
    kinds = [k for k, _ in fake_two_gpus]
    assert kinds[0] == "set_device"  # made current once, at resolution
    assert {"synchronize", "reset_peak_memory_stats", "max_memory_allocated", "get_device_name"} <= set(kinds)
    # no call on the implicit current device: each one carries cuda:1
    assert all(d is not None and torch.device(d) == torch.device("cuda", 1) for _, d in fake_two_gpus), fake_two_gpus


def test_a_bare_cuda_is_pinned_to_the_current_index(bench_device, fake_two_gpus):
    dev = bench_device.BenchDevice("cuda")
    assert dev.device == torch.device("cuda", 0)


def test_cpu_device_reports_rss_and_versions_without_touching_cuda(bench_device, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CUDA call on a CPU benchmark")

    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated", "get_device_name", "set_device"):
        monkeypatch.setattr(torch.cuda, name, boom)
    dev = bench_device.BenchDevice("cpu")
    dev.synchronize()
    dev.reset_peak()
    assert dev.peak_mib() > 0 and dev.peak_kind == "process max RSS"
    assert dev.describe()["cuda"] == torch.version.cuda and dev.describe()["device"] == "cpu"


def test_ratio_never_divides_by_a_zero_peak(bench_device, monkeypatch):
    assert bench_device.ratio(3.0, 0.0) == "n/a"
    assert bench_device.ratio(3.0, 2.0) == "1.50x"
    fine_tuning = importlib.import_module("fine_tuning")
    row = {"step_s": 1.0, "step_min_s": 1.0, "peak_mib": 0.0}
    line = fine_tuning._ratio_line("A / B", {("a", 10): dict(row, peak_mib=5.0), ("b", 10): row}, "a", "b", 10)
    assert "peak memory n/a" in line and "step median 1.00x" in line


def test_gpu_script_prints_every_promised_figure_on_cpu_with_tiny_sizes():
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(wb.repo_root()))
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--device", "cpu"], capture_output=True,
                         text=True, timeout=600, env=env, cwd=wb.repo_root())
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "device cpu" in text and f"torch {torch.__version__}" in text and "CUDA " in text
    assert "not GPU figures" in text  # a CPU run says what it is
    figures = [line for line in text.splitlines() if line.startswith("[figure] ")]
    for label in ("encode alone", "roofline", "pipeline / encode ratio", "CLIP-LoRA step", "CLIP-SVD step",
                  "CoOp step", "MaPLe step", "CLIP-SVD / CLIP-LoRA", "end to end", "(extrapolated)",
                  "fp16 autocast vs fp32", "bf16 autocast vs fp32"):
        assert any(label in f for f in figures), f"no figure labelled {label!r} in:\n{text}"
    assert not any("failed" in f for f in figures), text
