"""What a method may look at while it fits: the support set, the K-shot validation set and text.

The test split is deliberately *not* reachable from a :class:`FewShotTask`: fitting and
hyper-parameter selection cannot read it, by construction. The experiment runner encodes the
test images separately and only hands their features to ``predict_logits``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .data.dataset import Dataset, Sample
from .data.sampling import FewShotSplit
from .features import FeatureCache, Features
from .prompts import DEFAULT_TEMPLATES, text_classifier, validate_templates


@dataclass
class FewShotTask:
    dataset: Dataset
    split: FewShotSplit
    backbone: object
    cache: FeatureCache
    templates: Sequence[str] = DEFAULT_TEMPLATES
    descriptions: Mapping[str, Sequence[str]] | None = None
    aug_seed: int | None = None         # defaults to the few-shot seed
    _used: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.templates = validate_templates(self.templates)
        if self.aug_seed is None:
            self.aug_seed = self.split.seed

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def n_classes(self) -> int:
        return self.dataset.n_classes

    @property
    def shots(self) -> int:
        return self.split.shots

    @property
    def seed(self) -> int:
        return self.split.seed

    def support_samples(self) -> list[Sample]:
        return self.split.train(self.dataset)

    def val_samples(self) -> list[Sample]:
        return self.split.val(self.dataset)

    def support(self, views: int = 0, aug_scale: tuple[float, float] = (0.5, 1.0), flip: bool = True) -> Features:
        """Support features; ``views > 0`` gives that many augmented passes (RandomResizedCrop + flip)."""
        feats = self.cache.get(self.dataset, self.support_samples(), views=views, aug_seed=self.aug_seed,
                               aug_scale=aug_scale, flip=flip, desc=f"support x{max(views, 1)}")
        self._used["support_skipped"] = feats.skipped
        return feats

    def validation(self) -> Features | None:
        """K-shot validation features, or None when the split has no validation images."""
        samples = self.val_samples()
        if not samples:
            return None
        feats = self.cache.get(self.dataset, samples, desc="validation")
        self._used["val_skipped"] = feats.skipped
        return feats

    def text_classifier(self, templates: Sequence[str] | None = None) -> torch.Tensor:
        return text_classifier(self.backbone, self.class_names, templates or self.templates, self.descriptions)

    @property
    def skipped(self) -> list[dict]:
        return self._used.get("support_skipped", []) + self._used.get("val_skipped", [])
