"""CoOp: context optimisation (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV
2022; reference code KaiyangZhou/CoOp ``trainers/coop.py``, ``configs/trainers/CoOp/*.yaml``,
Dassl defaults).

Learnable context vectors live in the text encoder's token-embedding space: the prompt of
class c is ``[SOS][ctx_1 … ctx_M][CLASS][.][EOS]`` (class token at the end; ``middle`` and
``front`` as in the reference). ``n_ctx = 16`` vectors drawn from N(0, 0.02) shared by all
classes, or initialised from words (``ctx_init="a photo of a"`` → 4 vectors), or one set per
class (``csc=True``). Only the context vectors are trained. Logits are
``logit_scale · cos(f_img, f_txt(ctx))``.

Training: SGD(lr 0.002, momentum 0.9, weight decay 5e-4), batch 32, cosine per epoch after one
warm-up epoch at a constant 1e-5 (Dassl's ``ConstantWarmupScheduler``), epochs 50/100/100/200/200
for K = 1/2/4/8/16, RandomResizedCrop(scale 0.08–1) + flip, mixed precision on CUDA; the last
epoch is kept. The image encoder is frozen, so its features of every epoch's fresh augmentation
come from the feature cache (one augmented view per epoch, ``augment_views`` to cap it) and each
step only runs the text encoder — with all class prompts, as the reference does. Each epoch
is a fresh shuffle cut into ``N // batch_size`` full batches: the last partial batch is dropped
when N ≥ batch size, as Dassl's ``dassl/data/data_manager.py:build_data_loader`` does.

WiSE-FT for the prompts (``wise_alpha``; Wortsman et al. CVPR'22, as ``clip_lora``/``clip_svd``
offer it): when the context is initialised from words (``ctx_init``), those words' embeddings
are a zero-shot end point, and the context becomes ``(1 − α)·ctx_init + α·ctx_learned`` — α = 0
is zero-shot CLIP with the template ``"<ctx_init> {}."``, α = 1 the trained CoOp. α is given, or
``"val"``: the best K-shot validation accuracy on the grid 0, 0.1, …, 1 (ties to the larger α;
never the test set). It is recorded in ``fit_info["wise_ft"]``; :meth:`CoOp.interpolate` changes
it after fitting. It does not apply to a random initialisation (no zero-shot context) nor to
class-specific contexts (``csc=True``): both are a ConfigError. (Interpolating the prompt vectors
is this workbench's transfer of WiSE-FT, which the paper defines for weights; the text features
are not linear in the context, so α in between is not an average of the two classifiers.)

Supported text towers: open_clip's native CLIP text transformer (OpenAI/LAION/DFN ViTs, RemoteCLIP,
GeoRSCLIP, BioCLIP, QuiltNet, the offline default) and Hugging Face text towers (BiomedCLIP's
PubMedBERT; BiomedCoOp runs CoOp on it). Others (SigLIP's ``TextTransformer``, MobileCLIP) raise
a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError
from ...towers.interpolate import ALPHA_GRID, check_alpha, interpolate_tensors
from ...towers.prompts import check_context_fits
from ...towers.text import TextTower, content_length
from ...training import TrainConfig, train
from ..base import Method
from ..registry import register

EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def default_epochs(shots: int) -> int:
    """The reference schedule: 50/100/100/200/200 epochs for K = 1/2/4/8/16 (other K: the next lower K's)."""
    return EPOCHS_BY_SHOTS[max(k for k in EPOCHS_BY_SHOTS if k <= max(shots, 1))]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch as Dassl's ``build_data_loader`` makes them: the last partial batch is
    dropped (``drop_last=is_train and len(data_source) >= batch_size``), so a support set
    smaller than one batch still gives one (partial) batch."""
    return n // batch_size if n >= batch_size else 1


def view_batches(views: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
    """The epoch-batch source of the prompt learners that train on cached image features (CoOp and
    its subclasses, CoCoOp): epoch e is a fresh shuffle of the support set (the loop's CPU
    generator) cut into :func:`steps_per_epoch` batches of augmented view ``e mod V``.

    The ``[V, N, D]`` views stay on the CPU, where the cache holds them (V passes of a large support
    set are GiBs: ImageNet at 16 shots, 200 views of ViT-B/16's 512-d features, ~6.5 GB); only each
    batch is copied to ``device`` as it is used, so the GPU holds one batch, not every view.
    """
    n_views, n = views.shape[0], views.shape[1]
    steps = steps_per_epoch(n, batch_size)

    def batches(epoch, gen):
        order = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield views[epoch % n_views][idx].to(device), labels[idx].to(device)

    return batches


def _text_weights(tower: TextTower, learner: "PromptLearner", backbone) -> torch.Tensor:
    """Normalised class text features of the learner's current context (CPU, float32)."""
    with torch.no_grad(), backbone.autocast():
        return F.normalize(tower.encode(learner(), learner.tokens).float(), dim=-1).cpu()


class PromptLearner(nn.Module):
    """Context vectors + the frozen token embeddings of SOS, class names and the rest."""

    def __init__(self, tower: TextTower, tokenizer, class_names, n_ctx: int, ctx_init: str, csc: bool,
                 position: str, init_std: float, generator: torch.Generator):
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ConfigError(f"class_token_position must be 'end', 'middle' or 'front', got {position!r}.")
        device = tower.embedding.weight.device
        if ctx_init:
            init_tokens = tokenizer([ctx_init.strip()]).to(device)
            n_ctx = content_length(tower, init_tokens[0])
            with torch.no_grad():
                ctx = tower.embed(init_tokens)[0, 1:1 + n_ctx].float()
            if csc:
                ctx = ctx[None].repeat(len(class_names), 1, 1)
            prefix_text = ctx_init.strip()
        else:
            width = tower.embedding.weight.shape[1]
            shape = (len(class_names), n_ctx, width) if csc else (n_ctx, width)
            ctx = torch.empty(shape).normal_(0.0, init_std, generator=generator).to(device)
            prefix_text = " ".join(["X"] * n_ctx)
        check_context_fits(tokenizer, class_names, n_ctx, "coop")  # the tokenizer would truncate silently
        self.ctx = nn.Parameter(ctx)
        self.n_ctx, self.csc, self.position = n_ctx, csc, position
        prompts = [f"{prefix_text} {name}." for name in class_names]
        tokens = tokenizer(prompts).to(device)
        with torch.no_grad():
            emb = tower.embed(tokens).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1], persistent=False)            # SOS / CLS
        self.register_buffer("suffix", emb[:, 1 + n_ctx:], persistent=False)    # CLASS, '.', EOS, padding
        # class-name token counts (for middle/front): content length minus the context and the '.'
        self.name_lens = [content_length(tower, t) - n_ctx - 1 for t in tokens]

    def forward(self) -> torch.Tensor:
        c = self.prefix.shape[0]
        ctx = self.ctx if self.csc else self.ctx[None].expand(c, -1, -1)
        ctx = ctx.to(self.prefix.dtype)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i in range(c):
            n = self.name_lens[i]
            name, rest = self.suffix[i:i + 1, :n], self.suffix[i:i + 1, n:]
            if self.position == "middle":
                rows.append(torch.cat([self.prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest], 1))
            else:
                rows.append(torch.cat([self.prefix[i:i + 1], name, ctx[i:i + 1], rest], 1))
        return torch.cat(rows, 0)


@dataclass
class CoOpConfig:
    #: number of learnable context vectors (ignored when ctx_init is given)
    n_ctx: int = 16
    #: initialise the context from these words, e.g. "a photo of a" (then n_ctx = their token count)
    ctx_init: str = ""
    #: class-specific contexts (one set per class) instead of one shared set
    csc: bool = False
    #: where the class name goes: "end", "middle" or "front"
    class_token_position: str = "end"
    init_std: float = 0.02
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    #: None = the reference schedule by K (50/100/100/200/200)
    epochs: int | None = None
    batch_size: int = 32
    #: distinct augmented views of the support set (one per epoch by default; fewer = reused in turn)
    augment_views: int | None = None
    aug_scale: tuple = (0.08, 1.0)
    grad_clip: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    #: WiSE-FT (needs ctx_init, shared context): None = learned context (alpha 1), a number in
    #: [0, 1] between the ctx_init words (0) and the learned context (1), or "val" (chosen on the K-shot val set)
    wise_alpha: float | str | None = None


def check_wise_alpha(cfg, method: str):
    """The validated ``wise_alpha`` (None, "val" or a float in [0, 1]), or a ConfigError saying why it
    cannot apply: WiSE-FT needs a zero-shot context, i.e. ``ctx_init`` words and one shared context."""
    value = cfg.wise_alpha
    if value is None:
        return None
    if isinstance(value, str) and value != "val":
        raise ConfigError(f"{method}: wise_alpha must be None, a number in [0, 1] or 'val', got {value!r}.")
    if value != "val":
        value = check_alpha(value, method)
    if not str(cfg.ctx_init).strip():
        raise ConfigError(f"{method}: wise_alpha needs ctx_init (e.g. ctx_init='a photo of a'): WiSE-FT interpolates "
                          "from the zero-shot context of those words, and a random context has no zero-shot end "
                          "point. Set ctx_init or drop wise_alpha.")
    if cfg.csc:
        raise ConfigError(f"{method}: wise_alpha does not apply with csc=True (class-specific contexts); use the "
                          "shared context (csc=False) or drop wise_alpha.")
    return value


@register("coop")
class CoOp(Method):
    Config = CoOpConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        check_wise_alpha(self.config, self.name)  # before any image is encoded

    def fit(self, task) -> "CoOp":
        cfg = self.config
        wise = check_wise_alpha(cfg, self.name)
        if wise == "val" and not task.val_samples():
            raise ConfigError(f"{self.name}: wise_alpha='val' chooses alpha on the K-shot validation images, and this "
                              "split has none; give wise_alpha a number in [0, 1] instead.")
        backbone = task.backbone
        model = backbone.model
        for p in model.parameters():
            p.requires_grad_(False)
        tower = TextTower(model)
        gen = torch.Generator().manual_seed(task.seed)
        learner = PromptLearner(tower, backbone.tokenizer, task.class_names, cfg.n_ctx, cfg.ctx_init, cfg.csc,
                                cfg.class_token_position, cfg.init_std, gen)
        init_ctx = learner.ctx.detach().float().clone()  # the ctx_init words: WiSE-FT's zero-shot end point
        epochs = cfg.epochs if cfg.epochs is not None else default_epochs(task.shots)
        n_views = min(cfg.augment_views or epochs, epochs)
        views = task.support(views=n_views, aug_scale=tuple(cfg.aug_scale), flip=getattr(cfg, "flip", True),
                             stream="coop")
        feats = views.views  # on the CPU: one batch at a time goes to the device (view_batches)
        scale, bias = backbone.logit_scale, backbone.logit_bias or 0.0
        steps = steps_per_epoch(feats.shape[1], cfg.batch_size)
        batches = view_batches(feats, views.labels, cfg.batch_size, backbone.device)

        extra = self._regulariser(task, tower)  # KgCoOp, BiomedCoOp add a term to the loss

        def loss_fn(batch):
            x, y = batch
            txt = F.normalize(tower.encode(learner(), learner.tokens).float(), dim=-1)
            logits = scale * x @ txt.T + bias
            loss = F.cross_entropy(logits, y)
            return loss if extra is None else loss + extra(txt, x, logits)

        tcfg = TrainConfig(epochs=epochs, optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, schedule="cosine_epoch", warmup_epochs=cfg.warmup_epochs,
                           warmup_lr=cfg.warmup_lr, grad_clip=cfg.grad_clip, seed=task.seed,
                           checkpoint_every=cfg.checkpoint_every if cfg.checkpoint_dir else None)
        model.eval()
        self._train_mode(model)   # BiomedCoOp: the reference's model.train() (text-tower dropout)
        try:
            history = train(learner, loss_fn, batches, tcfg, device=backbone.device, precision=backbone.precision,
                            checkpoint_dir=cfg.checkpoint_dir, identity=self.checkpoint_identity(task),
                            steps_per_epoch=steps, desc=type(self).__name__, cpu_hint="epochs={epochs}",
                            batch_size=cfg.batch_size)
        finally:
            model.eval()   # the backbone is shared: never leave it in train mode
        self.scale, self.bias = torch.tensor(scale), torch.tensor(bias)
        wise_info = None
        if wise is not None:
            self.wise_start, self.wise_end = init_ctx.cpu(), learner.ctx.detach().float().cpu().clone()
            if wise == "val":
                val = task.validation()
                val_x, val_y = val.x.to(backbone.device), val.labels.to(backbone.device)
                scores = {}
                for a in ALPHA_GRID:
                    interpolate_tensors(learner, {"ctx": self.wise_start}, {"ctx": self.wise_end}, a)
                    text = _text_weights(tower, learner, backbone).to(backbone.device)
                    scores[a] = float(((val_x.float() @ text.T).argmax(-1) == val_y).float().mean())
                # ties go to the larger alpha (closer to the trained context, the method's own default)
                alpha = max(ALPHA_GRID, key=lambda a: (scores[a], a))
                wise_info = {"alpha": alpha, "chosen_on": "val", "val_accuracy": {str(a): v for a, v in scores.items()}}
            else:
                wise_info = {"alpha": wise, "chosen_on": "given"}
            interpolate_tensors(learner, {"ctx": self.wise_start}, {"ctx": self.wise_end}, wise_info["alpha"])
        self.text_weights = _text_weights(tower, learner, backbone)
        self.ctx = learner.ctx.detach().cpu().float()
        self.class_names = task.class_names
        self.fit_info = {"n_ctx": learner.n_ctx, "ctx_init": cfg.ctx_init, "csc": cfg.csc, "epochs": epochs,
                         "augment_views": n_views, "steps": history["steps"], "final_loss": history["epoch_loss"][-1],
                         "first_epoch_loss": history["epoch_loss"][0], "epoch_loss": history["epoch_loss"], "text_tower": tower.kind,
                         "resumed_from_epoch": history["resumed_from_epoch"], "wise_ft": wise_info}
        return self

    def interpolate(self, alpha: float, backbone) -> "CoOp":
        """WiSE-FT after fitting (or loading): context ``(1 − α)·ctx_init + α·learned`` and its text
        classifier, on the ``backbone`` the context was trained with. Needs ``wise_alpha`` at fit time
        (which keeps both end points)."""
        self._check_fitted()
        alpha = check_alpha(alpha, self.name)
        if getattr(self, "wise_end", None) is None:
            raise ConfigError(f"{self.name}: interpolate() needs the zero-shot context, kept only when fitted with "
                              "wise_alpha (and ctx_init); refit with wise_alpha=1.0 to interpolate later.")
        tower = TextTower(backbone.model)
        learner = PromptLearner(tower, backbone.tokenizer, list(self.class_names), self.config.n_ctx,
                                self.config.ctx_init, False, self.config.class_token_position, 0.0, torch.Generator())
        interpolate_tensors(learner, {"ctx": self.wise_start}, {"ctx": self.wise_end}, alpha)
        self.text_weights = _text_weights(tower, learner, backbone)
        self.ctx = learner.ctx.detach().cpu().float()
        self.fit_info["wise_ft"] = {"alpha": alpha, "chosen_on": "given"}
        return self

    def for_classes(self, class_names, backbone) -> "CoOp":
        """The learned (shared) context with other class names: base-to-new evaluation."""
        self._check_fitted()
        if self.config.csc:
            raise ConfigError(f"{self.name}: class-specific contexts (csc=True) cannot describe new classes; "
                              "use csc=False for base-to-new.")
        tower = TextTower(backbone.model)
        learner = PromptLearner(tower, backbone.tokenizer, list(class_names), self.ctx.shape[0], "", False,
                                self.config.class_token_position, 0.0, torch.Generator())
        with torch.no_grad(), backbone.autocast():
            learner.ctx.copy_(self.ctx.to(learner.ctx.device))
            text = F.normalize(tower.encode(learner(), learner.tokens).float(), dim=-1).cpu()
        other = type(self)(self.config)
        other.load_state({**self.state(), "text_weights": text})
        other.class_names, other.fit_info = list(class_names), dict(self.fit_info)
        return other

    def _regulariser(self, task, tower):
        """None, or ``f(text_features, image_features, logits) -> loss term`` added to the cross-entropy."""
        return None

    def _train_mode(self, model) -> None:
        """Modules to put in train mode while the context learns (CoOp: none; the CLIP text tower has
        no dropout, so the reference's mode makes no difference here)."""

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self.scale * features.float() @ self.text_weights.T + self.bias

    def state(self):
        state = {"ctx": self.ctx, "text_weights": self.text_weights, "scale": self.scale, "bias": self.bias}
        if getattr(self, "wise_end", None) is not None:  # WiSE-FT's end points: interpolate() after loading
            state.update(wise_start=self.wise_start, wise_end=self.wise_end)
        return state

    def load_state(self, state):
        for key, value in state.items():
            setattr(self, key, value)
