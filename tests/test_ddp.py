"""Data-parallel training under torchrun (workbench.distributed): two gloo processes on the CPU end
with the single-process run's weights, resume, sharding, and the world-size check.

The two-process runs start once per session (``ddp_runs``): ``python -m torch.distributed.run
--nproc_per_node 2 tests/test_ddp.py OUT`` runs :func:`_worker` below in each process, which saves
what every process ended with; the tests compare it with single-process runs made here.
"""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench import distributed, training
from workbench.errors import ConfigError

WORLD = 2
# float64 runs: DDP's two half-batch gradient sums differ from one whole-batch sum only in rounding
F64_TOL = 1e-12
# float32 methods on the tiny backbone: the same rounding, amplified by a few optimizer steps
F32_TOL = 1e-5


# -- a small module trained through workbench.training.train (same code in both modes) -----------

class Small(nn.Module):
    """A linear classifier with optional input dropout (randomness inside the step)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(6, 3).double()
        self.frozen = nn.Linear(6, 6).double().requires_grad_(False)  # stays out of DDP
        self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))  # trainable, never reached: grad stays None
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.linear(self.drop(self.frozen(x)))


def _small_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _small_batches(x, y):
    """Global batches of 4, 3 and 1 samples: equal halves, an unequal split and an empty share."""
    def batches(epoch, gen):
        order = torch.randperm(len(x), generator=gen)
        for lo, hi in ((0, 4), (4, 7), (7, 8)):
            idx = order[lo:hi]
            yield x[idx], y[idx]
    return batches


def train_small(p=0.0, epochs=4, checkpoint_dir=None, stop_after_epoch=None, seen=None):
    """Trained weights and history; ``seen`` (a list) gets each step's (batch size, torch seed in force)."""
    module = Small(p)
    x, y = _small_data()
    seen = [] if seen is None else seen

    def loss_fn(batch):
        bx, by = batch
        seen.append((len(bx), torch.initial_seed()))
        return F.cross_entropy(module(bx), by)

    cfg = training.TrainConfig(epochs=epochs, optimizer="adamw", lr=0.05, schedule="cosine_step", grad_clip=0.5,
                               seed=7, checkpoint_every=1 if checkpoint_dir else None)
    history = training.train(module, loss_fn, _small_batches(x, y), cfg, device=torch.device("cpu"),
                             checkpoint_dir=checkpoint_dir, show_progress=False, stop_after_epoch=stop_after_epoch)
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}, history


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- real methods on the offline tiny backbone ---------------------------------------------------

@functools.lru_cache(maxsize=1)
def _backbone_and_data():
    import workbench as wb
    from workbench.data import synthetic_shapes

    return wb.load_backbone("workbench-tiny", device="cpu"), synthetic_shapes(4, train_per_class=8, val_per_class=4, test_per_class=2)


def _task():
    import workbench as wb
    from workbench.data import sample_few_shot
    from workbench.task import FewShotTask

    backbone, ds = _backbone_and_data()
    return FewShotTask(ds, sample_few_shot(ds, 4, 1), backbone, wb.FeatureCache(backbone, None, show_progress=False),
                       templates=["a photo of a {}."])


COOP = {"epochs": 3, "n_ctx": 4, "lr": 0.02, "batch_size": 8}            # 16 images: 2 steps an epoch
LORA = {"iterations": 3, "batch_size": 6, "dropout": 0.0, "lr": 1e-3}   # batches of 6, 6, 4


def train_methods(task):
    import workbench as wb

    coop = wb.get_method("coop", **COOP).fit(task)
    lora = wb.get_method("clip_lora", **LORA).fit(task)
    return {"coop.ctx": coop.ctx, **{f"lora.{k}": v.detach().clone() for k, v in lora.model.state_dict().items()
                                     if "lora_" in k}}


# -- the torchrun side -----------------------------------------------------------------------------

def _worker(out: Path) -> None:
    rank = int(os.environ["RANK"])
    saves = []
    real_save = training._write_checkpoint
    training._write_checkpoint = lambda tensors, meta, path: (saves.append(str(path)), real_save(tensors, meta, path))[1]
    result = {}
    seen = []
    result["small"], history = train_small(seen=seen)
    result["seen"], result["world_size"], result["loss"] = seen, history["world_size"], history["loss"]
    train_small(checkpoint_dir=out / "ckpt", stop_after_epoch=2)                 # interrupted
    result["small_resumed"], history = train_small(checkpoint_dir=out / "ckpt")  # resumed from epoch 2
    result["resumed_from"] = history["resumed_from_epoch"]
    seen = []
    result["dropout"], _ = train_small(p=0.3, seen=seen)
    result["dropout_seeds"] = {s for _, s in seen}
    train_small(p=0.3, checkpoint_dir=out / "ckpt_dropout", stop_after_epoch=2)
    result["dropout_resumed"], _ = train_small(p=0.3, checkpoint_dir=out / "ckpt_dropout")
    local = out / f"node{rank}"   # node-local storage: process 1 never sees process 0's checkpoint
    train_small(checkpoint_dir=local, stop_after_epoch=2)
    try:
        train_small(checkpoint_dir=local)
        result["unshared"] = None
    except ConfigError as err:
        result["unshared"] = str(err)
    result["methods"] = train_methods(_task())
    result["saves"] = saves
    torch.save(result, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
                           "--master_addr=127.0.0.1", f"--master_port={port}", __file__, str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def test_two_processes_end_with_the_single_process_weights(ddp_runs):
    ranks, _ = ddp_runs
    single, history = train_small()
    for r in ranks:
        assert r["world_size"] == WORLD
        diff = _max_diff(r["small"], single)
        assert diff < F64_TOL, diff
        assert torch.equal(r["small"]["unused"], torch.ones(2, dtype=torch.float64))  # no weight decay without a grad
        # the logged loss is the global batch's mean, as in the single-process run
        assert torch.allclose(torch.tensor(r["loss"]), torch.tensor(history["loss"]), atol=F64_TOL, rtol=0)
    assert history["world_size"] == 1


def test_each_process_trains_on_its_own_slice_of_the_global_batch(ddp_runs):
    ranks, _ = ddp_runs
    # global batches 4, 3, 1 per epoch, 4 epochs: halves 2+2, 1+2, and 0 (a weight-0 placeholder) + 1
    assert [n for n, _ in ranks[0]["seen"]] == [2, 1, 1] * 4
    assert [n for n, _ in ranks[1]["seen"]] == [2, 2, 1] * 4
    # each process draws its own dropout masks: process 0 keeps the run's torch seed, the others get their own
    assert ranks[0]["dropout_seeds"] == {3}
    assert len(ranks[1]["dropout_seeds"]) == 1 and 3 not in ranks[1]["dropout_seeds"]


def test_interrupted_two_process_run_resumes_to_the_same_weights(ddp_runs):
    ranks, out = ddp_runs
    single, _ = train_small()
    for r in ranks:
        assert r["resumed_from"] == 2
        assert _max_diff(r["small_resumed"], single) < F64_TOL
        # with dropout each process draws its own masks; every process's RNG is checkpointed, so the
        # resumed run is the uninterrupted two-process run bit for bit
        assert _max_diff(r["dropout_resumed"], r["dropout"]) == 0
    assert _max_diff(ranks[0]["dropout"], ranks[1]["dropout"]) == 0   # DDP keeps the processes in step
    # process 0 alone wrote the checkpoints
    assert ranks[0]["saves"] and not ranks[1]["saves"]
    meta = training.read_checkpoint_header(out / "ckpt" / training.CHECKPOINT_NAME)
    tensors = training.read_checkpoint_tensors(out / "ckpt" / training.CHECKPOINT_NAME)
    assert meta["ranks"] == WORLD and all(f"rng/rank/{r}" in tensors for r in range(WORLD))


def test_a_checkpoint_dir_the_processes_do_not_all_see_is_refused(ddp_runs):
    ranks, _ = ddp_runs
    for r in ranks:   # refused on both processes (none is left waiting), after 2 epochs of 3 steps
        assert r["unshared"] is not None and "do not see the same checkpoint" in r["unshared"]
        assert "resume step by process: [6, None]" in r["unshared"] and "every node" in r["unshared"]


def test_coop_and_clip_lora_under_two_processes_equal_one(ddp_runs):
    ranks, _ = ddp_runs
    single = train_methods(_task())
    for r in ranks:
        assert r["methods"].keys() == single.keys()
        for k, v in single.items():
            diff = (r["methods"][k] - v).abs().max().item()
            assert diff < F32_TOL, (k, diff)
    # CLIP-LoRA trained something (the B matrices left zero)
    assert any(v.abs().max() > 0 for k, v in single.items() if "lora_B" in k)


# -- in-process: the pieces, and the check refused before any process group exists ---------------

def test_world_size_that_does_not_divide_the_global_batch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"global batch of 4 samples.*3 processes.*multiple of 3 \(e\.g\. 3 or 6\)"
                                          r".*divide 4 \(2, 4\)"):
        train_small()
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_world_size_check_uses_the_configured_batch_not_a_short_support_set(monkeypatch):
    # CoOp with 19 support images and batch_size 32 trains on one batch of 19: fine on 2 processes
    # (shared 9 + 10, weighted); the check is on the configured global batch
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    module = nn.Linear(2, 1)

    def batches(epoch, gen):
        yield torch.ones(19, 2)

    with pytest.raises(ConfigError, match=r"^CoOp: the global batch of 32 samples .* 3 processes.*e\.g\. 30 or 33"):
        training.train(module, lambda b: module(b).mean(), batches, training.TrainConfig(epochs=1),
                       device=torch.device("cpu"), desc="CoOp", batch_size=32, show_progress=False)


def test_out_of_memory_in_a_step_says_how_to_fit(monkeypatch):
    module = nn.Linear(2, 1)

    def loss_fn(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.8 GiB total)")

    def batches(epoch, gen):
        yield torch.ones(32, 2), torch.zeros(32)

    with pytest.raises(training.TrainingOutOfMemory, match=r"^CLIP-LoRA: out of cpu memory at step 0 \(a batch of 32 "
                       r"samples\): CUDA out of memory\. Tried to allocate 2\.00 GiB.*torchrun --nproc_per_node N "
                       r"\(the result is unchanged\).*precision='amp_bf16'.*lower batch_size") as info:
        training.train(module, loss_fn, batches, training.TrainConfig(epochs=1), device=torch.device("cpu"),
                       desc="CLIP-LoRA", show_progress=False)
    assert info.value.__suppress_context__  # the message, not a torch trace


def test_a_single_short_batch_per_epoch_needs_no_divisible_size():
    # a method that does not pass batch_size, with its support set smaller than one batch: the one
    # batch of 19 is shared 9 + 10 with weights (exact), so there is nothing to refuse
    def one_batch(epoch, gen):
        yield torch.ones(19, 2), torch.zeros(19)

    def two_batches(epoch, gen):
        yield torch.ones(19, 2), torch.zeros(19)
        yield torch.ones(3, 2), torch.zeros(3)

    assert distributed.nominal_batch_size(one_batch, torch.Generator()) is None
    assert distributed.nominal_batch_size(two_batches, torch.Generator()) == 19


def test_image_batch_slices_hold_the_single_process_pixels():
    from PIL import Image
    import torchvision.transforms as T

    images = [Image.new("RGB", (16, 16), (20 * i, 255 - 20 * i, 7 * i)) for i in range(7)]
    batches = training.ImageBatches(images, list(range(7)), T.Compose([T.RandomResizedCrop(8), T.ToTensor()]),
                                    batch_size=4, seed=3, device=torch.device("cpu"))
    whole = list(batches(1, torch.Generator().manual_seed(9)))
    parts = [list(batches.shard(1, torch.Generator().manual_seed(9), r, WORLD)) for r in range(WORLD)]
    for i, (pixels, labels) in enumerate(whole):
        (p0, l0), w0 = parts[0][i]
        (p1, l1), w1 = parts[1][i]
        assert torch.equal(torch.cat([p0, p1]), pixels) and torch.equal(torch.cat([l0, l1]), labels)
        assert (w0, w1) == ((1.0, 1.0) if len(labels) == 4 else (2 / 3, 4 / 3))
    assert batches.batch_size == 4


def test_shard_bounds_weights_average_to_the_global_mean():
    for n in range(1, 12):
        for world in (2, 3, 4):
            shares = [distributed.shard_bounds(n, r, world) for r in range(world)]
            per_sample = torch.arange(n, dtype=torch.float64) ** 2
            mean = sum(w * per_sample[lo:hi].mean() for lo, hi, w in shares) / world
            assert torch.isclose(mean, per_sample.mean(), rtol=1e-12)
            assert sum(hi - lo for lo, hi, w in shares if w) == n


def test_plain_run_and_single_process_torchrun_are_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.torchrun_env() is None and distributed.is_main_process()
    assert distributed.default_cuda_device() == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup(torch.device("cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert not distributed.is_main_process() and distributed.default_cuda_device() == torch.device("cuda", 1)


def test_mps_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="CUDA \\(nccl\\) or CPU \\(gloo\\).*device='cpu'"):
        distributed.setup(torch.device("mps"))


def test_each_torchrun_process_gets_its_own_gpu(monkeypatch):
    from workbench.backbones import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    # a process on another process's GPU is refused before the process group is joined
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1\) would train on cuda:0.*device='auto'"):
        distributed.setup(torch.device("cuda"))
    monkeypatch.setenv("LOCAL_RANK", "2")   # a third process on a node with two GPUs
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=2 has no GPU of its own: this node has 2.*--nproc_per_node"):
        resolve_device("auto")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_device("auto") == torch.device("cuda")


def test_only_process_zero_writes_results(monkeypatch, tmp_path):
    import workbench as wb
    from workbench.results import ResultsTable

    backbone, ds = _backbone_and_data()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        out = tmp_path / f"rank{rank}"
        res = wb.run_experiment(ds, backbone, "zero_shot", 1, 0, out_dir=out)
        ResultsTable(out).append({**res.row, "cell_id": "c"})
        written = sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
        assert written == ([] if rank == "1" else ["provenance.json", "results.csv"]), written


if __name__ == "__main__":  # one torchrun process of ddp_runs
    _worker(Path(sys.argv[1]))
