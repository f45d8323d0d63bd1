"""The one training loop every trained method goes through.

What it takes care of, so a method only writes its loss:

* device and precision: autocast (fp16/bf16) on CUDA with a gradient scaler for fp16, fp32 on
  CPU and MPS;
* the learning-rate schedule, set explicitly at every step from (step, epoch): per-iteration
  cosine (Tip-Adapter-F, CLIP-LoRA: ``CosineAnnealingLR`` stepped each iteration) or Dassl's
  per-epoch cosine after a constant warm-up epoch (CoOp). No scheduler object holds state, so
  a resumed run gets exactly the same learning rates;
* optional gradient clipping; deterministic seeding (batch order per epoch comes from a
  generator seeded by (seed, epoch); the CPU and every CUDA generator's state are checkpointed
  for dropout);
* a progress bar with loss and learning rate;
* a NaN/inf guard: training stops with the step, epoch and a hint when the loss or, after the
  update, a trained parameter is not finite. Under fp16 autocast the gradient scaler's skipped
  steps (scale lowered after an overflow) are counted (``history["skipped_steps"]``) and stop the
  run only when :data:`SCALER_SKIP_LIMIT` follow each other;
* periodic checkpoints (atomic) of the trainable state, optimizer, scaler, RNG and counters, so
  an interrupted run resumes where it stopped and ends with the same weights. A checkpoint cannot
  run code when read: tensors in safetensors, everything else JSON in its header, and the header
  (run identity, settings, precision) is checked before any tensor is read. A 0-byte or truncated
  file is a :class:`CheckpointError` naming it; a checkpoint written in another precision is not
  resumed (a warning, a fresh start); old pickled ``last.pt`` files are never read;
* checkpoints that belong to their run: given the run's ``identity`` (data fingerprint, split ids,
  backbone, method name and config: :meth:`workbench.methods.base.Method.checkpoint_identity`), a
  run keeps its checkpoint in ``checkpoint_dir/run-<hash of identity>/``. A ``checkpoint_dir``
  reused for another dataset, split, backbone or configuration therefore starts fresh (with a
  warning saying so) and never resumes another run's weights;
* on CPU, one warning with the expected total time (measured on the first steps) and how to
  shorten the run, since the reference schedules are GPU settings;
* under ``torchrun --nproc_per_node N``, data-parallel training (:mod:`workbench.distributed`):
  each process trains on its slice of the same global batch, DDP averages the gradients, and the
  run ends with the single-process run's weights; process 0 alone writes checkpoints. A plain
  ``python`` run is unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import distributed
from .backbones import autocast_context
from .errors import ConfigError, WorkbenchError
from .progress import progress


class TrainingDiverged(WorkbenchError, RuntimeError):
    """The loss became NaN or infinite."""


class TrainingOutOfMemory(WorkbenchError, RuntimeError):
    """A training step did not fit in the device's memory."""


def _out_of_memory(desc: str, device: torch.device, step: int, batch, dist_ctx, err) -> TrainingOutOfMemory:
    """The fixes, in the order that keeps the run closest to the reference's."""
    n = distributed.batch_length(batch)
    where = f"{n} samples" + (f" per process, {dist_ctx.world_size} processes" if dist_ctx is not None else "")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    said = f": {first_line}" if first_line else ""
    return TrainingOutOfMemory(
        f"{desc}: out of {device.type} memory at step {step} (a batch of {where}){said}. "
        "Share the same global batch over more GPUs with torchrun --nproc_per_node N (the result is unchanged), "
        "train in mixed precision (load the backbone with precision='amp_bf16' or 'amp_fp16'), or lower "
        "batch_size (the run then differs from the reference's). Other processes on the GPU hold memory too "
        "(nvidia-smi).")


@dataclass
class TrainConfig:
    epochs: int = 20
    #: stop after this many optimizer steps (CLIP-LoRA counts iterations, not epochs); None = epochs only
    max_steps: int | None = None
    optimizer: str = "adamw"             # "adamw" or "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    #: "cosine_step" (per iteration, eta_min at the last step), "cosine_epoch" (Dassl, per epoch), "constant"
    schedule: str = "cosine_step"
    eta_min: float = 0.0
    warmup_epochs: int = 0               # Dassl constant warm-up: lr = warmup_lr for these epochs
    warmup_lr: float = 1e-5
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int | None = None  # epochs between checkpoints (needs a checkpoint_dir)


def learning_rate(cfg: TrainConfig, step: int, epoch: int, total_steps: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine_step":
        t = min(step, total_steps) / max(total_steps, 1)
        return cfg.eta_min + (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * t)) / 2
    if cfg.schedule == "cosine_epoch":
        if epoch < cfg.warmup_epochs:
            return cfg.warmup_lr
        t = (epoch - cfg.warmup_epochs) / max(cfg.epochs, 1)
        return cfg.eta_min + (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * t)) / 2
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'sgd'")


class CheckpointError(WorkbenchError, RuntimeError):
    """A checkpoint file that cannot be read or does not belong to this run."""


#: the file a run's checkpoint lives in (inside its ``run-<hash>/`` folder)
CHECKPOINT_NAME = "last.safetensors"
#: written into every checkpoint's header; a reader refuses any other value
CHECKPOINT_FORMAT = "workbench-checkpoint/1"
#: the pickled checkpoints older versions wrote: never read (unpickling runs code), only reported
LEGACY_CHECKPOINT_NAME = "last.pt"


def _normalised(obj):
    """``obj`` as JSON gives it back (tuples become lists): what a checkpoint's header can compare equal to."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _write_checkpoint(tensors: dict, meta: dict, path: Path) -> None:
    """Tensors in safetensors, everything else as JSON in its header; atomic (the older file stays until done).

    Nothing in the file can execute code when read: safetensors holds raw tensor bytes, the header
    plain JSON (identity, settings, counters, history, optimizer hyper-parameters, scaler numbers).
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp,
                  metadata={"workbench": json.dumps(_normalised(meta))})
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"cannot write the checkpoint {path}: {err.strerror or err} (full disk or read-only "
                              "checkpoint_dir?). The previous checkpoint, if any, is intact; free space or pass "
                              "another checkpoint_dir.") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint_header(path) -> dict:
    """The JSON part of a checkpoint (identity, settings, counters), read without touching any tensor.

    A 0-byte, truncated or foreign file is a :class:`CheckpointError` naming the file and the fix.
    """
    from safetensors import safe_open

    path = Path(path)
    fix = "delete it (the run then starts fresh) or pass another checkpoint_dir"
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"cannot read the checkpoint {path}: {err.strerror or err}.") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes: an interrupted copy?); {fix}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get("workbench")
    except Exception as err:  # safetensors raises its own error type for every malformed header
        raise CheckpointError(f"checkpoint {path} is truncated or not a workbench checkpoint ({err}); {fix}.") from None
    try:
        meta = json.loads(header) if header is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file (written by another program or "
                              f"version); {fix}.")
    return meta


def read_checkpoint_tensors(path) -> dict:
    """The tensors of a checkpoint (call after :func:`read_checkpoint_header` accepted it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: its tensors cannot be read ({err}); delete it or pass another "
                              "checkpoint_dir.") from None


def _optimizer_to_file(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer state dict as (tensors, JSON): per-parameter tensors keyed ``optimizer/<id>/<name>``."""
    tensors, plain = {}, {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain}


def _optimizer_from_file(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["state"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _grad_scaler(device: torch.device, precision: str):
    """The gradient scaler: active for fp16 autocast on CUDA only."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "amp_fp16")


def _cuda_rng_states() -> list:
    """Every CUDA generator's state (dropout on the GPU draws from these), or [] without CUDA."""
    return list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []


def _params_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())


#: under fp16 autocast, stop when the gradient scaler skips this many steps in a row (its scale then has
#: fallen by 2**25 from where it was: the gradients are not finite at any scale)
SCALER_SKIP_LIMIT = 25


#: warn on CPU when a run is expected to take longer than this (seconds)
CPU_WARN_SECONDS = 120.0
#: the run length (seconds) the CPU warning's suggested setting aims at
CPU_SUGGESTED_SECONDS = 120.0
_CPU_WARNED: set[str] = set()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _warn_slow_cpu(desc: str, per_step: float, remaining: int, total: int, steps_per_epoch: int,
                   hint: str | None) -> None:
    """Once per process and ``desc``: the reference schedules are GPU settings, say what they cost here.

    ``hint`` may name ``{steps}`` and ``{epochs}``: the setting that would take about
    :data:`CPU_SUGGESTED_SECONDS` at the measured speed (e.g. ``"iterations={steps}"``).
    """
    expected = per_step * remaining
    if desc in _CPU_WARNED or expected < CPU_WARN_SECONDS:
        return
    _CPU_WARNED.add(desc)
    steps = max(1, int(CPU_SUGGESTED_SECONDS / max(per_step, 1e-9)))
    how = (hint or "fewer epochs or iterations").format(steps=steps, epochs=max(1, steps // max(steps_per_epoch, 1)))
    warnings.warn(f"{desc}: training on the CPU, {total} steps at ~{per_step:.2f} s each: about "
                  f"{_duration(expected)} to go. The default schedule is the reference's GPU setting; on a CPU "
                  f"pass {how} (about {_duration(CPU_SUGGESTED_SECONDS)}) to shorten it; the result then differs "
                  "from the paper's protocol.", stacklevel=3)


def checkpoint_folder(checkpoint_dir, identity: dict | None) -> Path:
    """Where a run keeps its checkpoint: ``checkpoint_dir`` itself without an identity, else its own sub-folder."""
    if identity is None:
        return Path(checkpoint_dir)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(checkpoint_dir) / f"run-{digest}"


def train(module: torch.nn.Module, loss_fn: Callable[[object], torch.Tensor],
          epoch_batches: Callable[[int, torch.Generator], Iterable], cfg: TrainConfig, *,
          device: torch.device, precision: str = "fp32", checkpoint_dir=None, identity: dict | None = None,
          steps_per_epoch: int | None = None, desc: str = "train", show_progress: bool = True,
          stop_after_epoch: int | None = None, on_epoch_end: Callable[[int], None] | None = None,
          cpu_hint: str | None = None, batch_size: int | None = None) -> dict:
    """Optimise the trainable parameters of ``module``; returns a history dict.

    ``epoch_batches(epoch, generator)`` yields the batches of one epoch (use the generator for
    any shuffling); ``loss_fn(batch)`` runs the forward pass and returns the loss. With
    ``checkpoint_dir`` the run resumes from its checkpoint if it exists: methods pass
    ``identity`` (:meth:`~workbench.methods.base.Method.checkpoint_identity`), which gives every
    (data, split, backbone, method config) its own sub-folder, so a checkpoint is only ever
    resumed by the run that wrote it. ``stop_after_epoch`` ends the run early (used by tests to
    simulate an interruption); ``on_epoch_end(epoch)`` runs after each epoch (e.g.
    validation-based epoch selection). ``cpu_hint`` says how to shorten the run (e.g.
    ``"iterations={steps}"``, filled with the affordable count) in the one warning given when a
    CPU run is expected to be long.

    Under torchrun the processes share each global batch (:mod:`workbench.distributed`);
    ``batch_size`` (the configured global batch; default: ``epoch_batches.batch_size``, else the
    size of the first of several batches) must be a multiple of the process count. Shorter batches
    (the last one, or a support set smaller than one batch) are shared unequally and weighted, exactly.
    """
    if cfg.epochs < 1:
        raise WorkbenchError(f"{desc}: epochs must be at least 1, got {cfg.epochs}.")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires grad)")
    dist_ctx = distributed.torchrun_env()
    if dist_ctx is not None:
        # refused on every process before the process group exists: no process is left waiting for the others
        global_batch = batch_size or distributed.nominal_batch_size(epoch_batches,
                                                                     torch.Generator().manual_seed(cfg.seed))
        if global_batch is not None:
            distributed.check_global_batch(global_batch, dist_ctx.world_size, desc)
        dist_ctx = distributed.setup(device, desc)
    is_main = dist_ctx is None or dist_ctx.is_main
    optimizer = _optimizer(cfg, params)
    scaler = _grad_scaler(device, precision)
    steps_per_epoch = steps_per_epoch or sum(1 for _ in epoch_batches(0, torch.Generator().manual_seed(0)))
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if cfg.epochs else cfg.max_steps
    history = {"loss": [], "lr": [], "epoch_loss": [], "resumed_from_epoch": None, "skipped_steps": 0}
    step, start_epoch, state = 0, 0, None
    folder = checkpoint_folder(checkpoint_dir, identity) if checkpoint_dir else None
    ckpt_path = folder / CHECKPOINT_NAME if folder is not None else None
    if folder is not None and (folder / LEGACY_CHECKPOINT_NAME).exists() and is_main:
        warnings.warn(f"{desc}: {folder / LEGACY_CHECKPOINT_NAME} is a checkpoint in the old pickle format, which "
                      "is never read (unpickling a file can run code). This run starts fresh and writes "
                      f"{CHECKPOINT_NAME}; delete the old file when done.", stacklevel=2)
    if ckpt_path is not None and not ckpt_path.exists() and identity is not None and is_main:
        others = sorted(p.parent.name for p in Path(checkpoint_dir).glob(f"run-*/{CHECKPOINT_NAME}"))
        others += [f"{CHECKPOINT_NAME} (no identity)"] if (Path(checkpoint_dir) / CHECKPOINT_NAME).exists() else []
        if others:
            warnings.warn(f"{desc}: checkpoint_dir {str(checkpoint_dir)!r} holds checkpoint(s) of {len(others)} other "
                          f"run(s) ({', '.join(others[:3])}): other data, split, backbone or settings. This run "
                          f"does not resume them; it starts fresh in {ckpt_path.parent.name}/.", stacklevel=2)
    if ckpt_path is not None and ckpt_path.exists():
        # the run identity, settings and precision are checked from the JSON header before any tensor is read
        meta = read_checkpoint_header(ckpt_path)
        if meta.get("identity") != _normalised(identity):
            raise CheckpointError(f"checkpoint {ckpt_path} belongs to another run (its data, backbone or method "
                                  "settings differ); delete it or use another checkpoint_dir.")
        if meta.get("config") != _normalised(asdict(cfg)):
            raise CheckpointError(f"checkpoint {ckpt_path} was written with other training settings; delete it or "
                                  "use another checkpoint_dir.")
        if meta.get("precision") != precision:
            if is_main:
                warnings.warn(f"{desc}: checkpoint {ckpt_path} was written in precision {meta.get('precision')!r} "
                              f"on {meta.get('device_type')!r}; this run uses {precision!r} on {device.type!r}, so it "
                              "does not resume it and starts fresh (its next checkpoint replaces that one).",
                              stacklevel=2)
        else:
            state = meta
            tensors = read_checkpoint_tensors(ckpt_path)
            prefix = "trainable/"
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                   strict=False)
            optimizer.load_state_dict(_optimizer_from_file(tensors, meta["optimizer"]))
            if scaler.is_enabled() and meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            # else: written without a scaler (CPU, fp32/bf16): the scaler starts from its initial scale
            torch.set_rng_state(tensors["rng/cpu"])
            cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(meta.get("cuda_generators", 0))]
            if device.type == "cuda" and torch.cuda.is_available():
                if len(cuda_states) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(cuda_states)
                elif is_main:
                    warnings.warn(f"{desc}: checkpoint {ckpt_path} holds {len(cuda_states)} CUDA generator state(s), "
                                  f"this machine has {torch.cuda.device_count()} GPU(s): the run resumes, but "
                                  "its GPU random draws (dropout) differ from an uninterrupted run.", stacklevel=2)
            state["rng_by_rank"] = [tensors[f"rng/rank/{r}"] for r in range(meta.get("ranks", 0))]
            step, start_epoch, history = meta["step"], meta["epoch"], meta["history"]
            history.setdefault("skipped_steps", 0)
            history["resumed_from_epoch"] = start_epoch
    if dist_ctx is not None:
        if ckpt_path is not None:
            seen = distributed.all_gather(step if state is not None else None)
            if len(set(seen)) > 1:
                raise ConfigError(f"{desc}: the torchrun processes do not see the same checkpoint {ckpt_path} "
                                  f"(resume step by process: {seen}). Put checkpoint_dir on storage every process "
                                  "(every node) reads and writes.")
        by_rank = (state or {}).get("rng_by_rank") or []
        if len(by_rank) == dist_ctx.world_size:
            torch.set_rng_state(by_rank[dist_ctx.rank])
        elif dist_ctx.rank > 0:
            # randomness inside a step (dropout) must differ between the processes' slices
            torch.manual_seed(cfg.seed * 1_000_003 + 7_919 * dist_ctx.rank + step)
        # gradients averaged over the processes in backward; process 0's trainable values broadcast now
        compute_loss = distributed.data_parallel(params, loss_fn, device)
        batch_source = distributed.shard_batches(epoch_batches, dist_ctx, desc)
    else:
        compute_loss = loss_fn
        batch_source = lambda epoch, gen: ((batch, 1.0) for batch in epoch_batches(epoch, gen))  # noqa: E731
    history["world_size"] = dist_ctx.world_size if dist_ctx is not None else 1

    trainable_names = {n for n, p in module.named_parameters() if p.requires_grad}

    def checkpoint(epoch_done: int):
        if ckpt_path is None:
            return
        # every process's RNG (dropout), so that each resumes its own stream; process 0 writes
        rng_by_rank = distributed.all_gather(torch.get_rng_state()) if dist_ctx is not None else None
        if not is_main:
            return
        tensors = {f"trainable/{k}": v for k, v in module.state_dict().items() if k in trainable_names}
        opt_tensors, opt_meta = _optimizer_to_file(optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors["rng/cpu"] = torch.get_rng_state()
        cuda_states = _cuda_rng_states()
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(cuda_states)})
        tensors.update({f"rng/rank/{r}": s for r, s in enumerate(rng_by_rank or [])})
        meta = {"format": CHECKPOINT_FORMAT, "identity": identity, "config": asdict(cfg), "precision": precision,
                "device_type": device.type, "step": step, "epoch": epoch_done, "history": history,
                "optimizer": opt_meta, "scaler": scaler.state_dict(), "cuda_generators": len(cuda_states),
                "ranks": len(rng_by_rank or [])}
        _write_checkpoint(tensors, meta, ckpt_path)
        if identity is not None and not (ckpt_path.parent / "identity.json").exists():
            # for a person looking into checkpoint_dir: which run each sub-folder belongs to
            (ckpt_path.parent / "identity.json").write_text(json.dumps(identity, indent=1, default=str))

    # An inner bar (compare/sweep own the outer one): gone when done, not shown for runs under 2 s.
    bar = progress(total=total, initial=step, desc=desc, unit="step", disable=not (show_progress and is_main),
                   leave=False, delay=2.0)
    module.train()
    epoch = start_epoch
    first_step, timed, skipped_in_a_row = step, None, 0   # timing of the first steps, for the CPU warning
    while epoch < cfg.epochs and step < total:
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        losses = []
        for batch, weight in batch_source(epoch, gen):
            if step >= total:
                break
            lr = learning_rate(cfg, step, epoch, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                with autocast_context(device, precision):
                    loss = compute_loss(batch)
                # under torchrun: the global batch's mean loss, the same on every process (so all stop together)
                value = distributed.global_mean_loss(loss, weight, dist_ctx) if dist_ctx is not None else None
                if not (math.isfinite(value) if value is not None else torch.isfinite(loss.detach()).all()):
                    bar.close()
                    raise TrainingDiverged(f"{desc}: loss became {value if value is not None else loss.item()} at step "
                                           f"{step} (epoch {epoch}, lr {lr:.2e}). Lower the learning rate, or train in "
                                           "fp32 (precision='fp32').")
                if value is None:
                    value = float(loss.detach())
                if weight != 1.0:  # a last batch shared unequally: weighted so the average is the global mean
                    loss = loss * weight
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                if scale_before is not None and scaler.get_scale() < scale_before:
                    # fp16 gradients overflowed: the scaler skipped this update and lowered its scale
                    history["skipped_steps"] += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= SCALER_SKIP_LIMIT:
                        bar.close()
                        raise TrainingDiverged(
                            f"{desc}: the fp16 gradients overflowed at {skipped_in_a_row} steps in a row (the "
                            f"gradient scaler skipped them; last at step {step}, epoch {epoch}, lr {lr:.2e}). "
                            "Lower the learning rate, or train in bf16 or fp32 (precision='amp_bf16' or 'fp32').")
                else:
                    skipped_in_a_row = 0
                    if not _params_finite(params):
                        bar.close()
                        raise TrainingDiverged(
                            f"{desc}: the trained parameters became NaN or infinite at step {step} (epoch {epoch}, "
                            f"lr {lr:.2e}) although the loss was finite ({value:.4g}). Lower the learning rate, "
                            "or clip gradients (grad_clip).")
            except torch.cuda.OutOfMemoryError as err:
                bar.close()
                raise _out_of_memory(desc, device, step, batch, dist_ctx, err) from None
            step += 1
            if device.type == "cpu" and timed is None:
                if step == first_step + 1:
                    t_first = time.perf_counter()   # the first step warms up: time the next ones
                elif step == first_step + 3 or step == total:
                    per_step = (time.perf_counter() - t_first) / max(step - first_step - 1, 1)
                    timed = per_step
                    if is_main:
                        _warn_slow_cpu(desc, per_step, total - step, total, steps_per_epoch, cpu_hint)
            losses.append(value)
            history["loss"].append(losses[-1])
            history["lr"].append(lr)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
        history["epoch_loss"].append(sum(losses) / max(len(losses), 1))
        if on_epoch_end is not None:
            module.eval()
            on_epoch_end(epoch)
            module.train()
        epoch += 1
        if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0):
            checkpoint(epoch)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    bar.close()
    module.eval()
    if dist_ctx is not None:
        # leave every process in process 0's RNG state: what runs after training draws the same everywhere
        torch.set_rng_state(distributed.broadcast(torch.get_rng_state()))
    history["steps"] = step
    history["epochs_done"] = epoch
    return history


def _augment(transform, image, seed: int, epoch: int, index: int) -> torch.Tensor:
    """``transform(image)`` under the (seed, epoch, image) RNG seed: the same pixels in any process."""
    pair_seed = int(hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).hexdigest()[:15], 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(pair_seed)
        return transform(image)


class _AugmentedImages(torch.utils.data.Dataset):
    """``(epoch, index) -> pixels`` for the DataLoader workers of :class:`ImageBatches`."""

    def __init__(self, images, transform, seed: int):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        return _augment(self.transform, self.images[index], self.seed, epoch, index)


class _EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of a persistent loader: the ``(epoch, index)`` lists set before each pass."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageBatches:
    """Shuffled, augmented image batches of a support set, for methods that train an encoder.

    Images are decoded once and kept in memory (a few-shot support set is small). Each
    (epoch, image) gets its own augmentation seed, so batches are identical whatever the
    worker count and after resuming from a checkpoint.

    Augmentation (RandomResizedCrop + flip + normalisation: tens of milliseconds per batch of 32
    on one core) runs in persistent DataLoader worker processes (``num_workers="auto"``, see
    :func:`workbench.features.resolve_num_workers`: none when training on the CPU, for a support set
    of under two batches or inside a daemonic sweep worker), so it overlaps the training step
    instead of idling the GPU;
    batches go to the device from pinned memory on CUDA.
    """

    def __init__(self, images, labels, transform, batch_size: int, seed: int, device: torch.device,
                 num_workers: int | str = "auto"):
        self.images = list(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self._loader = None
        self._sampler = None

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def _pixels(self, epoch: int, index: int) -> torch.Tensor:
        return _augment(self.transform, self.images[index], self.seed, epoch, index)

    def _batch_indices(self, generator: torch.Generator):
        order = torch.randperm(len(self.images), generator=generator)
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def _pixel_batches(self, epoch: int, index_lists: list[list[int]]):
        """The stacked pixels of each index list: in worker processes when it pays, else here."""
        from .features import resolve_num_workers

        workers = resolve_num_workers(self.num_workers, len(self.images), self.batch_size, self.device.type)
        if workers == 0:
            for idx in index_lists:
                yield torch.stack([self._pixels(epoch, i) for i in idx])
            return
        if self._loader is None:
            self._sampler = _EpochBatches()
            self._loader = torch.utils.data.DataLoader(
                _AugmentedImages(self.images, self.transform, self.seed), batch_sampler=self._sampler,
                num_workers=workers, persistent_workers=True, pin_memory=self.device.type == "cuda",
                # its own generator: starting the workers must not draw from the global RNG that
                # dropout uses (a resumed run would draw differently); the pixels are seeded per image
                generator=torch.Generator().manual_seed(self.seed))
        self._sampler.batches = [[(epoch, i) for i in idx] for idx in index_lists]
        yield from self._loader

    def _on_device(self, pixels: torch.Tensor, idx: list[int]):
        return pixels.to(self.device, non_blocking=True), self.labels[idx].to(self.device)

    def _batch(self, epoch: int, idx: list[int]):
        return self._on_device(next(self._pixel_batches(epoch, [idx])), idx)

    def __call__(self, epoch: int, generator: torch.Generator):
        index_lists = list(self._batch_indices(generator))
        for idx, pixels in zip(index_lists, self._pixel_batches(epoch, index_lists)):
            yield self._on_device(pixels, idx)

    def shard(self, epoch: int, generator: torch.Generator, rank: int, world_size: int):
        """This torchrun process's slices of the epoch's global batches, with their loss weights.

        Only the slice's images are augmented; their seeds are those of the whole batch, so the
        pixels are the single-process run's at those positions (:mod:`workbench.distributed`).
        """
        index_lists = list(self._batch_indices(generator))
        bounds = [distributed.shard_bounds(len(idx), rank, world_size) for idx in index_lists]
        slices = [idx[lo:hi] for idx, (lo, hi, _) in zip(index_lists, bounds)]
        for idx, pixels, (_, _, weight) in zip(slices, self._pixel_batches(epoch, slices), bounds):
            yield self._on_device(pixels, idx), weight
