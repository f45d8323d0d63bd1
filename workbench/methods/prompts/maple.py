"""MaPLe and its baselines IVLP and VPT-deep: deep prompts in both towers (Khattak et al., "MaPLe:
Multi-modal Prompt Learning", CVPR 2023; reference code muzairkhattak/multimodal-prompt-learning
``trainers/maple.py``, ``trainers/independentVL.py``, ``trainers/vpt.py``, ``clip/model.py``,
``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``, ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``,
``VPT/vit_b16_c2_ep5_batch4_4.yaml``).

All three run on :mod:`workbench.towers.prompts` (prompt tokens replaced at the input of blocks
``0 … depth−1``; image tokens appended after the patch tokens):

* **maple** — ``n_ctx = 2`` text tokens initialised from the first two words of "a photo of a"
  (the other two stay as frozen words: ``[SOS][ctx₁ ctx₂] of a [CLASS].``), fresh text prompts
  N(0, 0.02) for blocks 1 … J−1, and the *coupling*: the image prompts of block j are
  ``Linear_j(text prompts of block j)`` (one Linear text-width → image-width per block, PyTorch's
  default init). As in the reference (``MultiModalPromptLearner``: ``proj`` for the first block,
  ``_get_clones(single_layer, depth − 1)`` for the deeper ones), the deep coupling layers start as
  identical copies of one layer and the first block's layer is its own
  (``coupling_init="clones"``, default); ``coupling_init="independent"`` initialises every layer
  separately (the workbench's earlier behaviour: J distinct random maps at the start, so the deep
  image prompts start less alike; the trained layers diverge either way).
  Depth J = 9 (3 for the cross-dataset config); SGD lr 0.0035, 5 epochs, batch 4.
* **ivlp** — independent vision–language prompts: 2 text tokens ("a photo of a" init, as MaPLe)
  and 2 image tokens, each with its own N(0, 0.02) prompts in blocks 1 … 11 (depth 12 in both
  towers), no coupling; SGD lr 0.0035, 5 epochs, batch 4.
* **vpt_deep** — 8 image prompt tokens at depth 12, N(0, 0.02); the text side is the fixed
  hand-crafted "a photo of a {}."; SGD lr 0.0025, 5 epochs, batch 4.

Shared: cosine per epoch after one warm-up epoch at 1e-5 (momentum 0.9, weight decay 5e-4,
Dassl's defaults), RandomResizedCrop + flip, fp16 autocast on CUDA. Batches as Dassl's train loader
makes them (``drop_last=True`` when the support set holds at least one batch): a fresh shuffle cut
into ``N // batch_size`` full batches, the last partial batch dropped (so each epoch skips
``N mod batch_size`` random images, as the reference does); ``drop_last=False`` keeps it. Image prompts change the
image features, so these methods cannot use cached features: every step streams an augmented
image batch through the (frozen, prompted) image encoder and all class prompts through the
text encoder (:class:`workbench.training.ImageBatches`, as CLIP-LoRA). Only the prompts and the
coupling layers are trained and saved. The depths are checked against the towers: the
offline ``workbench-tiny`` has 3 blocks per tower, so use ``prompt_depth ≤ 3`` there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError
from ...towers.prompts import ContextPrompts, TextPrompter, VisionPrompter
from ...towers.text import TextTower
from ...training import ImageBatches, TrainConfig, train
from ..base import Method
from ..registry import register


@dataclass(frozen=True)
class Design:
    n_text: int
    n_vision: int
    depth_text: int
    depth_vision: int
    coupled: bool
    ctx_init: str
    coupling_init: str = "clones"


class MultiModalPrompts(nn.Module):
    """The learnable tokens of both towers (and MaPLe's coupling layers); nothing of the frozen model."""

    def __init__(self, tower: TextTower, tokenizer, class_names, vision_width: int, design: Design,
                 init_std: float, seed: int, method: str):
        super().__init__()
        self.design = design
        gen = torch.Generator().manual_seed(seed)
        device = tower.embedding.weight.device
        self.text = ContextPrompts(tower, tokenizer, class_names, design.n_text, design.ctx_init, init_std, gen, method)
        t_width = tower.embedding.weight.shape[1]

        def normal(n, width):
            return nn.Parameter(torch.empty(n, width).normal_(0.0, init_std, generator=gen).to(device))

        self.text_deep = nn.ParameterList([normal(design.n_text, t_width) for _ in range(max(design.depth_text - 1, 0))])
        if design.coupled:
            torch.manual_seed(seed)  # default Linear init of the coupling layers
            if design.coupling_init == "clones":   # reference: proj, then _get_clones(single_layer, depth - 1)
                first, single = nn.Linear(t_width, vision_width), nn.Linear(t_width, vision_width)
                layers = [first] + [copy.deepcopy(single) for _ in range(design.depth_vision - 1)]
            else:
                layers = [nn.Linear(t_width, vision_width) for _ in range(design.depth_vision)]
            self.couple = nn.ModuleList(layers).to(device)
        else:
            self.vision = nn.ParameterList([normal(design.n_vision, vision_width)
                                            for _ in range(design.depth_vision if design.n_vision else 0)])

    def vision_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(shallow ``[n, D_v]``, deep prompts of blocks 1 … J−1)."""
        if self.design.coupled:
            sources = [self.text.ctx, *self.text_deep]
            tokens = [proj(src) for proj, src in zip(self.couple, sources)]
        else:
            tokens = list(self.vision)
        return (tokens[0], tokens[1:]) if tokens else (None, [])


@dataclass
class MaPLeConfig:
    #: prompt tokens per block (text and, through the coupling, image)
    n_ctx: int = 2
    #: the text tokens start as the first n_ctx words of this; the rest stay as frozen words
    ctx_init: str = "a photo of a"
    #: blocks that get prompts, counted from the input (reference 9; cross-dataset 3)
    prompt_depth: int = 9
    init_std: float = 0.02
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 4
    aug_scale: tuple = (0.08, 1.0)
    grad_clip: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    #: drop the last partial batch of each epoch, as Dassl's train loader (reference); False keeps it
    drop_last: bool = True
    #: MaPLe's coupling layers: "clones" (reference: the deep layers start as copies of one layer) or
    #: "independent" (each layer its own init); IVLP and VPT-deep have no coupling
    coupling_init: str = "clones"

    def design(self) -> Design:
        return Design(self.n_ctx, self.n_ctx, self.prompt_depth, self.prompt_depth, True, self.ctx_init,
                      self.coupling_init)


@dataclass
class IVLPConfig(MaPLeConfig):
    n_ctx_vision: int = 2
    prompt_depth: int = 12
    #: image prompt depth (the text side uses prompt_depth)
    prompt_depth_vision: int = 12

    def design(self) -> Design:
        return Design(self.n_ctx, self.n_ctx_vision, self.prompt_depth, self.prompt_depth_vision, False, self.ctx_init)


@dataclass
class VPTDeepConfig(MaPLeConfig):
    n_ctx: int = 8
    prompt_depth: int = 12
    lr: float = 0.0025

    def design(self) -> Design:
        return Design(0, self.n_ctx, 0, self.prompt_depth, False, self.ctx_init)


class _DasslBatches(ImageBatches):
    """ImageBatches as Dassl's train loader cuts them: ``N // batch_size`` full batches per epoch (the
    last partial one dropped), one partial batch when the support set is smaller than a batch."""

    def __len__(self) -> int:
        from .coop import steps_per_epoch

        return steps_per_epoch(len(self.images), self.batch_size)

    def _batch_indices(self, generator: torch.Generator):
        order = torch.randperm(len(self.images), generator=generator)
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()


class PromptedModel(nn.Module):
    """The frozen CLIP model whose ``encode_image`` runs with the learned image prompts (for prediction)."""

    def __init__(self, model: nn.Module, prompts: MultiModalPrompts, prompter: VisionPrompter):
        super().__init__()
        self.model, self.prompts = model, prompts
        self._prompter = prompter

    @property
    def logit_scale(self):
        return self.model.logit_scale

    @property
    def logit_bias(self):
        return getattr(self.model, "logit_bias", None)

    def encode_image(self, pixels, normalize: bool = False):
        shallow, deep = self.prompts.vision_prompts()
        with self._prompter.prompts(shallow, deep):
            feats = self.model.encode_image(pixels)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens, normalize: bool = False):
        return self.model.encode_text(tokens, normalize=normalize)


@register("maple")
class MaPLe(Method):
    Config = MaPLeConfig
    uses_images = True
    param_bounds = {"prompt_depth": {"minimum": 1}, "n_ctx_vision": {"minimum": 1},
                    "prompt_depth_vision": {"minimum": 1}}

    def _build(self, backbone, class_names, seed: int):
        design = self.config.design()
        if design.coupling_init not in ("clones", "independent"):
            raise ConfigError(f"{self.name}: coupling_init must be 'clones' (the reference) or 'independent', got "
                              f"{design.coupling_init!r}.")
        model = backbone.model
        tower = TextTower(model, self.name)
        text = TextPrompter(tower, design.n_text, design.depth_text, self.name)
        vision = VisionPrompter(model.visual, design.n_vision, design.depth_vision, self.name)
        prompts = MultiModalPrompts(tower, backbone.tokenizer, class_names, vision.width, design, self.config.init_std,
                                    seed, self.name)
        return text, vision, prompts

    def _text_features(self, text: TextPrompter, prompts: MultiModalPrompts) -> torch.Tensor:
        return F.normalize(text.encode(prompts.text(), prompts.text.tokens, list(prompts.text_deep)).float(), dim=-1)

    def fit(self, task) -> "MaPLe":
        cfg = self.config
        backbone = task.backbone
        model = backbone.model
        for p in model.parameters():
            p.requires_grad_(False)
        text, vision, prompts = self._build(backbone, task.class_names, task.seed)  # bad depths fail here
        images, labels = task.support_images()
        batches = (_DasslBatches if cfg.drop_last else ImageBatches)(
            images, labels, backbone.augment_transform(tuple(cfg.aug_scale)), cfg.batch_size, seed=task.seed,
            device=backbone.device)
        scale, bias = backbone.logit_scale, backbone.logit_bias or 0.0
        fixed_text = None
        if prompts.design.n_text == 0:  # VPT-deep: the hand-crafted prompt, encoded once
            with torch.no_grad():
                fixed_text = self._text_features(text, prompts)

        def loss_fn(batch):
            pixels, y = batch
            shallow, deep = prompts.vision_prompts()
            with vision.prompts(shallow, deep):
                img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = fixed_text if fixed_text is not None else self._text_features(text, prompts)
            return F.cross_entropy(scale * img @ txt.T + bias, y)

        tcfg = TrainConfig(epochs=cfg.epochs, optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, schedule="cosine_epoch", warmup_epochs=cfg.warmup_epochs,
                           warmup_lr=cfg.warmup_lr, grad_clip=cfg.grad_clip, seed=task.seed,
                           checkpoint_every=cfg.checkpoint_every if cfg.checkpoint_dir else None)
        model.eval()
        history = train(prompts, loss_fn, batches, tcfg, device=backbone.device, precision=backbone.precision,
                        checkpoint_dir=cfg.checkpoint_dir, identity=self.checkpoint_identity(task),
                        steps_per_epoch=len(batches), desc=type(self).__name__, cpu_hint="epochs={epochs}")
        self.class_names = task.class_names
        self._attach(backbone, text, vision, prompts)
        d = prompts.design
        self.fit_info = {"design": {"n_text": d.n_text, "n_vision": d.n_vision, "depth_text": d.depth_text,
                                    "depth_vision": d.depth_vision, "coupled": d.coupled,
                                    "coupling_init": d.coupling_init if d.coupled else None},
                         "drop_last": cfg.drop_last, "steps_per_epoch": len(batches),
                         "epochs": cfg.epochs, "steps": history["steps"],
                         "trainable_parameters": sum(p.numel() for p in prompts.parameters() if p.requires_grad),
                         "first_epoch_loss": history["epoch_loss"][0], "final_loss": history["epoch_loss"][-1],
                         "epoch_loss": history["epoch_loss"], "text_tower": text.tower.kind,
                         "resumed_from_epoch": history["resumed_from_epoch"]}
        return self

    def _attach(self, backbone, text, vision, prompts):
        prompts.eval()
        with torch.no_grad(), backbone.autocast():
            self.text_weights = self._text_features(text, prompts).cpu()
        self.prompts = prompts
        self.adapted = backbone.with_model(PromptedModel(backbone.model, prompts, vision), self.name)
        self.scale = torch.tensor(backbone.logit_scale)
        self.bias = torch.tensor(backbone.logit_bias or 0.0)

    # -- prediction -------------------------------------------------------------------------
    def image_backbone(self, backbone):
        self._check_fitted()
        if getattr(self, "adapted", None) is None:
            raise ConfigError(f"{self.name}: a loaded model needs its backbone (use workbench.load(folder)).")
        return self.adapted

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for image features from :meth:`image_backbone` (the prompted image encoder)."""
        self._check_fitted()
        return self.scale * features.float() @ self.text_weights.T + self.bias

    def for_classes(self, class_names, backbone) -> "MaPLe":
        """The learned prompts with other class names (base-to-new)."""
        self._check_fitted()
        other = type(self)(self.config)
        other.class_names, other.fit_info = list(class_names), dict(self.fit_info)
        other.load_state(self.state())
        other.after_load(None, backbone)
        return other

    # -- persistence ------------------------------------------------------------------------
    def state(self):
        s = {f"prompts.{k}": v.detach().cpu() for k, v in self.prompts.state_dict().items()}
        return {**s, "text_weights": self.text_weights, "scale": self.scale, "bias": self.bias}

    def load_state(self, state):
        self._loaded = dict(state)
        self.text_weights, self.scale, self.bias = state["text_weights"], state["scale"], state["bias"]
        self.adapted = None

    def after_load(self, folder, backbone) -> None:
        if backbone is None:
            raise ConfigError(f"{self.name}: loading needs the backbone it was trained on (use workbench.load(folder)).")
        text, vision, prompts = self._build(backbone, self.class_names, 0)
        prompts.load_state_dict({k[len("prompts."):]: v for k, v in self._loaded.items() if k.startswith("prompts.")})
        prompts.to(backbone.device)
        self._attach(backbone, text, vision, prompts)


@register("ivlp")
class IVLP(MaPLe):
    Config = IVLPConfig


@register("vpt_deep")
class VPTDeep(MaPLe):
    Config = VPTDeepConfig
