"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models",
CVPRW 2024; reference code MaxZanella/CLIP-LoRA ``loralib/layers.py``, ``loralib/utils.py``,
``lora.py``, ``main.py``, ``run_utils.py``), through peft.

* LoRA on the query, key and value projections (not the output projection) of every block of
  both encoders: ``y = W·x + (α/√r)·B·A·dropout(x)`` — the reference scales by α/√r (rsLoRA,
  peft ``use_rslora=True``); r = 2, α = 1, dropout 0.25 on the LoRA input, A Kaiming-uniform,
  B zero (peft's default init). open_clip's fused attention is first split into separate
  q/k/v/out Linears (:mod:`workbench.towers.attention`). Encoder, matrices, blocks, r, α and dropout are
  configurable.
* Training: AdamW(lr 2e-4, weight decay 1e-2, betas 0.9/0.999), cosine to 1e-6 over 500·K
  iterations stepped every iteration, batch 32, cross-entropy on ``logit_scale · cos(f_img,
  f_txt)`` with all class prompts re-encoded by the LoRA'd text encoder at every step, template
  "a photo of a {}." (the reference's; the dataset's templates with ``templates="dataset"``),
  RandomResizedCrop(scale 0.08–1, bicubic) + horizontal flip, autocast fp16 + gradient scaler on
  CUDA, fp32 on CPU. With ``encoder="vision"`` the class text features are constant and
  computed once per fit (as the reference does), not at every step. The last iterate is kept
  (as the reference); ``checkpoint_selection="val"`` keeps the epoch with the best K-shot
  validation accuracy instead.

The logit scale is the backbone's own and is not trained (OpenAI CLIP: 100, as the reference).

Options beyond the reference:

* **Comp-LoRA** (``subspace="complement"``, ``protected_rank=p``; Wang et al., arXiv 2501.15040,
  no public code): each update becomes ``ΔW = s·(I − U_p U_pᵀ)·B·A·(I − V_p V_pᵀ)`` with ``U_p``,
  ``V_p`` the top-``p`` left/right singular vectors of the pretrained ``W``, so the update has no
  component in ``W``'s top singular subspace (see :mod:`workbench.towers.lora`). The paper's
  value of ``p`` could not be read; the default 32 is this workbench's choice.
* **WiSE-FT** (``wise_alpha``; Wortsman et al. CVPR'22): ``W + α·ΔW`` between the zero-shot
  (α = 0) and the adapted (α = 1) weights; α given, or ``"val"`` = the best K-shot validation
  accuracy on the grid 0, 0.1, …, 1 (never the test set). Recorded in ``fit_info["wise_ft"]``;
  :meth:`CLIPLoRA.interpolate` changes it after fitting.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...features import ChunkedEncoder
from ...towers import linear_layers, trainable_copy
from ...towers.interpolate import ALPHA_GRID, check_alpha, interpolate_tensors
from ...towers.lora import (add_lora, bake_complement, constrain_to_complement, load_lora, lora_b_weights,
                            lora_parameters, save_lora)
from ...training import ImageBatches, TrainConfig, train
from ..base import Method
from ..registry import register


@dataclass
class CLIPLoRAConfig:
    #: LoRA rank
    r: int = 2
    #: LoRA alpha; the update is scaled by alpha / sqrt(r) (rsLoRA, as the reference)
    alpha: float = 1.0
    #: dropout on the LoRA input
    dropout: float = 0.25
    #: "vision", "text" or "both"
    encoder: str = "both"
    #: which projections get LoRA: any of q, k, v, o
    params: list = field(default_factory=lambda: ["q", "k", "v"])
    #: "all" or a list of block indices
    blocks: str | list = "all"
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eta_min: float = 1e-6
    #: total iterations = iterations_per_shot x K (reference: 500)
    iterations_per_shot: int = 500
    #: overrides iterations_per_shot x K when set
    iterations: int | None = None
    batch_size: int = 32
    aug_scale: list = field(default_factory=lambda: [0.08, 1.0])
    #: prompt templates; "dataset" = the dataset's own templates, "dataset_first" = the first of them
    templates: list | str = field(default_factory=lambda: ["a photo of a {}."])
    #: "last" (reference) or "val" (best K-shot validation accuracy, checked every eval_every epochs)
    checkpoint_selection: str = "last"
    eval_every: int = 1
    grad_clip: float | None = None
    #: folder for periodic training checkpoints (resume after an interruption); None = no checkpoints
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    #: "full" (CLIP-LoRA) or "complement" (Comp-LoRA: the update avoids W's top singular subspace)
    subspace: str = "full"
    #: Comp-LoRA: number of top singular directions of each pretrained W the update must not touch
    protected_rank: int = 32
    #: WiSE-FT: None = adapted weights (alpha 1), a number in [0, 1], or "val" (chosen on the K-shot val set)
    wise_alpha: float | str | None = None


def _class_text_features(model, tokens: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Normalised text features per class: mean over templates of normalised embeddings, renormalised."""
    feats = F.normalize(model.encode_text(tokens).float(), dim=-1)
    feats = feats.view(-1, n_templates, feats.shape[-1]).mean(1)
    return F.normalize(feats, dim=-1)


def _text_is_frozen(cfg) -> bool:
    """Whether nothing in the text tower is trained (its class features are then constant)."""
    return cfg.encoder == "vision"


def _check_wise_alpha(value, method: str):
    if value is None or value == "val":
        return value
    if isinstance(value, str):
        raise ConfigError(f"{method}: wise_alpha must be None, a number in [0, 1] or 'val', got {value!r}.")
    return check_alpha(value, method)


@register("clip_lora")
class CLIPLoRA(Method):
    Config = CLIPLoRAConfig
    uses_images = True
    #: progress-bar label and the name used in error messages
    label = "CLIP-LoRA"

    # -- what differs between the weight methods (CLIP-SVD overrides these) -------------------
    def _check_config(self, cfg) -> None:
        if cfg.subspace not in ("full", "complement"):
            raise ConfigError(f"clip_lora: subspace must be 'full' (CLIP-LoRA) or 'complement' (Comp-LoRA), "
                              f"got {cfg.subspace!r}.")

    def _build(self, backbone, cfg=None):
        cfg = cfg or self.config
        model = trainable_copy(backbone)
        names = linear_layers(model, cfg.encoder, cfg.params, cfg.blocks, method="clip_lora")
        model = add_lora(model, names, cfg.r, cfg.alpha, cfg.dropout)
        if cfg.subspace == "complement":
            constrain_to_complement(model, names, cfg.protected_rank)
        return model.to(backbone.device), names

    def _trainable_state(self, model) -> dict:
        return lora_parameters(model)

    def _after_training(self, model) -> None:
        bake_complement(model)  # Comp-LoRA: a plain peft adapter from here on (no-op for CLIP-LoRA)

    def _wise_end_points(self, model) -> tuple[dict, dict]:
        """(zero-shot, adapted) values of the tensors WiSE-FT interpolates: B = 0 and the trained B."""
        adapted = lora_b_weights(model)
        return {k: torch.zeros_like(v) for k, v in adapted.items()}, adapted

    # -- shared ---------------------------------------------------------------------------------
    def _templates(self, task) -> list[str]:
        from ...prompts import validate_templates

        t = self._effective_config().templates   # CLIP-SVD: a preset carries its reference template
        if t == "dataset":
            return list(task.templates)
        if t == "dataset_first":
            return [task.templates[0]]
        return validate_templates(t, f"{self.name} templates")

    def _effective_config(self):
        """The hyper-parameters training uses (CLIP-SVD fills in a preset's values)."""
        return self.config

    def _total_iterations(self, cfg, task, batches_per_epoch: int) -> int:
        return cfg.iterations if cfg.iterations is not None else cfg.iterations_per_shot * task.shots

    def fit(self, task) -> "CLIPLoRA":
        cfg = self._effective_config()
        if cfg.checkpoint_selection not in ("last", "val"):
            raise ConfigError(f"{self.name}: checkpoint_selection must be 'last' or 'val', got {cfg.checkpoint_selection!r}.")
        wise = _check_wise_alpha(cfg.wise_alpha, self.name)
        self._check_config(cfg)
        backbone = task.backbone
        torch.manual_seed(task.seed)  # LoRA A init
        model, names = self._build(backbone, cfg)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        templates = self._templates(task)
        prompts = [t.format(c) for c in task.class_names for t in templates]
        tokens = backbone.tokenize(prompts).to(backbone.device)
        images, labels = task.support_images()
        batches = ImageBatches(images, labels, backbone.augment_transform(tuple(cfg.aug_scale)),
                               cfg.batch_size, seed=task.seed, device=backbone.device)
        total = self._total_iterations(cfg, task, len(batches))
        epochs = -(-total // len(batches))
        scale = backbone.logit_scale
        # encoder="vision": the text tower is frozen, so its class features are computed once (in
        # eval mode, as the reference's clip_classifier) instead of at every step
        fixed_text = None
        if _text_is_frozen(cfg):
            model.eval()
            with torch.no_grad(), backbone.autocast():
                fixed_text = _class_text_features(model, tokens, len(templates))

        def text_features():
            return fixed_text if fixed_text is not None else _class_text_features(model, tokens, len(templates))

        def loss_fn(batch):
            pixels, labels = batch
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            return F.cross_entropy(scale * img @ text_features().T, labels)

        need_val = cfg.checkpoint_selection == "val" or wise == "val"
        val_images, val_labels = task.val_images() if need_val else ([], [])
        val_pixels = torch.stack([backbone.preprocess(im) for im in val_images]) if val_images else None
        val_labels = torch.tensor(val_labels)
        best = {"acc": -1.0, "epoch": None, "state": None}
        # the validation images go through the adapted model in chunks of the feature cache's batch
        # size, halved on a CUDA out-of-memory error (as every encode), never in one batch
        val_encoder = ChunkedEncoder(lambda px: model.encode_image(px.to(backbone.device, non_blocking=True)).float(),
                                     getattr(getattr(task, "_cache", None), "batch_size", 64), backbone.device,
                                     name=f"{self.label} validation", precision=backbone.precision)

        def val_accuracy() -> float:
            with torch.no_grad(), backbone.autocast():
                img = F.normalize(val_encoder(val_pixels), dim=-1)
                text = text_features().float().cpu()
            return float(((img @ text.T).argmax(-1) == val_labels).float().mean())

        def on_epoch_end(epoch):
            if (epoch + 1) % cfg.eval_every and epoch + 1 != epochs:
                return
            acc = val_accuracy()
            if acc > best["acc"]:
                best.update(acc=acc, epoch=epoch, state={k: v.detach().clone() for k, v in self._trainable_state(model).items()})

        tcfg = TrainConfig(epochs=epochs, max_steps=total, optimizer="adamw", lr=cfg.lr,
                           weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), schedule="cosine_step",
                           eta_min=cfg.eta_min, grad_clip=cfg.grad_clip, seed=task.seed,
                           checkpoint_every=cfg.checkpoint_every if cfg.checkpoint_dir else None)
        use_val_epochs = cfg.checkpoint_selection == "val" and val_pixels is not None
        history = train(model, loss_fn, batches, tcfg, device=backbone.device, precision=backbone.precision,
                        checkpoint_dir=cfg.checkpoint_dir, identity=self.checkpoint_identity(task),
                        steps_per_epoch=len(batches), desc=self.label, cpu_hint="iterations={steps}",
                        on_epoch_end=on_epoch_end if use_val_epochs else None)
        if best["state"] is not None:
            model.load_state_dict(best["state"], strict=False)
        self._after_training(model)
        model.eval()
        self._wise_start, self._wise_end = self._wise_end_points(model)
        wise_info = None
        if wise == "val" and val_pixels is not None:
            scores = {}
            for a in ALPHA_GRID:
                interpolate_tensors(model, self._wise_start, self._wise_end, a)
                scores[a] = val_accuracy()
            # ties go to the larger alpha (closer to the adapted model, the method's own default)
            alpha = max(ALPHA_GRID, key=lambda a: (scores[a], a))
            wise_info = {"alpha": alpha, "chosen_on": "val", "val_accuracy": {str(a): v for a, v in scores.items()}}
        elif wise is not None and wise != "val":
            wise_info = {"alpha": wise, "chosen_on": "given"}
        if wise_info is not None:
            interpolate_tensors(model, self._wise_start, self._wise_end, wise_info["alpha"])
        self._finish(model, backbone, tokens, len(templates), task.class_names, fixed_text)
        self.templates_used = templates
        self.fit_info = {"templates": templates, "iterations": history["steps"], "epochs": history["epochs_done"],
                         "final_loss": history["epoch_loss"][-1], "epoch_loss": history["epoch_loss"], "target_modules": len(names),
                         "trainable_parameters": n_trainable,
                         "checkpoint_selection": cfg.checkpoint_selection, "chosen_epoch": best["epoch"],
                         "resumed_from_epoch": history["resumed_from_epoch"], "wise_ft": wise_info,
                         "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        return self

    def _finish(self, model, backbone, tokens, n_templates, class_names, fixed_text=None):
        if fixed_text is not None:
            self.text_weights = fixed_text.cpu()
        else:
            with torch.no_grad(), backbone.autocast():
                self.text_weights = _class_text_features(model, tokens, n_templates).cpu()
        self.model = model
        self.adapted = backbone.with_model(model, self.name)
        self.scale = torch.tensor(backbone.logit_scale)
        self.bias = torch.tensor(backbone.logit_bias or 0.0)
        self.class_names = list(class_names)

    def interpolate(self, alpha: float) -> "CLIPLoRA":
        """WiSE-FT after fitting: weights ``(1 − α)·zero-shot + α·adapted``; the text classifier follows."""
        self._check_fitted()
        alpha = check_alpha(alpha, self.name)
        if getattr(self, "_wise_end", None) is None or getattr(self, "_merged", False):
            raise ConfigError(f"{self.name}: interpolate() needs the unmerged adapted model; call it before merge().")
        interpolate_tensors(self.model, self._wise_start, self._wise_end, alpha)
        templates = self.fit_info["templates"]
        tokens = self.adapted.tokenize([t.format(c) for c in self.class_names for t in templates]).to(self.adapted.device)
        with torch.no_grad(), self.adapted.autocast():
            self.text_weights = _class_text_features(self.model, tokens, len(templates)).cpu()
        self.adapted = self.adapted.with_model(self.model, self.name)
        self.fit_info["wise_ft"] = {"alpha": alpha, "chosen_on": "given"}
        return self

    # -- prediction -------------------------------------------------------------------------
    def image_backbone(self, backbone):
        self._check_fitted()
        return self.adapted

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for image features from :meth:`image_backbone` (the adapted image encoder)."""
        self._check_fitted()
        return self.scale * features.float() @ self.text_weights.T + self.bias

    def merge(self) -> "CLIPLoRA":
        """Fold the LoRA updates into the weights (``W + s·B·A``): same logits, no adapter overhead."""
        self._check_fitted()
        # the frozen weights are shared with the backbone (towers.trainable_copy): peft adds
        # s·B·A to them in place, so the adapted layers get their own copy first
        for module in self.model.modules():
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(module, "lora_A"):
                base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        merged = self.model.merge_and_unload()
        self.model = merged
        self._merged = True
        self.adapted = self.adapted.with_model(merged, f"{self.name}(merged)")
        return self

    # -- persistence ------------------------------------------------------------------------
    def state(self):
        return {"text_weights": self.text_weights, "scale": self.scale, "bias": self.bias}

    def load_state(self, state):
        self.text_weights, self.scale, self.bias = state["text_weights"], state["scale"], state["bias"]

    def _saved_alpha(self) -> float | None:
        wise = self.fit_info.get("wise_ft")
        return None if not wise else float(wise["alpha"])

    def save_extra(self, folder: Path) -> None:
        if not hasattr(self.model, "save_pretrained") or getattr(self, "_merged", False):
            raise ConfigError("clip_lora: a merged model has no separate adapter to save; save before merge().")
        # the adapter is saved as adapted (alpha = 1); loading re-applies the recorded WiSE-FT alpha
        alpha = self._saved_alpha()
        if alpha is not None:
            interpolate_tensors(self.model, self._wise_start, self._wise_end, 1.0)
        try:
            save_lora(self.model, folder / "adapter")  # peft format: adapter_config.json + weights
        finally:
            if alpha is not None:
                interpolate_tensors(self.model, self._wise_start, self._wise_end, alpha)
        (folder / "adapter" / "workbench.json").write_text(json.dumps({"split_attention": True}))

    def after_load(self, folder: Path, backbone) -> None:
        if backbone is None:
            raise ConfigError(f"{self.name}: loading needs the backbone the weights were trained on "
                              "(use workbench.load(folder), which rebuilds it).")
        model = load_lora(trainable_copy(backbone), folder / "adapter").to(backbone.device).eval()
        self._wise_start, self._wise_end = self._wise_end_points(model)
        if self._saved_alpha() is not None:
            interpolate_tensors(model, self._wise_start, self._wise_end, self._saved_alpha())
        self.model = model
        self.adapted = backbone.with_model(model, self.name)
