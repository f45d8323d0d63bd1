"""DualCoOp: a positive and a negative learned context per finding (Sun, Hu, Saenko, "DualCoOp: Fast
Adaptation to Multi-Label Recognition with Limited Annotations", NeurIPS 2022; reference code
sunxm2357/DualCoOp ``models/dualcoop.py::MLCPromptLearner, DualCoop.forward``,
``utils/trainers.py::train_coop``, ``utils/asymmetric_loss.py``, ``utils/build_cfg.py``, ``opts.py``,
``configs/models/rn101_ep50.yaml``).

Prompts: finding c gets ``[SOS][ctx⁺_1 … ctx⁺_M] c.[EOS]`` and ``[SOS][ctx⁻_1 … ctx⁻_M] c.[EOS]``,
built with CoOp's :class:`~workbench.methods.prompts.coop.PromptLearner` (two of them: one per
polarity). Reference defaults: ``n_ctx_pos = n_ctx_neg = 16`` vectors from N(0, 0.02), shared by
all findings (``CSC=False``; ``csc=True`` gives one pair of contexts per finding), or initialised
from words (``positive_init`` / ``negative_init``, which the reference accepts as
``--positive_prompt`` / ``--negative_prompt``; it uses words only when both are given and counts
their context length in words, here each side independently and in tokens, as CoOp here does).
Only the two contexts are trained.

Scores: with t⁺_c, t⁻_c the normalised text features and f the normalised image feature,
s⁺_c = 100·fᵀt⁺_c, s⁻_c = 100·fᵀt⁻_c and p_c = softmax([s⁻_c, s⁺_c])₁ = σ(s⁺_c − s⁻_c);
``predict_logits`` returns the log-odds s⁺ − s⁻ ``[N, L]``, as every multi-label method here.

Loss: the Asymmetric Loss (Ben-Baruch et al. ICCV'21) on the pair-softmax probabilities, as
``train_coop`` uses it (``AsymmetricLoss(gamma_neg, gamma_pos)``; ``--gamma_neg 2 --gamma_pos 1``):
with p_m = max(p − clip, 0),
``L = −Σ_{i,c known} [ y·(1 − p)^{γ⁺}·log p + (1 − y)·p_m^{γ⁻}·log(1 − p_m) ]``,
γ⁺ = 1, γ⁻ = 2, clip = 0.05, log clamped at eps = 1e-6, summed over images and findings (not
averaged; ``--loss_w`` 1). Uncertain / unknown entries (−1) are left out, as the reference drops
its −1 partial labels (CheXpert's U-Ignore). The focusing weights (1 − p)^{γ⁺} and p_m^{γ⁻} are
constants for the gradient (``utils/asymmetric_loss.py::AsymmetricLoss``,
``disable_torch_grad_focal_loss=True``; clip 0.05, eps 1e-6 and the sum are that class's defaults).

Training (``configs/models/rn101_ep50.yaml`` + Dassl defaults): SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32, cosine per epoch after one constant warm-up epoch at 1e-5.

Deliberate differences, and their effect:

* **Global image feature, no region aggregation.** The reference modifies the visual encoder to
  return a feature per spatial position and pools each finding's scores with a softmax over
  positions of 20·cos (the positive prompt's), then multiplies by 5. The workbench trains on the
  cached pooled image feature (one "region"): the softmax weight is then 1 and the two scales
  multiply to the 100 used here, i.e. this is exactly the reference's formula for a one-region
  image. Findings that occupy a small part of the image are scored less sharply than with the
  reference's per-region pooling (the mosaics of ``whu_rs19_mosaic`` are such a case).
* **Epochs by K.** The reference trains 50 epochs on a (partially labelled) full training set; a
  K-shot support set is much smaller, so the epochs follow CoOp's schedule by K
  (50/100/100/200/200 for K = 1/2/4/8/16), as every prompt learner here. ``epochs`` overrides it.
* Augmented views of the support set come from the feature cache (one per epoch, as CoOp here);
  the reference trains at 448 px on COCO/VOC.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import DataError
from ...towers.text import TextTower
from ...training import train
from ..features.multilabel import MultiLabelMethod, task_targets
from ..registry import register
from .coop import PromptLearner, PromptTrainingConfig, default_epochs, steps_per_epoch, view_batches


def asymmetric_loss(log_odds: torch.Tensor, targets: torch.Tensor, gamma_pos: float = 1.0, gamma_neg: float = 2.0,
                    clip: float = 0.05, eps: float = 1e-6) -> torch.Tensor:
    """ASL on per-finding probabilities p = σ(log-odds) (= the softmax over DualCoOp's pair), summed
    over the known entries (targets 0/1; −1 = unknown, left out)."""
    known = targets >= 0
    y = targets.clamp(min=0).to(log_odds.dtype)
    p = torch.sigmoid(log_odds)
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p      # 1 − p_m: the negatives' shifted probability
    log_pos = torch.log(p.clamp(min=eps))
    log_neg = torch.log(p_neg.clamp(min=eps))
    with torch.no_grad():   # the focusing weights carry no gradient (reference: disable_torch_grad_focal_loss=True)
        w_pos = (1 - p) ** gamma_pos
        w_neg = (1 - p_neg) ** gamma_neg
    loss = y * w_pos * log_pos + (1 - y) * w_neg * log_neg
    return -(loss * known.to(loss.dtype)).sum()


class DualPrompts(nn.Module):
    """The positive and the negative context of every finding (two CoOp prompt learners)."""

    def __init__(self, tower, tokenizer, names, cfg, gen):
        super().__init__()
        self.pos = PromptLearner(tower, tokenizer, names, cfg.n_ctx_pos, cfg.positive_init, cfg.csc, "end",
                                 cfg.init_std, gen)
        self.neg = PromptLearner(tower, tokenizer, names, cfg.n_ctx_neg, cfg.negative_init, cfg.csc, "end",
                                 cfg.init_std, gen)

    def text(self, tower) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``[L, D]`` text features of the positive and of the negative prompts."""
        pos = F.normalize(tower.encode(self.pos(), self.pos.tokens).float(), dim=-1)
        neg = F.normalize(tower.encode(self.neg(), self.neg.tokens).float(), dim=-1)
        return pos, neg


@dataclass
class DualCoOpConfig(PromptTrainingConfig):
    """DualCoOp's prompts and loss; the training recipe (lr 0.002, SGD, warm-up, batch 32, epochs by K) is
    :class:`~workbench.methods.prompts.coop.PromptTrainingConfig`'s."""

    #: learnable context vectors of the positive prompt (ignored when positive_init is given)
    n_ctx_pos: int = 16
    #: learnable context vectors of the negative prompt (ignored when negative_init is given)
    n_ctx_neg: int = 16
    #: initialise the positive context from these words (e.g. "a photo of a"); "" = random N(0, init_std)
    positive_init: str = ""
    #: initialise the negative context from these words (e.g. "no"); "" = random N(0, init_std)
    negative_init: str = ""
    #: one pair of contexts per finding instead of one pair shared by all findings
    csc: bool = False
    init_std: float = 0.02
    #: scale of the cosines (the reference's 20 × 5 for one image region)
    logit_scale: float = 100.0
    #: ASL focusing of the positives (gamma_pos) and of the negatives (gamma_neg), and the negatives' margin
    gamma_pos: float = 1.0
    gamma_neg: float = 2.0
    clip: float = 0.05


@register("dualcoop")
class DualCoOp(MultiLabelMethod):
    """Multi-label prompt learning: positive and negative learned contexts per finding (Sun et al. NeurIPS'22)."""

    Config = DualCoOpConfig

    def fit(self, task) -> "DualCoOp":
        cfg = self.config
        backbone = task.backbone
        model = backbone.model.requires_grad_(False)   # frozen: only the two contexts train
        tower = TextTower(model)
        self.class_names = list(task.class_names)
        gen = torch.Generator().manual_seed(task.seed)
        prompts = DualPrompts(tower, backbone.tokenizer, self.class_names, cfg, gen)
        epochs = cfg.epochs if cfg.epochs is not None else default_epochs(task.shots)
        n_views = min(cfg.augment_views or epochs, epochs)
        views = task.support(views=n_views, aug_scale=tuple(cfg.aug_scale), flip=True, stream="coop")
        targets = task_targets(task, views)
        for j, name in enumerate(self.class_names):
            if not (targets[:, j] == 1).any():
                raise DataError(f"dualcoop: finding {name!r} has no positive support image (uncertain labels are "
                                "left out); sample more shots or drop the finding.")
        steps = steps_per_epoch(views.views.shape[1], cfg.batch_size)
        batches = view_batches(views.views, targets, cfg.batch_size, backbone.device)
        scale = float(cfg.logit_scale)

        def loss_fn(batch):
            x, y = batch
            pos, neg = prompts.text(tower)
            log_odds = scale * (x.float() @ pos.T) - scale * (x.float() @ neg.T)
            return asymmetric_loss(log_odds, y, cfg.gamma_pos, cfg.gamma_neg, cfg.clip)

        tcfg = cfg.train_config(epochs, task.seed)
        model.eval()
        history = train(prompts, loss_fn, batches, tcfg, device=backbone.device, precision=backbone.precision,
                        checkpoint_dir=cfg.checkpoint_dir, identity=self.checkpoint_identity(task),
                        steps_per_epoch=steps, desc="DualCoOp", cpu_hint="epochs={epochs}", batch_size=cfg.batch_size)
        with torch.no_grad(), backbone.autocast():
            pos, neg = prompts.text(tower)
        self.pos, self.neg = pos.float().cpu(), neg.float().cpu()
        self.ctx_pos = prompts.pos.ctx.detach().float().cpu()
        self.ctx_neg = prompts.neg.ctx.detach().float().cpu()
        self.scale = torch.tensor(scale)
        self.fit_info = {"n_ctx_pos": prompts.pos.n_ctx, "n_ctx_neg": prompts.neg.n_ctx, "csc": cfg.csc,
                         "trainable_parameters": sum(p.numel() for p in prompts.parameters() if p.requires_grad),
                         "epochs": epochs, "augment_views": n_views, "steps": history["steps"],
                         "first_epoch_loss": history["epoch_loss"][0], "final_loss": history["epoch_loss"][-1],
                         "epoch_loss": history["epoch_loss"], "loss": "asymmetric (ASL) on the pair softmax",
                         "uncertain": "left out of the loss", "text_tower": tower.kind,
                         "resumed_from_epoch": history["resumed_from_epoch"]}
        self._choose_thresholds(task)
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        f = features.float()
        return self.scale * (f @ self.pos.T) - self.scale * (f @ self.neg.T)

    def state(self):
        return {"pos": self.pos, "neg": self.neg, "ctx_pos": self.ctx_pos, "ctx_neg": self.ctx_neg,
                "scale": self.scale, "thresholds": self.thresholds}

    def load_state(self, state):
        for key, value in state.items():
            setattr(self, key, value)
