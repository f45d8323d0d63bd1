"""ZS-LP and CLAP: a cosine linear probe initialised from the text classifier, and its class-adaptive
constrained version (Silva-Rodríguez, Hajimiri, Ben Ayed, Dolz, "A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models", CVPR 2024; reference code jusiro/CLAP
``trainers/adapters.py``, ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``, ``train.py``).

Model (``AdapterMethod``, ``forward_lp``): class prototypes ``W`` initialised from the text
embeddings ``T``; ``logits = logit_scale · cos(f, w_c)`` (+ the backbone's logit bias, for
SigLIP; 0 for CLIP).

* **ZS-LP** (``INIT=ZS, CONSTRAINT=none``): cross-entropy only.
* **CLAP** (``CONSTRAINT=l2``): cross-entropy + ``mean_c λ_c ‖w_c − t_c‖²``. The multipliers
  (``init_lagrangian_multipliers``) are the zero-shot softmax probability of the true class,
  averaged over the support samples (all augmented views) of each class; with the default
  ``"l2"`` they stay fixed (the augmented-Lagrangian ``outer_step`` only runs for the
  ``"adaptative"`` variants, not offered here). ``multipliers`` offers the reference's other
  variants: ``"balanced"`` (all 1), ``"corrected"`` (rescaled to sum to C), ``"constant"``
  (their mean for every class).

Training (``TrainerXCostume.run_epoch``, the trainer config): the support set is encoded
``augment_views = 20`` times with Dassl's RandomResizedCrop (scale 0.08–1, Dassl's default) +
flip, and training runs on those cached features: SGD lr 0.1, momentum 0.9 (Dassl's default),
weight decay 0, batch 256, 300 epochs, cosine per epoch after one warm-up epoch at 1e-5. An
epoch is as many batches as the *un-augmented* support set gives (Dassl's loader: ⌊N/256⌋,
at least 1), each drawn from a fresh shuffle of all ``20·N`` cached views. No validation
set and no hyper-parameter search: that is the method's point. (The reference's grid-searched
baselines pick settings on the test set; nothing here does.)

Scale of the prototypes: the reference starts ``W`` at CLIP's *raw* text embeddings (their norm
depends on the backbone) and anchors the penalty there; the workbench's text classifier is
unit-norm. Because the logits are cosines, training ``r·u`` with learning rate η is the same as
training ``u`` with η/r² and the penalty multiplied by r². That equivalence holds class by
class, and the reference's norms r_c differ per class (each class's raw embedding has its own
length), so one number cannot reproduce it: ``text_norm = r`` (default 1) scales every class's
unit anchor by the same r — the reference's step sizes only when all classes share the norm r.
``text_norm = "raw"`` is the reference (``_get_base_text_features``): each class's anchor is the
mean of its *raw* (unnormalised) text embeddings over the task's templates, so it has the
reference's direction and its own norm r_c (needs the backbone's text encoder; description and
language options of the task are not used for it). Effect of the default: every class moves at
the step size of norm 1 instead of r_c — relatively larger steps by r_c² where r_c > 1, and a CLAP
penalty relatively weaker by r_c² — and with several templates the anchor's direction is the
workbench's ensemble (mean of unit embeddings) rather than the mean of raw ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...training import TrainConfig, TrainingDiverged, learning_rate
from ..base import Method
from ..registry import register

MULTIPLIERS = ("zero_shot", "balanced", "corrected", "constant")


@dataclass
class CachedTrainingConfig:
    """The jusiro/CLAP trainer recipe (``SGD_lr1e-1_B256_ep300``), shared by ZS-LP, CLAP and CLIP-Adapter."""
    #: augmented passes of the support set, encoded once and cached (reference: 20)
    augment_views: int = 20
    #: RandomResizedCrop scale of those passes (Dassl's default: 0.08-1)
    aug_scale: list = field(default_factory=lambda: [0.08, 1.0])
    epochs: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    #: constant learning rate of the first epochs before the cosine (Dassl warm-up)
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5

    def _check(self, method: str):
        for name in ("augment_views", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{method}: {name} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"{method}: warmup_epochs must be an integer in [0, epochs), got {self.warmup_epochs!r}.")
        for name in ("lr", "warmup_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{method}: {name} must be > 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{method}: momentum must be in [0, 1), got {self.momentum!r}.")
        if self.weight_decay < 0:
            raise ConfigError(f"{method}: weight_decay must be >= 0, got {self.weight_decay!r}.")
        if len(self.aug_scale) != 2 or not 0 < self.aug_scale[0] <= self.aug_scale[1] <= 1:
            raise ConfigError(f"{method}: aug_scale must be [low, high] with 0 < low <= high <= 1, got {self.aug_scale!r}.")


def batches_per_epoch(n_support: int, batch_size: int) -> int:
    """Dassl's train loader length: ``⌊N / B⌋`` (drop_last) when N ≥ B, else one batch."""
    return n_support // batch_size if n_support >= batch_size else 1


def sgd_on_cached_views(params: dict, grad_fn, pool: torch.Tensor, labels: torch.Tensor, n_support: int,
                        cfg: CachedTrainingConfig, *, seed: int, desc: str) -> dict:
    """SGD (momentum, weight decay, Dassl's warm-up + per-epoch cosine) on batches of cached views.

    Batches as jusiro/CLAP's ``run_epoch`` draws them: each epoch shuffles the whole pool
    (``V·N`` views) and takes the first ``batches_per_epoch(N, B)`` batches of ``B``.
    ``grad_fn(params, x, y)`` returns ``(loss, {name: gradient})``. The gradients are written out
    by each method rather than taken by autograd: at 100 classes x 16 shots this is 1,800 small
    steps, where autograd's per-step overhead would cost several times the arithmetic. The
    update is ``torch.optim.SGD``'s (``buf = m·buf + g``; ``p -= lr·buf``); the batch order comes
    from a generator seeded by (seed, epoch), as in :func:`workbench.training.train`.
    """
    steps = batches_per_epoch(n_support, cfg.batch_size)
    tcfg = TrainConfig(epochs=cfg.epochs, optimizer="sgd", lr=cfg.lr, schedule="cosine_epoch",
                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr)
    buffers = {k: torch.zeros_like(v) for k, v in params.items()}
    epoch_loss, step = [], 0
    for epoch in range(cfg.epochs):
        lr = learning_rate(tcfg, step, epoch, cfg.epochs * steps)
        order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        # One gather per epoch of just the views this epoch's batches use (contiguous slices per step after):
        # at 100 classes x 16 shots a per-step advanced-indexing gather cost as much as the step's matmuls.
        used = order[:steps * cfg.batch_size]
        epoch_x, epoch_y = pool.index_select(0, used), labels.index_select(0, used)
        loss_sum = 0.0
        for i in range(steps):
            batch = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
            loss, grads = grad_fn(params, epoch_x[batch], epoch_y[batch])
            for k, p in params.items():
                g = torch.add(grads[k], p, alpha=cfg.weight_decay) if cfg.weight_decay else grads[k]
                torch.add(g, buffers[k], alpha=cfg.momentum, out=buffers[k])   # buf = m·buf + g, in one pass
                p.add_(buffers[k], alpha=-lr)
            loss_sum += float(loss)
            step += 1
        epoch_loss.append(loss_sum / steps)
        if not math.isfinite(epoch_loss[-1]):
            raise TrainingDiverged(f"{desc}: loss became {epoch_loss[-1]} in epoch {epoch} (lr {lr:.2e}); "
                                   "lower lr.")
    return {"steps": step, "epoch_loss": epoch_loss}


def softmax_ce(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and its gradient with respect to the logits, ``(softmax − onehot)/B``."""
    log_probs = torch.log_softmax(logits, dim=-1)
    target = y[:, None]
    loss = log_probs.gather(1, target).mean().neg_()
    grad = log_probs.exp_()   # log_probs is not needed any more: its memory becomes the gradient
    grad.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=grad.dtype))   # p_y − 1
    return loss, grad.div_(len(y))


def cosine_logits(x: torch.Tensor, prototypes: torch.Tensor, scale, bias) -> torch.Tensor:
    return scale * F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).T + bias


def lagrangian_multipliers(zero_shot_logits: torch.Tensor, labels: torch.Tensor, n_classes: int,
                           how: str = "zero_shot") -> torch.Tensor:
    """CLAP's λ_c: mean zero-shot softmax probability of class c over the samples of class c.

    ``"balanced"``: all ones; ``"corrected"``: rescaled so that they sum to C; ``"constant"``:
    their mean for every class (the reference's ``init_lagrangian_multipliers`` variants).
    """
    if how == "balanced":
        return torch.ones(n_classes)
    probs = torch.softmax(zero_shot_logits.double(), dim=-1)
    one_hot = F.one_hot(labels, n_classes).double()
    # A class without support samples (all its images unreadable) gets 0, where the reference would divide by 0.
    lam = torch.nan_to_num((probs * one_hot).sum(0) / one_hot.sum(0), nan=0.0)
    if how == "corrected":
        lam = lam * (n_classes / lam.sum())
    elif how == "constant":
        lam = torch.full_like(lam, float(lam.mean()))
    return lam.float()


def l2_penalty(prototypes: torch.Tensor, anchors: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """``mean_c λ_c ‖w_c − t_c‖²`` (``zero_shot_constraint`` with ``"l2"``)."""
    return (multipliers * (prototypes - anchors).pow(2).sum(-1)).mean()


def _check_text_norm(value, method: str):
    if value == "raw":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{method}: text_norm must be a number > 0 or 'raw' (each class's raw text-embedding norm, "
                          f"the reference), got {value!r}.")


def raw_text_anchors(backbone, class_names, templates) -> torch.Tensor:
    """``[C, D]``: per class, the mean of the raw (unnormalised) text embeddings of its prompts — the
    reference's ``_get_base_text_features`` (float32, CPU)."""
    if not hasattr(backbone, "tokenize") or getattr(backbone, "model", None) is None:
        raise ConfigError("text_norm='raw' needs the backbone's text encoder (a FewShotTask on a Backbone); this task "
                          "only holds a text classifier. Pass a number instead (e.g. the known raw norm).")
    rows = []
    for name in class_names:
        tokens = backbone.tokenize([t.format(name) for t in templates]).to(backbone.device)
        with torch.inference_mode(), backbone.autocast():
            rows.append(backbone.model.encode_text(tokens).float().mean(0).cpu())
    return torch.stack(rows)


@dataclass
class ZSLPConfig(CachedTrainingConfig):
    #: norm given to the text embeddings that initialise (and, for CLAP, anchor) the prototypes: a number
    #: for every class, or "raw" (each class's raw text embedding, the reference); see the module doc
    text_norm: float | str = 1.0

    def __post_init__(self):
        self._check("zs_lp")
        _check_text_norm(self.text_norm, "zs_lp")


@dataclass
class CLAPConfig(ZSLPConfig):
    #: class-wise penalty weights: zero_shot (reference default), balanced, corrected or constant
    multipliers: str = "zero_shot"

    def __post_init__(self):
        self._check("clap")
        _check_text_norm(self.text_norm, "clap")
        if self.multipliers not in MULTIPLIERS:
            from ...errors import did_you_mean

            raise ConfigError(f"clap: multipliers must be one of {list(MULTIPLIERS)}, got {self.multipliers!r}."
                              + did_you_mean(self.multipliers, MULTIPLIERS))


@register("zs_lp")
class ZSLP(Method):
    Config = ZSLPConfig
    #: CLAP's constraint on; ZS-LP has none
    constrained = False

    def fit(self, task) -> "ZSLP":
        cfg = self.config
        support = task.support(views=cfg.augment_views, aug_scale=tuple(cfg.aug_scale))
        pool, labels = support.flat()
        pool = pool.float()
        c = task.n_classes
        if cfg.text_norm == "raw":
            anchors = raw_text_anchors(task.backbone, task.class_names, task.templates)
        else:
            anchors = task.text_classifier().float() * cfg.text_norm
        self.scale = torch.tensor(float(task.backbone.logit_scale))
        self.bias = torch.tensor(float(task.backbone.logit_bias or 0.0))
        info = {}
        multipliers = None
        if self.constrained:
            with torch.no_grad():
                zs = cosine_logits(pool, anchors, self.scale, self.bias)
            multipliers = lagrangian_multipliers(zs, labels, c, cfg.multipliers)
            info["multipliers"] = [round(v, 6) for v in multipliers.tolist()]

        scale, bias = float(self.scale), float(self.bias)
        # d/dw of mean_c λ_c‖w_c − t_c‖² is (2/C)·λ_c·(w_c − t_c): the factor is constant, so it is built once
        penalty_factor = (2.0 / c) * multipliers[:, None] if multipliers is not None else None

        def grad_fn(params, x, y):
            # x: unit-norm cached views; logits_ic = s·x_i·w_c/‖w_c‖ + b. With G = dL/dlogits, the gradient
            # through the normalisation is dL/dw_c = (s/‖w_c‖)·Σ_i G_ic x_i − w_c·(s/‖w_c‖²)·Σ_i G_ic cos_ic:
            # the normalisation is applied to the [B, C] products, never to a [B, D] or [C, D] tensor.
            w = params["prototypes"]
            norm = torch.linalg.vector_norm(w, dim=-1).clamp_(min=1e-12)  # [C], F.normalize's floor
            cosines = (x @ w.T).div_(norm)                               # [B, C]
            loss, g = softmax_ce(cosines * scale + bias, y)
            col = scale / norm
            grad = (g * col).T @ x
            grad.addcmul_(w, ((g * cosines).sum(0) * col / norm)[:, None], value=-1.0)
            if penalty_factor is not None:
                diff = w - anchors
                loss = loss + (multipliers * diff.pow(2).sum(-1)).mean()   # l2_penalty, sharing diff
                grad.addcmul_(penalty_factor, diff)
            return loss, {"prototypes": grad}

        params = {"prototypes": anchors.clone()}
        history = sgd_on_cached_views(params, grad_fn, pool, labels, len(support), cfg, seed=task.seed, desc=self.name)
        self.prototypes = params["prototypes"]
        self.anchors = anchors
        self.multipliers = multipliers if multipliers is not None else torch.zeros(0)
        self.class_names = task.class_names
        self.fit_info = {"epochs": cfg.epochs, "steps": history["steps"],
                         "batches_per_epoch": batches_per_epoch(len(support), cfg.batch_size),
                         "n_views": int(pool.shape[0]), "final_loss": history["epoch_loss"][-1],
                         "templates": list(task.templates), **info}
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return cosine_logits(features.float(), self.prototypes, self.scale, self.bias)

    def state(self):
        return {"prototypes": self.prototypes, "anchors": self.anchors, "multipliers": self.multipliers,
                "scale": self.scale, "bias": self.bias}

    def load_state(self, state):
        for key, value in state.items():
            setattr(self, key, value)


@register("clap")
class CLAP(ZSLP):
    Config = CLAPConfig
    constrained = True
