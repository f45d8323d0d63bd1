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
