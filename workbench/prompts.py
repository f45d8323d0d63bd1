"""Prompt templates and the zero-shot text classifier.

A text classifier is one unit vector per class: the mean of the normalised embeddings of
that class's prompts (every template filled with the class name, plus optional CuPL-style
per-class descriptions), renormalised. This is how CLIP's prompt ensembling works
(Radford et al. 2021, openai/CLIP ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def validate_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """Each template must be a string with exactly one ``{}`` where the class name goes."""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ConfigError(f"{where}: at least one prompt template is needed, e.g. 'a photo of a {{}}.'.")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"{where}: template {t!r} must contain exactly one '{{}}' for the class name, "
                              "e.g. 'a centered satellite photo of {}.'.")
    return templates


def class_prompts(class_name: str, templates: Sequence[str], descriptions: Sequence[str] = ()) -> list[str]:
    return [t.format(class_name) for t in templates] + list(descriptions)


def text_classifier(backbone, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                    descriptions: Mapping[str, Sequence[str]] | None = None) -> torch.Tensor:
    """``[C, D]`` unit vectors, one per class, on CPU (float32)."""
    templates = validate_templates(templates)
    descriptions = dict(descriptions or {})
    unknown = sorted(set(descriptions) - set(class_names))
    if unknown:
        raise ConfigError(f"descriptions given for unknown class(es) {unknown}; classes are {list(class_names)}.")
    rows = []
    for name in class_names:
        prompts = class_prompts(name, templates, descriptions.get(name, ()))
        feats = backbone.text_features(prompts)
        rows.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows)


def compare_templates(dataset, backbone, template_sets: Mapping[str, Sequence[str]], cache=None):
    """Zero-shot accuracy of several prompt-template sets.

    ``selection_accuracy`` is measured on the ``val`` split (or, without one, on the training
    pool) — use it to choose; ``test_accuracy`` is for reporting only: choosing templates by test
    accuracy would leak the test set into the choice. An empty template list means the
    dataset's own templates.
    """
    import pandas as pd

    from .features import FeatureCache
    from .metrics import compute_metrics

    cache = cache or FeatureCache(backbone, None)
    choose_split = "val" if dataset.has_split("val") and dataset.split("val") else "train"
    choose = cache.get(dataset, dataset.split(choose_split), desc=choose_split)
    test = cache.get(dataset, dataset.split("test"), desc="test")
    rows = []
    for name, templates in template_sets.items():
        templates = list(templates) or list(dataset.templates or DEFAULT_TEMPLATES)
        weights = text_classifier(backbone, dataset.class_names, templates)
        scores = {}
        for label, feats in (("selection", choose), ("test", test)):
            logits = backbone.logit_scale * feats.x @ weights.T
            m = compute_metrics(logits, feats.labels, dataset.n_classes)
            scores[label] = m
        rows.append({"templates": name, "n_templates": len(templates), "selection_split": choose_split,
                     "selection_accuracy": scores["selection"]["accuracy"],
                     "test_accuracy": scores["test"]["accuracy"],
                     "test_balanced_accuracy": scores["test"]["balanced_accuracy"],
                     "example": templates[0].format(dataset.class_names[0])})
    return pd.DataFrame(rows)
