"""Data-parallel training of one run under ``torchrun`` (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node N script.py`` starts N copies of a script; each finds its place in the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).
:func:`workbench.training.train` calls :func:`setup`: in a plain ``python`` run (no
``WORLD_SIZE`` or ``WORLD_SIZE=1``) it returns None and nothing changes; under torchrun it joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU) and the loop trains data-parallel:

* every process builds the same global batches (same seeds, same order) and keeps a contiguous
  slice ``[rank·B/N, (rank+1)·B/N)`` of each (:func:`shard_bounds`). Augmentation is seeded per
  (seed, epoch, image) (:class:`workbench.training.ImageBatches`), so a slice holds exactly the
  pixels the single process computes at those positions, and an image-batch source computes only
  its own slice;
* the trainable parameters, and only those, are registered with ``DistributedDataParallel``, which
  averages their gradients over the processes during ``backward``. With equal slices the mean of
  the slices' mean-loss gradients is the global batch's mean-loss gradient, so the step, the
  learning-rate schedule (counted in global steps) and the weights equal the single-process run's,
  up to the order of floating-point sums;
* a last batch that does not split evenly is weighted: a process's loss is multiplied by
  ``share·N/B`` so the average is still the global mean. A process whose share is empty runs one
  placeholder sample with weight 0 (every process must take part in each gradient all-reduce);
* the configured global batch must be a multiple of the process count (:func:`check_global_batch`,
  raised on every process before the process group is joined);
* process 0 alone writes checkpoints, results rows and run files; every process's RNG state goes
  into the checkpoint, so a resumed run continues each process's dropout stream; on resume every
  process reads the same checkpoint (a check refuses a ``checkpoint_dir`` they do not all see);
* on CUDA each process uses ``cuda:LOCAL_RANK`` (``device="auto"`` resolves to it).

Where exact equality ends: randomness drawn inside a step (dropout, e.g. CLIP-LoRA's 0.25 on the
LoRA input) is drawn per process on its slice (process 0 keeps the run's seed, the others get
their own), so such runs are equal in distribution, not bit for bit. A loss must be a mean of
per-sample terms plus terms that do not depend on the batch (CoOp and KgCoOp, CoCoOp, MaPLe,
CLIP-LoRA, CLIP-SVD, Tip-Adapter-F); BiomedCoOp's description selection uses statistics of the
batch, computed per slice here, so its runs differ slightly from a single process's.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> DistContext | None:
    """The context torchrun's environment describes, or None for a single-process run."""
    if os.environ.get("WORLD_SIZE") is None:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); got "
                          f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}, "
                          f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}.") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1}); start the job with torchrun.")
    return DistContext(rank, world, local)


def is_main_process() -> bool:
    """True in a single-process run and in torchrun's process 0: the one that writes files."""
    ctx = torchrun_env()
    return ctx is None or ctx.is_main


def default_cuda_device() -> torch.device:
    """The GPU ``device="auto"`` means: ``cuda:LOCAL_RANK`` under torchrun (one GPU per process), else ``cuda``."""
    ctx = torchrun_env()
    if ctx is None:
        return torch.device("cuda")
    if ctx.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"torchrun process LOCAL_RANK={ctx.local_rank} has no GPU of its own: this node has "
                          f"{torch.cuda.device_count()}. Start at most that many processes per node "
                          "(torchrun --nproc_per_node); each process trains on one GPU.")
    return torch.device("cuda", ctx.local_rank)


def _divisors(n: int, limit: int = 16) -> list[int]:
    return [d for d in range(2, min(n, limit) + 1) if n % d == 0]


def check_global_batch(batch_size: int, world_size: int, where: str) -> None:
    """ConfigError unless the processes can share the global batch equally (the run must not change with N)."""
    if batch_size % world_size == 0:
        return
    lower = batch_size // world_size * world_size
    multiples = [m for m in (lower, lower + world_size) if m > 0]
    counts = _divisors(batch_size)
    raise ConfigError(
        f"{where}: the global batch of {batch_size} samples cannot be split equally over {world_size} processes "
        f"(torchrun --nproc_per_node / WORLD_SIZE = {world_size}). Set batch_size to a multiple of {world_size} "
        f"(e.g. {' or '.join(map(str, multiples))}), or start as many processes as divide {batch_size}"
        + (f" ({', '.join(map(str, counts))})" if counts else " (only 1)")
        + ". The global batch is what a single process would train on, so the run's result does not depend on "
          "the process count.")


def setup(device: torch.device, where: str = "train") -> DistContext | None:
    """Join torchrun's process group (once per process); None in a single-process run."""
    ctx = torchrun_env()
    if ctx is None:
        return None
    import torch.distributed as dist

    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{where}: data-parallel training under torchrun runs on CUDA (nccl) or CPU (gloo), not "
                          f"on {device.type!r}; load the backbone with device='cpu' or run without torchrun.")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index != ctx.local_rank:
            raise ConfigError(
                f"{where}: process {ctx.rank} (LOCAL_RANK={ctx.local_rank}) would train on cuda:{index}; under "
                "torchrun each process needs its own GPU. Load the backbone with device='auto' (it picks "
                f"cuda:LOCAL_RANK under torchrun) or device=f'cuda:{{LOCAL_RANK}}', and start at most as many "
                f"processes per node as there are GPUs ({torch.cuda.device_count()} here).")
        torch.cuda.set_device(index)
    if not dist.is_available():
        raise ConfigError(f"{where}: this PyTorch build has no torch.distributed; run without torchrun.")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    elif dist.get_world_size() != ctx.world_size:
        raise ConfigError(f"{where}: the process group has {dist.get_world_size()} processes but WORLD_SIZE is "
                          f"{ctx.world_size}.")
    return ctx


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# -- sharding the global batches ------------------------------------------------------------------

def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int, float]:
    """This process's slice ``[lo, hi)`` of a batch of ``n`` and the weight of its mean loss.

    The weight ``(hi - lo)·N/n`` makes the average over processes of the weighted slice means equal
    the batch mean (it is exactly 1.0 when N divides n). An empty share becomes the placeholder
    slice ``[0, 1)`` with weight 0.
    """
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    if hi == lo:
        return 0, 1, 0.0
    return lo, hi, (hi - lo) * world_size / n


def batch_length(batch) -> int | None:
    """The first dimension of the first tensor in a (nested) tuple / list / dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        n = batch_length(item)
        if n is not None:
            return n
    return None


def slice_batch(batch, lo: int, hi: int, n: int):
    """Rows ``lo:hi`` of every tensor whose first dimension is the batch's ``n``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, lo, hi, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, lo, hi, n) for v in batch)
    return batch


def shard_batches(epoch_batches: Callable, ctx: DistContext, where: str) -> Callable[[int, torch.Generator], Iterable]:
    """``epoch_batches`` as ``(local_batch, weight)`` pairs for this process.

    A source with a ``shard(epoch, generator, rank, world_size)`` method (image batches) builds only
    its slice; any other is built whole (same seeds on every process) and sliced here.
    """
    if hasattr(epoch_batches, "shard"):
        return lambda epoch, gen: epoch_batches.shard(epoch, gen, ctx.rank, ctx.world_size)

    def sliced(epoch, gen):
        for batch in epoch_batches(epoch, gen):
            n = batch_length(batch)
            if n is None:
                raise ConfigError(f"{where}: cannot share a batch of type {type(batch).__name__} between torchrun "
                                  "processes: yield tensors (or tuples / dicts of tensors) with the batch on the "
                                  "first dimension.")
            lo, hi, weight = shard_bounds(n, ctx.rank, ctx.world_size)
            yield slice_batch(batch, lo, hi, n), weight

    return sliced


def nominal_batch_size(epoch_batches: Callable, generator: torch.Generator) -> int | None:
    """The global batch size: the source's ``batch_size`` attribute, else the size of its first batch.

    None when an epoch is a single batch (a support set smaller than one batch): that batch is
    shared unequally with weights, which is exact, so there is nothing to refuse.
    """
    size = getattr(epoch_batches, "batch_size", None)
    if size is not None:
        return int(size)
    batches = iter(epoch_batches(0, generator))
    first, second = next(batches, None), next(batches, None)
    return None if first is None or second is None else batch_length(first)


# -- gradients and the values every process must agree on --------------------------------------

class _TrainableParameters(torch.nn.Module):
    """The trainable parameters (the same tensors, not copies) with the method's loss as ``forward``.

    DDP averages the gradients of the parameters it holds; registering only the trainable ones
    keeps the frozen backbone out of its broadcasts and buckets. The loss function reaches the
    parameters through the method's own module, so their gradient hooks fire as usual.
    """

    def __init__(self, params, loss_fn: Callable):
        super().__init__()
        self.trainable = torch.nn.ParameterList(params)
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


def data_parallel(params, loss_fn: Callable, device: torch.device) -> torch.nn.Module:
    """``loss_fn`` behind DDP: calling the result runs the loss and makes ``backward`` average gradients.

    Building it broadcasts process 0's trainable values to all. ``static_graph``: every step's loss
    reaches the same trainable tensors (true of each method's loss), so DDP learns in the first
    step which ones a method holds but never uses; their gradients stay None, as in a single
    process, without ``find_unused_parameters``' graph walk at every step.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    if device.type == "cuda":   # "cuda" without an index: the current device, which setup() made LOCAL_RANK
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(_TrainableParameters(params, loss_fn), device_ids=device_ids, static_graph=True)


def global_mean_loss(loss: torch.Tensor, weight: float, ctx: DistContext) -> float:
    """The global batch's mean loss from each process's slice mean (NaN anywhere gives NaN everywhere)."""
    import torch.distributed as dist

    total = loss.detach().reshape(1).to(torch.float64) * (weight / ctx.world_size)
    dist.all_reduce(total)
    return float(total)


def all_gather(value) -> list:
    """Every process's ``value`` (picklable), in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value, src: int = 0):
    """Process ``src``'s ``value`` on every process."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity mask (``taskset``, a container's cpuset, a
    batch scheduler's allocation), not the machine's count that ``os.cpu_count()`` reports."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # no affinity on this platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


#: the most decoder processes one GPU process gets (decoding rarely needs more to feed one GPU)
MAX_DECODERS_PER_PROCESS = 8


def decoder_budget(processes: int | None = None) -> int:
    """DataLoader decoder processes one GPU process may start when ``processes`` of them share this
    machine's usable cores (default: torchrun's ``LOCAL_WORLD_SIZE``, else 1): its share of
    :func:`usable_cpus` less one core for the process itself, at most :data:`MAX_DECODERS_PER_PROCESS`."""
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = usable_cpus() // max(1, int(processes))
    return max(0, min(MAX_DECODERS_PER_PROCESS, share - 1))
