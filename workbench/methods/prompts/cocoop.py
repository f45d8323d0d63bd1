"""CoCoOp: conditional context optimisation (Zhou et al., "Conditional Prompt Learning for
Vision-Language Models", CVPR 2022; reference code KaiyangZhou/CoOp ``trainers/cocoop.py``,
``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``).

CoOp's shared context ``ctx`` (4 tokens initialised from "a photo of a") is shifted, per image,
by a meta-net ``π(f) = Linear(D/16 → W)(ReLU(Linear(D → D/16)(f)))`` of the image's normalised
feature ``f``: the prompt of class c for image i is ``[SOS][ctx + π(f_i)][CLASS][.][EOS]`` and
``logit_ic = logit_scale · cos(f_i, g(prompt_ic))``. The meta-net has PyTorch's default Linear
initialisation (as the reference); ctx and meta-net are trained, both encoders are frozen.

Defaults from the config: batch 1, 10 epochs, SGD lr 0.002 (momentum 0.9, weight decay 5e-4),
cosine after one warm-up epoch at 1e-5, RandomResizedCrop + flip, fp16 on CUDA. The image
encoder is frozen, so (as for CoOp) one augmented view of the support set per epoch comes from
the feature cache. A batch of B images is one text-encoder call on B × C prompts built by
broadcasting (the reference loops over images), each prompt cut to the longest class prompt
(the text tower's exact truncation, :mod:`workbench.towers.text`); prediction goes in chunks of
``eval_batch_size`` images. With the meta-net's output at zero it is CoOp (tested).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError
from ...towers.text import TextTower
from ...training import TrainConfig, train
from ..base import Method
from ..registry import register
from .coop import PromptLearner, steps_per_epoch, view_batches


class ConditionalPrompts(nn.Module):
    """CoOp context + the meta-net: ``[B, D]`` image features → ``[B·C, L, W]`` prompt embeddings."""

    def __init__(self, learner: PromptLearner, vis_dim: int, hidden_ratio: int = 16):
        super().__init__()
        self.learner = learner
        width = learner.ctx.shape[-1]
        hidden = max(vis_dim // hidden_ratio, 1)
        self.meta_net = nn.Sequential(OrderedDict([("linear1", nn.Linear(vis_dim, hidden)), ("relu", nn.ReLU()),
                                                   ("linear2", nn.Linear(hidden, width))]))
        self.meta_net.to(learner.ctx.device)

    def forward(self, image_features: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """``[B·C, length, W]`` prompts (row ``i·C + c`` = class c for image i), built by broadcasting the
        ``[B, n, W]`` shifted contexts against the ``[C, ·, W]`` frozen parts: no loop over images.

        ``length`` cuts every prompt to its first positions (the text tower's active length) before
        the B·C copies are made, so the trailing padding is never copied.
        """
        lr = self.learner
        b, c = image_features.shape[0], lr.prefix.shape[0]
        suffix = lr.suffix if length is None else lr.suffix[:, :length - lr.prefix.shape[1] - lr.ctx.shape[-2]]
        shift = self.meta_net(image_features.to(lr.ctx.dtype))                    # [B, W]
        ctx = (lr.ctx[None] + shift[:, None]).to(lr.prefix.dtype)                # [B, n, W]
        parts = [lr.prefix[None].expand(b, -1, -1, -1), ctx[:, None].expand(-1, c, -1, -1),
                 suffix[None].expand(b, -1, -1, -1)]
        return torch.cat(parts, dim=2).reshape(b * c, -1, lr.prefix.shape[-1])

    def text_features(self, tower: TextTower, image_features: torch.Tensor) -> torch.Tensor:
        """``[B, C, D]`` normalised class text features conditioned on each image: one text-encoder
        call on the B·C prompts, each run only up to the longest class prompt (exact)."""
        b = image_features.shape[0]
        n = tower.active_length(self.learner.tokens)  # cached per token buffer: no host sync per step
        tokens = self.learner.tokens[:, :n].repeat(b, 1)
        txt = tower.encode(self(image_features, n), tokens, length=n).float()
        return F.normalize(txt, dim=-1).view(b, self.learner.prefix.shape[0], -1)


def conditional_logits(prompts: ConditionalPrompts, tower: TextTower, image_features: torch.Tensor,
                       scale: float, bias: float = 0.0) -> torch.Tensor:
    x = image_features.float()
    txt = prompts.text_features(tower, x)
    return scale * torch.einsum("bd,bcd->bc", x, txt) + bias


@dataclass
class CoCoOpConfig:
    #: initialise the 4 context vectors from these words ("" = n_ctx random vectors)
    ctx_init: str = "a photo of a"
    #: number of context vectors when ctx_init is empty
    n_ctx: int = 4
    init_std: float = 0.02
    #: meta-net hidden width = feature dim / this
    hidden_ratio: int = 16
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    epochs: int = 10
    batch_size: int = 1
    #: images per text-encoder call at prediction (each image needs its own C prompts)
    eval_batch_size: int = 32
    #: distinct augmented views of the support set (one per epoch by default)
    augment_views: int | None = None
    aug_scale: tuple = (0.08, 1.0)
    grad_clip: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10


@register("cocoop")
class CoCoOp(Method):
    Config = CoCoOpConfig
    param_bounds = {"hidden_ratio": {"minimum": 1}, "eval_batch_size": {"minimum": 1}}

    def _learner(self, backbone, class_names, seed):
        """The text tower and CoOp's context: the bad-input checks (text tower, n_ctx vs class names)."""
        cfg = self.config
        tower = TextTower(backbone.model, "cocoop")
        gen = torch.Generator().manual_seed(seed)
        learner = PromptLearner(tower, backbone.tokenizer, list(class_names), cfg.n_ctx, cfg.ctx_init, False, "end",
                                cfg.init_std, gen)
        return tower, learner

    def _conditional(self, learner, vis_dim, seed):
        torch.manual_seed(seed)  # the meta-net's default Linear initialisation
        return ConditionalPrompts(learner, vis_dim, self.config.hidden_ratio)

    def _build(self, backbone, class_names, vis_dim, seed):
        tower, learner = self._learner(backbone, class_names, seed)
        return tower, self._conditional(learner, vis_dim, seed)

    def fit(self, task) -> "CoCoOp":
        cfg = self.config
        backbone = task.backbone
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        # the text side first: an unsupported tower or a too long n_ctx fails before any image is encoded
        tower, learner = self._learner(backbone, task.class_names, task.seed)
        n_views = min(cfg.augment_views or cfg.epochs, cfg.epochs)
        views = task.support(views=n_views, aug_scale=tuple(cfg.aug_scale), stream="coop")
        feats = views.views  # on the CPU: one batch at a time goes to the device (view_batches)
        prompts = self._conditional(learner, feats.shape[-1], task.seed)
        scale, bias = backbone.logit_scale, backbone.logit_bias or 0.0
        steps = steps_per_epoch(feats.shape[1], cfg.batch_size)
        batches = view_batches(feats, views.labels, cfg.batch_size, backbone.device)

        def loss_fn(batch):
            x, y = batch
            return F.cross_entropy(conditional_logits(prompts, tower, x, scale, bias), y)

        tcfg = TrainConfig(epochs=cfg.epochs, optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, schedule="cosine_epoch", warmup_epochs=cfg.warmup_epochs,
                           warmup_lr=cfg.warmup_lr, grad_clip=cfg.grad_clip, seed=task.seed,
                           checkpoint_every=cfg.checkpoint_every if cfg.checkpoint_dir else None)
        backbone.model.eval()
        history = train(prompts, loss_fn, batches, tcfg, device=backbone.device, precision=backbone.precision,
                        checkpoint_dir=cfg.checkpoint_dir, identity=self.checkpoint_identity(task),
                        steps_per_epoch=steps, desc="CoCoOp", cpu_hint="epochs={epochs}", batch_size=cfg.batch_size)
        self._attach(backbone, tower, prompts)
        self.class_names = task.class_names
        self.fit_info = {"n_ctx": prompts.learner.n_ctx, "ctx_init": cfg.ctx_init, "epochs": cfg.epochs,
                         "augment_views": n_views, "steps": history["steps"], "batch_size": cfg.batch_size,
                         "first_epoch_loss": history["epoch_loss"][0], "final_loss": history["epoch_loss"][-1],
                         "epoch_loss": history["epoch_loss"], "text_tower": tower.kind,
                         "resumed_from_epoch": history["resumed_from_epoch"]}
        return self

    def _attach(self, backbone, tower, prompts):
        self.backbone, self.tower, self.prompts = backbone, tower, prompts.eval()
        self.scale = torch.tensor(backbone.logit_scale)
        self.bias = torch.tensor(backbone.logit_bias or 0.0)

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if getattr(self, "prompts", None) is None:
            raise ConfigError("cocoop: a loaded CoCoOp needs its backbone (use workbench.load(folder)).")
        out = []
        device = self.prompts.learner.ctx.device
        with torch.no_grad(), self.backbone.autocast():
            for i in range(0, len(features), self.config.eval_batch_size):
                x = features[i:i + self.config.eval_batch_size].to(device)
                out.append(conditional_logits(self.prompts, self.tower, x, float(self.scale), float(self.bias))
                           .float().cpu())
        return torch.cat(out)

    def for_classes(self, class_names, backbone) -> "CoCoOp":
        """The learned context and meta-net with other class names (base-to-new)."""
        self._check_fitted()
        other = type(self)(self.config)
        other.load_state(self.state())
        other.class_names, other.fit_info = list(class_names), dict(self.fit_info)
        other.after_load(None, backbone)
        return other

    def state(self):
        s = {"ctx": self.prompts.learner.ctx.detach().cpu().float(), "scale": self.scale, "bias": self.bias}
        s.update({f"meta_net.{k}": v.detach().cpu() for k, v in self.prompts.meta_net.state_dict().items()})
        return s

    def load_state(self, state):
        self._loaded = dict(state)
        self.prompts = None

    def after_load(self, folder, backbone) -> None:
        if backbone is None:
            raise ConfigError("cocoop: loading needs the backbone it was trained on (use workbench.load(folder)).")
        state = self._loaded
        vis_dim = state["meta_net.linear1.weight"].shape[1]
        tower, prompts = self._build(backbone, self.class_names, vis_dim, 0)
        with torch.no_grad():
            prompts.learner.ctx.copy_(state["ctx"])
        prompts.meta_net.load_state_dict({k[len("meta_net."):]: v for k, v in state.items() if k.startswith("meta_net.")})
        prompts.to(backbone.device)
        self._attach(backbone, tower, prompts)
        self.scale, self.bias = state["scale"], state["bias"]
