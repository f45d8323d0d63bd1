"""Contrastive fine-tuning on image–text pairs ("fine-tune like you pretrain"): the result is a backbone.

FLYP (Goyal et al., "Finetune like you pretrain", CVPR 2023; reference code locuslab/FLYP
``src/models/flyp_loss.py``, ``clip/loss.py::ClipLoss``, ``src/args.py``) fine-tunes CLIP with its
*pre-training* loss on (image, caption) pairs:

* every (image, caption) pair is one training example (FLYP's CSVs have one row per pair), batches
  are shuffled pairs and the other captions of the batch are the negatives — also a second caption
  of the same image, as FLYP counts same-class pairs as negatives;
* CLIP towers: symmetric InfoNCE, ``L = ½·[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)]`` with ``I``, ``T``
  the L2-normalised features and ``s = exp(logit_scale)`` the model's own logit scale, learnt (as in
  CLIP; clamped at 100 as open_clip's training does);
* SigLIP towers (a model with ``logit_bias``): the sigmoid loss of Zhai et al. (ICCV 2023; open_clip
  ``loss.py::SigLipLoss``), ``L = −(1/B)·Σ_ij log σ(z_ij·(s·I_i·T_j + b))`` with ``z_ij = +1`` on the
  diagonal and ``−1`` elsewhere, ``s`` and ``b`` learnt;
* AdamW (FLYP: lr 1e-5, weight decay 0.1, batch 256–512, cosine schedule); augmentation is
  open_clip's training transform (RandomResizedCrop scale 0.9–1, no flip);
* the text tower runs only up to the longest caption of the batch (:mod:`workbench.towers.text`,
  exact on CLIP and BERT towers; other towers, e.g. SigLIP's, run at full length).

What is trained (``pairs_lora`` / ``pairs_svd`` / ``pairs_full``):

* LoRA on q/k/v of both towers (:mod:`workbench.towers.lora`, CLIP-LoRA's surgery: r = 2, α = 1,
  dropout 0.25, rsLoRA scaling);
* CLIP-SVD's singular values of q/k/v/out/MLP Linears of both towers (:mod:`workbench.towers.svd`);
* every parameter of the chosen blocks (``blocks="all"``: the whole towers, embeddings and
  projections included — what FLYP does, and what pretraining from scratch needs).

The logit scale (and SigLIP's bias) is trained in every mode (``train_logit_scale``).

The adapted weights are folded into the plain open_clip architecture (LoRA merged, singular
values multiplied out, split attention fused back), so the result is an ordinary
:class:`~workbench.backbones.Backbone`: ``method.backbone_``, saved by :meth:`save` and loaded by
``wb.load_backbone(folder)``, usable by every classification method. **WiSE-FT** (Wortsman et al.,
CVPR 2022) interpolates every weight between the pretrained (α = 0) and fine-tuned (α = 1)
model; ``wise_alpha="val"`` picks α on the grid 0, 0.1, …, 1 by mean recall on the pairs' *val*
split (never test).

Deliberate differences from FLYP's code, and their effect:

* no linear warm-up (FLYP: 500 steps): the one training loop (:mod:`workbench.training`) offers a
  per-iteration cosine without warm-up; on few steps the first updates are larger;
* no epoch-wise zero-shot evaluation / early stopping on a class set: pairs carry no classes; the
  last iterate is kept (WiSE-FT's α is the only thing chosen on val);
* under ``torchrun`` each process contrasts only its own slice of the global batch (no feature
  all-gather as open_clip's ``gather_with_grad``): fewer negatives per step, so the run differs from
  a single-process run of the same global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError
from ...towers import linear_layers, trainable_copy
from ...towers.attention import unsplit_state_dict
from ...towers.interpolate import ALPHA_GRID, check_alpha, interpolate_tensors
from ...towers.lora import add_lora
from ...towers.select import block_of, tower_of
from ...towers.svd import add_svd, merge_svd
from ...towers.text import TextTower
from ...training import ImageBatches, TrainConfig, train
from ..base import Method
from ..registry import register


@dataclass
class PairsConfig:
    #: "vision", "text" or "both": which towers are adapted
    encoder: str = "both"
    #: "all" or a list of block indices (pairs_full: the blocks whose every parameter is trained)
    blocks: str | list = "all"
    #: LoRA rank (pairs_lora)
    r: int = 2
    #: LoRA alpha; update scaled by alpha / sqrt(r) (pairs_lora)
    alpha: float = 1.0
    #: dropout on the LoRA input (pairs_lora)
    dropout: float = 0.25
    #: which Linears get LoRA (pairs_lora) or an SVD (pairs_svd): any of q, k, v, o, fc1, fc2
    params: list | None = None
    #: FLYP: AdamW lr 1e-5, weight decay 0.1 (full fine-tuning); LoRA/SVD train few parameters and use a larger lr
    lr: float | None = None
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eta_min: float = 0.0
    #: pairs (image, caption) per step; FLYP 256 (transfer sets) to 512 (ImageNet)
    batch_size: int = 256
    epochs: int = 10
    #: total optimizer steps (overrides epochs); 0 = no training (the base model)
    steps: int | None = None
    #: open_clip's training crop (RandomResizedCrop scale) and no flip
    aug_scale: list = field(default_factory=lambda: [0.9, 1.0])
    #: learn the logit scale (and SigLIP's bias) as CLIP pre-training does
    train_logit_scale: bool = True
    #: WiSE-FT: None = fine-tuned weights (alpha 1), a number in [0, 1], or "val" (mean recall on the val split)
    wise_alpha: float | str | None = None
    grad_clip: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    seed: int = 0


#: per mode: default lr and matrices
_DEFAULTS = {"lora": (2e-4, ["q", "k", "v"]), "svd": (2e-4, ["q", "k", "v", "o", "fc1", "fc2"]),
             "full": (1e-5, None)}


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The pre-training loss of the towers: symmetric InfoNCE (CLIP), or the sigmoid loss when the
    model has a ``logit_bias`` (SigLIP). Features L2-normalised; ``logit_scale`` is the *multiplier*
    (``exp`` of the parameter, clamped)."""
    logits = logit_scale * image_features @ text_features.T
    n = len(logits)
    if logit_bias is not None:
        labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * (logits + logit_bias)).sum() / n
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _own_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Give ``name`` its own trainable storage (trainable_copy shares frozen weights with the backbone)."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    old = getattr(module, leaf)
    new = nn.Parameter(old.detach().clone(), requires_grad=True)
    setattr(module, leaf, new)
    return new


class PairTask:
    """What a pairs method may see while fitting: the train split (and val for WiSE-FT), never test."""

    def __init__(self, pairs, backbone, cache=None, seed: int = 0):
        self.pairs, self.backbone, self.cache, self.seed = pairs, backbone, cache, seed

    def fingerprint(self) -> dict:
        return {"pairs": self.pairs.fingerprint(), "backbone": self.backbone.provenance_id, "seed": self.seed}


class ContrastiveFineTune(Method):
    """Contrastive fine-tuning on image–text pairs; the result is a backbone (see the module docstring)."""

    Config = PairsConfig
    uses_images = True
    mode = "lora"
    saved_files = ("backbone.json", "open_clip_model.safetensors")

    # -- building the trainable model ------------------------------------------------------------
    def _build(self, backbone, cfg):
        lr, matrices = _DEFAULTS[self.mode]
        matrices = cfg.params or matrices
        if self.mode == "lora":
            model = trainable_copy(backbone)
            names = linear_layers(model, cfg.encoder, matrices, cfg.blocks, method=self.name)
            model = add_lora(model, names, cfg.r, cfg.alpha, cfg.dropout)
            inner = model.base_model.model
        elif self.mode == "svd":
            model = trainable_copy(backbone)
            names = linear_layers(model, cfg.encoder, matrices, cfg.blocks, method=self.name)
            add_svd(model, names)
            inner = model
        else:
            model = trainable_copy(backbone, split=False)
            wanted = None if cfg.blocks == "all" else {int(b) for b in cfg.blocks}
            names = [n for n, _ in model.named_parameters()
                     if (cfg.encoder == "both" or tower_of(n) == cfg.encoder) and n not in ("logit_scale", "logit_bias")
                     and (wanted is None or block_of(n) in wanted)]
            if not names:
                raise ConfigError(f"{self.name}: no parameters in encoder={cfg.encoder!r}, blocks={cfg.blocks!r}.")
            for n in names:
                _own_parameter(model, n)
            inner = model
        if cfg.train_logit_scale:
            for n in ("logit_scale", "logit_bias"):
                if getattr(inner, n, None) is not None:
                    _own_parameter(inner, n)
        return model.to(backbone.device), inner, names

    # -- the loss ----------------------------------------------------------------------------------
    @staticmethod
    def _scale_and_bias(inner):
        scale = inner.logit_scale.exp().clamp(max=100)
        bias = getattr(inner, "logit_bias", None)
        return scale, bias

    def fit(self, task) -> "ContrastiveFineTune":
        if not isinstance(task, PairTask):
            raise ConfigError(f"{self.name} fits on image–text pairs: pass PairTask(pairs, backbone) (see "
                              "wb.fine_tune_pairs). A classification dataset has no captions; for a classification "
                              "task use clip_lora / clip_svd, or write captions and load them as pairs.")
        cfg = self.config
        pairs, backbone = task.pairs, task.backbone
        wise = cfg.wise_alpha
        if isinstance(wise, str) and wise != "val":
            raise ConfigError(f"{self.name}: wise_alpha must be None, a number in [0, 1] or 'val', got {wise!r}.")
        if wise not in (None, "val"):
            check_alpha(wise, self.name)
        if wise == "val" and not pairs.has_split("val"):
            raise ConfigError(f"{self.name}: wise_alpha='val' needs a 'val' split of pairs; {pairs.name!r} has "
                              f"{sorted(pairs.splits)}.")
        torch.manual_seed(cfg.seed)  # LoRA A init
        model, inner, names = self._build(backbone, cfg)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train_samples = pairs.split("train")
        decoded = [pairs.reader(s.ref) for s in train_samples]
        texts, owner = pairs.texts("train")
        from ...retrieval import caption_truncation

        truncation = caption_truncation(texts, backbone.tokenizer)
        tokens = backbone.tokenize(texts).to(backbone.device)
        batches = ImageBatches([decoded[i] for i in owner], list(range(len(texts))),
                               backbone.augment_transform(tuple(cfg.aug_scale), flip=False),
                               cfg.batch_size, seed=cfg.seed, device=backbone.device)
        per_epoch = len(batches)
        total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        epochs = max(1, -(-total // per_epoch))

        # captions run only up to the batch's longest one (exact: towers.text; full length for other towers)
        try:
            tower = TextTower(inner, self.name)
        except ConfigError:
            tower = None

        def encode_text(tok):
            return tower.encode(tower.embed(tok), tok) if tower is not None else model.encode_text(tok)

        def loss_fn(batch):
            pixels, caption_idx = batch
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(encode_text(tokens[caption_idx]).float(), dim=-1)
            scale, bias = self._scale_and_bias(inner)
            return clip_loss(img, txt, scale.float(), None if bias is None else bias.float())

        self._loss_fn = loss_fn   # for tests: the loss of a batch under the current weights
        lr = cfg.lr if cfg.lr is not None else _DEFAULTS[self.mode][0]
        t0 = time.perf_counter()
        history = {"steps": 0, "epochs_done": 0, "epoch_loss": [], "loss": [], "resumed_from_epoch": None}
        if total > 0:
            tcfg = TrainConfig(epochs=epochs, max_steps=total, optimizer="adamw", lr=lr, weight_decay=cfg.weight_decay,
                               betas=tuple(cfg.betas), schedule="cosine_step", eta_min=cfg.eta_min,
                               grad_clip=cfg.grad_clip, seed=cfg.seed,
                               checkpoint_every=cfg.checkpoint_every if cfg.checkpoint_dir else None)
            identity = {"method": self.name, "task": task.fingerprint(),
                        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_dir"}}
            history = train(model, loss_fn, batches, tcfg, device=backbone.device, precision=backbone.precision,
                            checkpoint_dir=cfg.checkpoint_dir, identity=identity, steps_per_epoch=per_epoch,
                            desc=self.label(), cpu_hint="steps={steps}", batch_size=cfg.batch_size)
        model.eval()
        fine_tuned = self._dense_model(model, backbone)
        self._start = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
        end = fine_tuned.state_dict()
        changed = [k for k, v in end.items() if v.is_floating_point() and not torch.equal(v, self._start[k].to(v))]
        self._start = {k: self._start[k] for k in changed}
        self._end = {k: end[k].detach().clone() for k in changed}
        self.backbone_ = backbone.with_model(fine_tuned, self.name)
        wise_info = None
        if wise == "val":
            from ...retrieval import evaluate_retrieval

            scores = {}
            for a in ALPHA_GRID:
                self._set_alpha(a)
                scores[a] = evaluate_retrieval(pairs, self.backbone_, "val", None)["mean_recall"]
            alpha = max(ALPHA_GRID, key=lambda a: (scores[a], a))   # ties: closer to the fine-tuned model
            wise_info = {"alpha": alpha, "chosen_on": "val mean recall", "val_mean_recall": {str(a): v for a, v in
                                                                                             scores.items()}}
        elif wise is not None:
            wise_info = {"alpha": float(wise), "chosen_on": "given"}
        if wise_info is not None:
            self._set_alpha(wise_info["alpha"])
        self.class_names = []   # fitted (a backbone has no classes)
        self.fit_info = {"steps": history["steps"], "epochs": history["epochs_done"],
                         "epoch_loss": history["epoch_loss"], "loss": history["loss"],
                         "resumed_from_epoch": history["resumed_from_epoch"], "trainable_parameters": n_trainable,
                         "target_modules": len(names), "lr": lr, "pairs": pairs.name,
                         "saw": {"train_images": len(train_samples), "train_captions": len(texts),
                                 "val_images": len(pairs.split("val")) if wise == "val" else 0, "test": 0},
                         "captions_truncated": truncation["truncated"], "context_length": truncation["context_length"],
                         "wise_ft": wise_info, "fit_seconds": time.perf_counter() - t0,
                         "base_backbone": backbone.provenance_id}
        return self

    def label(self) -> str:
        return {"lora": "pairs LoRA", "svd": "pairs SVD", "full": "pairs full FT"}[self.mode]

    def _dense_model(self, model, backbone) -> nn.Module:
        """The adapted weights in the plain open_clip architecture (merged, multiplied out, fused)."""
        work = copy.deepcopy(model)   # real copies: merging must not touch the backbone's shared weights
        if self.mode == "lora":
            work = work.merge_and_unload()
        elif self.mode == "svd":
            merge_svd(work)
        state = unsplit_state_dict(work.state_dict())
        dense = copy.deepcopy(backbone.model).float()
        dense.load_state_dict(state, strict=True)
        return dense.to(backbone.device).eval().requires_grad_(False)

    def _set_alpha(self, alpha: float) -> None:
        interpolate_tensors(self.backbone_.model, self._start, self._end, alpha)
        self.backbone_._weights_hash, self.backbone_._text_cache = None, {}

    def interpolate(self, alpha: float) -> "ContrastiveFineTune":
        """WiSE-FT after fitting: every weight ``(1 − α)·pretrained + α·fine-tuned``."""
        self._check_fitted()
        self._set_alpha(check_alpha(alpha, self.name))
        self.fit_info["wise_ft"] = {"alpha": float(alpha), "chosen_on": "given"}
        return self

    # -- a backbone, not a classifier --------------------------------------------------------------
    def image_backbone(self, backbone):
        self._check_fitted()
        return self.backbone_

    def predict_logits(self, features):
        raise ConfigError(f"{self.name} produces a backbone, not a classifier: save it (method.save(folder)), load "
                          "it with wb.load_backbone(folder) and fit any classification method on it.")

    def state(self):
        return {}

    def load_state(self, state):
        pass

    def save(self, folder) -> Path:
        """A backbone folder: ``wb.load_backbone(folder)`` loads it (see :func:`workbench.backbones.save_backbone`)."""
        from ...backbones import save_backbone

        self._check_fitted()
        return save_backbone(self.backbone_, folder, {"method": self.name, "config": dataclasses.asdict(self.config),
                                                      "fit_info": self.fit_info})


@register("pairs_lora")
class PairsLoRA(ContrastiveFineTune):
    """Contrastive (FLYP) fine-tuning of LoRA adapters on q/k/v of both towers."""
    mode = "lora"


@register("pairs_svd")
class PairsSVD(ContrastiveFineTune):
    """Contrastive (FLYP) fine-tuning of CLIP-SVD's singular values."""
    mode = "svd"


@register("pairs_full")
class PairsFull(ContrastiveFineTune):
    """Contrastive (FLYP) full fine-tuning of the chosen blocks (or whole towers)."""
    mode = "full"


def fine_tune_pairs(pairs, backbone, method: str = "pairs_lora", cache=None, **params) -> ContrastiveFineTune:
    """Fit a pairs method on ``pairs`` (train split; val for WiSE-FT α) and return it; its
    ``backbone_`` is the adapted backbone."""
    from ..registry import get_method

    return get_method(method, **params).fit(PairTask(pairs, backbone, cache, params.get("seed", 0)))
