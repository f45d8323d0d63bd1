"""The text head of the methods that train the encoders (CLIP-LoRA, CLIP-SVD), chosen by the task kind.

A weight method adapts the encoders the same way whatever the task; what changes with the task
kind is which prompts make the classifier, how image and text features become logits, the loss,
the targets of the support images and the score used for selection on the K-shot validation set.
:func:`text_head` returns that for a task kind, so a method asks ``text_head(task.kind, …)`` instead
of forking itself per kind (see :mod:`workbench.task_kinds`).

* ``single_label`` — one prompt per class and template; logits ``scale · cos(f, t_c)``;
  cross-entropy; selection by accuracy (the reference recipes of CLIP-LoRA and CLIP-SVD).
* ``multi_label`` — a positive and a negative prompt per finding and template: the template
  filled with the finding's name and with ``negative`` (default ``"no {}"``, CheXzero's pair);
  per-finding log-odds ``scale · (cos(f, t⁺_c) − cos(f, t⁻_c))``, i.e. the softmax over the pair
  (CheXzero; DualCoOp with learned contexts); binary cross-entropy averaged over the known entries
  (−1 = uncertain left out, CheXpert's U-Ignore); selection by macro AUROC. No paper trains
  CLIP-LoRA or CLIP-SVD on multi-label data: this head is the workbench's transfer of the pair
  classifier to them (issue 23), not a reference recipe.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..task_kinds import task_kind


@dataclass(frozen=True)
class TextHead:
    kind: str
    class_names: tuple
    templates: tuple
    negative: str = "no {}"

    @property
    def multi_label(self) -> bool:
        return self.kind == "multi_label"

    def prompts(self) -> list[str]:
        """Every prompt, grouped per class (templates inner); multi-label: the positives, then the negatives."""
        names = list(self.class_names)
        if self.multi_label:
            names = names + [self.negative.format(n) for n in self.class_names]
        return [t.format(n) for n in names for t in self.templates]

    def text_features(self, encode_text, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text features per class (mean over templates of normalised embeddings,
        renormalised): ``[C, D]``, or ``[2L, D]`` positives then negatives for multi-label."""
        feats = F.normalize(encode_text(tokens).float(), dim=-1)
        feats = feats.view(-1, len(self.templates), feats.shape[-1]).mean(1)
        return F.normalize(feats, dim=-1)

    def logits(self, image: torch.Tensor, text: torch.Tensor, scale, bias=0.0) -> torch.Tensor:
        """Single-label: ``scale · f·tᵀ + bias`` ``[N, C]``; multi-label: the log-odds ``[N, L]``
        ``scale · (f·t⁺ − f·t⁻)`` (a bias cancels in the difference)."""
        if not self.multi_label:
            return scale * image @ text.T + bias
        n = len(self.class_names)
        return scale * (image @ text[:n].T - image @ text[n:].T)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.multi_label:
            return F.cross_entropy(logits, targets)
        known = (targets >= 0).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), reduction="none")
        return (bce * known).sum() / known.sum().clamp(min=1)

    def targets(self, task, samples, support: bool = True) -> torch.Tensor:
        """Class ids ``[N]`` or finding values ``[N, L]`` (1/0/−1) of ``samples``; for the support
        set, a finding without a positive image is a DataError naming it."""
        if not self.multi_label:
            return torch.tensor([s.label for s in samples], dtype=torch.long)
        targets = task.targets_for([s.id for s in samples])
        if support:
            for j, name in enumerate(self.class_names):
                if not (targets[:, j] == 1).any():
                    raise DataError(f"finding {name!r} has no positive support image (uncertain labels are left "
                                    "out); sample more shots or drop the finding.")
        return targets

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The selection score on the K-shot validation set: accuracy, or macro AUROC over the
        findings that have both values among the known entries."""
        if not self.multi_label:
            return float((logits.argmax(-1) == targets).float().mean())
        from ..metrics import per_finding_auroc

        aucs = [a for a in per_finding_auroc(logits.double().numpy(), targets.numpy()) if a is not None]
        return float(np.mean(aucs)) if aucs else float("nan")


def text_head(kind, class_names, templates, negative: str = "no {}") -> TextHead:
    """The head of task kind ``kind`` (single_label or multi_label)."""
    name = task_kind(kind).name
    if name not in ("single_label", "multi_label"):
        raise ConfigError(f"no text head for {name} tasks; weight methods support single_label and multi_label.")
    if name == "multi_label" and (not isinstance(negative, str) or negative.count("{}") != 1):
        raise ConfigError(f"negative must be a string with exactly one '{{}}' (e.g. 'no {{}}'), got {negative!r}.")
    return TextHead(name, tuple(class_names), tuple(templates), negative)
