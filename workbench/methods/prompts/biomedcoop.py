"""BiomedCoOp (Koleilat et al., "BiomedCoOp: Learning to Prompt for Biomedical Vision-Language
Models", CVPR 2025; reference code HealthX-Lab/BiomedCoOp ``trainers/BiomedCoOp/biomedcoop_biomedclip.py``,
``trainers/prompt_templates.py``, ``configs/trainers/BiomedCoOp/few_shot/*.yaml``, ``train.py``).

CoOp's context on the text tower (4 tokens from "a photo of a", class token at the end) plus a
bank of P LLM descriptions per class, encoded once by the frozen text encoder
(``t_{c,p}``, L2-normalised). For a batch of normalised image features ``f`` and the learned,
normalised class text features ``w``, with ``s`` the logit scale:

1. score of description slot p: ``σ_p = mean_b max_c s·f_b·t_{c,p}``;
2. robust z: ``z = (σ − median σ) / median|σ − median σ|``; keep slots with
   ``|(z − mean z) / std z| ≤ τ`` (std unbiased, as ``torch.std``);
3. ``t_sel`` = the normalised mean of the kept slots, ``t_all`` = the normalised mean of all P;
4. ``loss = CE(s·f·wᵀ, y) + λ₁ · MSE(w, t_all) + λ₂ · KL(softmax(s·f·t_selᵀ) ‖ softmax(s·f·wᵀ))``,
   the KL summed and divided by B·C (SCCM and KDSP terms).

The image encoder is frozen in the reference too (its "zero-shot" image encoder is a second
copy of the same weights), so the zero-shot logits use the same cached image features. With
λ₁ = λ₂ = 0 it is CoOp (tested). Guard beyond the reference: when the median absolute
deviation is 0 or no slot survives the filter (the reference would produce NaN), every slot is
kept.

Defaults (``train.py``, few-shot configs): SGD lr 0.0025, 100 epochs, batch 4, cosine after one
warm-up epoch at 1e-5, RandomResizedCrop without flip, N_PROMPTS 50, λ₁ = λ₂ = 1, τ = 1.5;
per-dataset λ₁/λ₂/τ come from the dataset YAML's ``method_presets.biomedcoop`` (BTMRI 0.5/0.25,
…, KneeXray 5/20 with τ 1.75), applied by :func:`workbench.run_experiment`. The reference
trains in fp32; here precision follows the backbone (fp16 autocast on CUDA by default).

Train mode (``train_mode=True``, the reference's behaviour): the reference registers the whole
CustomCLIP with Dassl, whose ``set_model_mode("train")`` puts it in train mode every epoch, so
the BiomedCLIP text tower's dropout is active while the context learns (the final classifier is
computed in eval mode, as the reference tests in eval mode). Its effect: noisier text features
during training — a regulariser on the context. ``train_mode=False`` keeps the tower in eval
mode (the workbench's earlier behaviour: deterministic training steps). Image features come from
the cache, computed in eval mode; BiomedCLIP's ViT has no dropout, so that matches too. The
description bank is encoded in eval mode in both (the reference's frozen copy is ``.eval()``).

The description bank is data, not code: the ``descriptions:`` key of the dataset YAML
(``{class name: [descriptions…]}``; the BiomedCoOp sets ship the reference bank, MIT licence),
or ``FewShotTask(descriptions=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..registry import register
from .coop import CoOp, CoOpConfig


@dataclass
class BiomedCoOpConfig(CoOpConfig):
    ctx_init: str = "a photo of a"
    lr: float = 0.0025
    epochs: int | None = 100
    batch_size: int = 4
    #: horizontal flips in the augmentation (the reference uses RandomResizedCrop only)
    flip: bool = False
    #: λ₁, weight of the SCCM term MSE(learned text features, mean description embedding)
    sccm_weight: float = 1.0
    #: λ₂, weight of the KDSP term KL(zero-shot with the selected descriptions ‖ model)
    kdsp_weight: float = 1.0
    #: τ, outlier threshold of the robust-z description selection
    tau: float = 1.5
    #: descriptions used per class (the first n of the bank)
    n_prompts: int = 50
    #: train the context with the model in train mode, as the reference does (Dassl's
    #: ``set_model_mode("train")`` on the whole CustomCLIP): the BiomedCLIP text tower's dropout
    #: (PubMedBERT, p = 0.1) is active while the context learns. False: eval mode (deterministic text features)
    train_mode: bool = True


def _dataset_spec(name: str) -> dict | None:
    """The YAML spec of a dataset by its name (base-to-new subsets ``NAME-base``/``NAME-new`` included)."""
    from ...domains import load_spec
    from ...errors import WorkbenchError

    for candidate in (name, name.rsplit("-", 1)[0] if name.endswith(("-base", "-new")) else None):
        if candidate:
            try:
                return load_spec(candidate)
            except (WorkbenchError, OSError):
                continue
    return None


def description_bank(task, class_names, n_prompts: int, method: str = "biomedcoop") -> list[list[str]]:
    """The first ``n_prompts`` descriptions of every class, or a ConfigError saying what to fill in.

    From ``task.descriptions`` if given, else from the ``descriptions:`` key of the dataset's YAML
    (looked up by the task's dataset name; the task never exposes the dataset itself).
    """
    bank = dict(task.descriptions or {})
    where = "the dataset's YAML"
    if not all(bank.get(c) for c in class_names):
        spec = _dataset_spec(getattr(task, "dataset_name", "") or "")
        if spec is not None:
            bank = {**(spec.get("descriptions") or {}), **bank}
            where = spec["_file"]
    missing = [c for c in class_names if not bank.get(c)]
    if missing:
        raise ConfigError(f"{method}: no LLM description bank for class(es) {missing}. Fill the YAML key "
                          f"'descriptions:' in {where} (a list of descriptions per readable class name, e.g. "
                          "'descriptions: {glioma tumor: [\"An MRI showing ...\", ...]}'), or pass "
                          "FewShotTask(descriptions={...}).")
    n = min(n_prompts, min(len(bank[c]) for c in class_names))
    return [list(bank[c])[:n] for c in class_names]


def select_descriptions(image_features: torch.Tensor, bank: torch.Tensor, scale: float, tau: float) -> torch.Tensor:
    """Boolean mask over the P description slots kept by the robust-z filter (``bank``: [C, P, D])."""
    scores = torch.einsum("bd,cpd->bpc", image_features, bank).mul(scale).amax(-1).mean(0)   # [P]
    med = scores.median()
    mad = (scores - med).abs().median()
    if mad == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    z = (scores - med) / mad
    keep = ((z - z.mean()) / z.std()).abs() <= tau
    return keep if keep.any() else torch.ones_like(keep)


@register("biomedcoop")
class BiomedCoOp(CoOp):
    Config = BiomedCoOpConfig
    param_bounds = {"sccm_weight": {"minimum": 0.0}, "kdsp_weight": {"minimum": 0.0}, "tau": {"minimum": 0.0},
                    "n_prompts": {"minimum": 1}}

    def _regulariser(self, task, tower):
        cfg = self.config
        backbone = task.backbone
        texts = description_bank(task, task.class_names, cfg.n_prompts)
        p = len(texts[0])
        flat = backbone.text_features([t for per_class in texts for t in per_class])   # normalised, frozen
        bank = flat.view(len(texts), p, -1).to(backbone.device)                          # [C, P, D]
        mean_all = F.normalize(bank.mean(1), dim=-1)
        scale, bias = backbone.logit_scale, backbone.logit_bias or 0.0
        l1, l2, tau = cfg.sccm_weight, cfg.kdsp_weight, cfg.tau
        self._bank_info = {"n_prompts": p, "kept": []}

        def term(txt, x, logits):
            with torch.no_grad():
                keep = select_descriptions(x.float(), bank, scale, tau)
                selected = F.normalize(bank[:, keep].mean(1), dim=-1)
                zs_logits = scale * x.float() @ selected.T + bias
            self._bank_info["kept"].append(int(keep.sum()))
            sccm = F.mse_loss(txt, mean_all.to(txt.dtype))
            kdsp = F.kl_div(F.log_softmax(logits.float(), 1), F.log_softmax(zs_logits, 1), reduction="sum",
                            log_target=True) / logits.numel()
            return l1 * sccm + l2 * kdsp
        return term

    def _train_mode(self, model) -> None:
        if self.config.train_mode:
            model.train()   # the image features are cached (eval transform); the text tower is what dropout reaches

    def fit(self, task) -> "BiomedCoOp":
        description_bank(task, task.class_names, self.config.n_prompts)  # a missing bank fails before encoding
        super().fit(task)
        kept = self._bank_info["kept"]
        self.fit_info.update(n_prompts=self._bank_info["n_prompts"], sccm_weight=self.config.sccm_weight,
                             kdsp_weight=self.config.kdsp_weight, tau=self.config.tau,
                             mean_kept_prompts=sum(kept) / max(len(kept), 1))
        return self
