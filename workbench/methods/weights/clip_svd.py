"""CLIP-SVD (Koleilat et al., "Singular Value Few-shot Adaptation of Vision-Language Models",
arXiv 2509.03740; reference code HealthX-Lab/CLIP-SVD ``svf_utils/svf_torch.py``,
``svf_utils/utils.py``, ``train.py``, ``configs/few_shot/*.yaml``).

* Every targeted ``nn.Linear`` becomes ``U · diag(s) · Vᵀ`` from its reduced SVD (all
  ``min(out, in)`` singular values, the reference's ``global_low_rank_ratio = 1``), and only the
  singular values ``s`` are trained, initialised to the pretrained ones
  (:mod:`workbench.towers.svd`). Targets: q, k, v, the attention output projection and both MLP
  layers of every block of both encoders (the configs' ``train_q/k/v/o_proj/mlp: True``,
  ``include_train_layers: "all"``). open_clip's fused attention is split first; on BiomedCLIP the
  timm ``qkv`` is split and the PubMedBERT ``query/key/value``, ``attention.output.dense``,
  ``intermediate.dense`` and ``output.dense`` layers are used. For ViT-B/16 that is
  12·6·768 + 12·6·512 = 92,160 singular values (printed by ``bench/fine_tuning.py``).
* Natural-data recipe (``train.py:run_training``): AdamW(lr 5e-4, weight decay 0.01, betas
  0.9/0.999), cosine to 1e-6 over 200·K iterations stepped every iteration, batch 32,
  RandomResizedCrop(0.08–1) + flip, cross-entropy on ``logit_scale · cos``, all class prompts
  re-encoded each step with the dataset's single template (``templates="dataset_first"``: the
  first of the dataset's templates, e.g. EuroSAT 'a centered satellite photo of {}.'). The last
  iterate is kept. The reference autocasts to fp16 without a gradient scaler; here CUDA runs use
  the workbench's autocast + scaler (fp32 on CPU).
* BiomedCLIP presets (``preset="biomedclip:<dataset>"``, ``train.py:run_biomedical_training`` and
  ``configs/few_shot/<dataset>.yaml``): 100 epochs (CTKidney 200), weight decay 0, the
  per-dataset learning rate and the config's single ``template`` of :data:`BIOMEDCLIP_PRESETS`
  ("a photo of a {}." everywhere except COVID: "a chest xray of {}."), used unless ``templates``
  is set to something other than the default ``"dataset_first"``. The reference steps a
  ``CosineAnnealingLR(T_max=epochs)`` every *iteration*, so its learning rate cycles when an
  epoch has several batches; here the cosine runs once over all iterations (a deliberate fix).

What is saved is the singular values plus the recipe (``method.json``): ``workbench.load``
rebuilds the split model from the backbone, recomputes the SVD and loads ``s`` (≈ 360 KB in
float32 for ViT-B/16). ``merge()`` folds ``U diag(s) Vᵀ`` back into plain Linears. WiSE-FT
(``wise_alpha``) interpolates ``s`` between the pretrained and the trained values, which is
exactly ``(1 − α)·W₀ + α·W``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError, did_you_mean
from ...towers import linear_layers, trainable_copy
from ...towers.svd import add_svd, load_singular_values, merge_svd, singular_values, svd_layers
from ..registry import register
from .clip_lora import CLIPLoRA

_PHOTO = "a photo of a {}."
#: BiomedCLIP per-dataset learning rate, epochs and prompt template (HealthX-Lab/CLIP-SVD
#: configs/few_shot/<dataset>.yaml: ``lr``, ``train_epochs``, ``template``)
BIOMEDCLIP_PRESETS = {
    "btmri": (0.007, 100, _PHOTO), "chmnist": (0.007, 100, _PHOTO), "retina": (0.007, 100, _PHOTO),
    "busi": (0.002, 100, _PHOTO), "covid": (0.0005, 100, "a chest xray of {}."), "ctkidney": (0.001, 200, _PHOTO),
    "kneexray": (0.008, 100, _PHOTO), "kvasir": (0.005, 100, _PHOTO), "lungcolon": (0.003, 100, _PHOTO),
    "octmnist": (0.01, 100, _PHOTO),
}


@dataclass
class CLIPSVDConfig:
    #: "vision", "text" or "both"
    encoder: str = "both"
    #: which Linears get singular-value adaptation: any of q, k, v, o, fc1, fc2
    params: list = field(default_factory=lambda: ["q", "k", "v", "o", "fc1", "fc2"])
    #: "all" or a list of block indices
    blocks: str | list = "all"
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eta_min: float = 1e-6
    #: total iterations = iterations_per_shot x K (reference: 200)
    iterations_per_shot: int = 200
    #: overrides iterations_per_shot x K when set
    iterations: int | None = None
    #: overrides the iteration count with epochs x batches per epoch (BiomedCLIP presets)
    epochs: int | None = None
    batch_size: int = 32
    aug_scale: list = field(default_factory=lambda: [0.08, 1.0])
    #: "dataset_first" (the reference's single dataset template), "dataset" (all) or a list
    templates: list | str = "dataset_first"
    #: None, or "biomedclip:<dataset>" for the reference's BiomedCLIP learning rate and epochs
    preset: str | None = None
    #: "last" (reference) or "val" (best K-shot validation accuracy, checked every eval_every epochs)
    checkpoint_selection: str = "last"
    eval_every: int = 1
    grad_clip: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    #: WiSE-FT: None = adapted weights (alpha 1), a number in [0, 1], or "val" (chosen on the K-shot val set)
    wise_alpha: float | str | None = None


def apply_preset(config: CLIPSVDConfig) -> CLIPSVDConfig:
    """The config with a BiomedCLIP preset's learning rate, epochs, weight decay and template filled in
    (the template only while ``templates`` is the default ``"dataset_first"``)."""
    if config.preset is None:
        return config
    kind, _, dataset = str(config.preset).partition(":")
    if kind != "biomedclip" or dataset not in BIOMEDCLIP_PRESETS:
        names = [f"biomedclip:{d}" for d in BIOMEDCLIP_PRESETS]
        raise ConfigError(f"clip_svd: unknown preset {config.preset!r}; choose one of {names}."
                          + did_you_mean(str(config.preset), names))
    lr, epochs, template = BIOMEDCLIP_PRESETS[dataset]
    templates = [template] if config.templates == "dataset_first" else config.templates
    return dataclasses.replace(config, lr=lr, epochs=epochs, weight_decay=0.0, templates=templates)


@register("clip_svd")
class CLIPSVD(CLIPLoRA):
    Config = CLIPSVDConfig
    label = "CLIP-SVD"

    def _effective_config(self):
        return apply_preset(self.config)

    def _check_config(self, cfg) -> None:
        if cfg.epochs is not None and cfg.epochs < 1:
            raise ConfigError(f"clip_svd: epochs must be at least 1, got {cfg.epochs}.")

    def _total_iterations(self, cfg, task, batches_per_epoch: int) -> int:
        if cfg.iterations is None and cfg.epochs is not None:
            return cfg.epochs * batches_per_epoch  # epoch-based recipe (BiomedCLIP presets)
        return super()._total_iterations(cfg, task, batches_per_epoch)

    def _build(self, backbone, cfg=None):
        cfg = cfg or self.config
        model = trainable_copy(backbone)
        names = linear_layers(model, cfg.encoder, cfg.params, cfg.blocks, method="clip_svd")
        add_svd(model, names)
        return model.to(backbone.device), names

    def _trainable_state(self, model) -> dict:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _after_training(self, model) -> None:
        pass

    def _wise_end_points(self, model) -> tuple[dict, dict]:
        """(zero-shot, adapted): the pretrained singular values and the trained ones."""
        adapted = {f"{n}.s": s for n, s in singular_values(model).items()}
        pretrained = {f"{n}.s": layer.pretrained_s.clone() for n, layer in svd_layers(model).items()}
        return pretrained, adapted

    def merge(self) -> "CLIPSVD":
        """Fold ``U diag(s) Vᵀ`` back into plain Linears: same logits at the base model's cost."""
        self._check_fitted()
        merge_svd(self.model)
        self._merged = True
        self.adapted = self.adapted.with_model(self.model, "clip_svd(merged)")
        return self

    # -- persistence: the singular values only (+ the recipe in method.json) --------------------
    def save_extra(self, folder: Path) -> None:
        from safetensors.torch import save_file

        if getattr(self, "_merged", False):
            raise ConfigError("clip_svd: a merged model has no separate singular values to save; save before merge().")
        # saved as adapted (alpha = 1); loading re-applies the recorded WiSE-FT alpha
        save_file({k: v.detach().cpu().contiguous() for k, v in self._wise_end.items()},
                  str(folder / "singular_values.safetensors"))

    def after_load(self, folder: Path, backbone) -> None:
        from safetensors.torch import load_file

        if backbone is None:
            raise ConfigError("clip_svd: loading needs the backbone the singular values were trained on "
                              "(use workbench.load(folder), which rebuilds it).")
        model, _ = self._build(backbone)
        values = load_file(str(folder / "singular_values.safetensors"))
        load_singular_values(model, {k[:-2]: v for k, v in values.items()})
        model.eval()
        self._wise_start, self._wise_end = self._wise_end_points(model)
        if self._saved_alpha() is not None:
            from ...towers.interpolate import interpolate_tensors

            interpolate_tensors(model, self._wise_start, self._wise_end, self._saved_alpha())
        self.model = model
        self.adapted = backbone.with_model(model, "clip_svd")
