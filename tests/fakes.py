"""Random feature tasks for testing method math without encoding images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.features import Features
from workbench.task import TensorTask


def random_task(n_classes=5, shots=4, dim=16, views=10, n_val=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(shots)
    raw = centres[labels][None] * 3 + torch.randn(views, len(labels), dim, generator=g)
    eval_feats = F.normalize(centres[labels] * 3 + torch.randn(len(labels), dim, generator=g), dim=-1)
    val_y = torch.arange(n_classes).repeat_interleave(n_val)
    val_x = F.normalize(centres[val_y] * 3 + torch.randn(len(val_y), dim, generator=g), dim=-1)
    text = centres + 0.8 * torch.randn(n_classes, dim, generator=g)
    return TensorTask(raw, labels, eval_feats, val_x, val_y, text, **kw), centres


__all__ = ["random_task", "Features"]
