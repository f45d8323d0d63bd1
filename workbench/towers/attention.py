"""Separate q/k/v projections inside open_clip towers.

open_clip's native towers use a fused ``nn.MultiheadAttention`` (one ``in_proj_weight``) and timm
towers (BiomedCLIP's vision side) a fused ``qkv`` Linear. Methods that adapt q, k and v one by
one (CLIP-LoRA, CLIP-SVD, Comp-LoRA) need them as separate ``nn.Linear`` layers, so

* :class:`SplitAttention` replaces an ``nn.MultiheadAttention`` by the same computation with
  ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as separate Linears (outputs equal to float
  rounding; the tests check 1e-6);
* :class:`SplitQKV` replaces a fused ``qkv`` Linear by three Linears whose concatenated output is
  the fused one;
* Hugging Face text towers are left alone: BERT already has separate ``query``/``key``/``value``.

:func:`split_attention` does both in place. Which of the resulting Linears a method adapts is
chosen by :func:`workbench.towers.select.linear_layers`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


def _split_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Three ``d x d`` Linears holding the q, k and v thirds of a fused ``3d x d`` projection.

    Their parameters are *views* of the fused tensors (no copy; ``requires_grad`` as the fused
    one's): splitting adds no memory, and the q/k/v weights stay shared with whatever model the
    fused weight belongs to (``towers.trainable_copy``), so they must not be changed in place.
    """
    d = weight.shape[1]
    projs = tuple(nn.Linear(d, d, bias=bias is not None, device="meta") for _ in range(3))
    for i, proj in enumerate(projs):
        proj.weight = nn.Parameter(weight.detach()[i * d:(i + 1) * d], requires_grad=weight.requires_grad)
        if bias is not None:
            proj.bias = nn.Parameter(bias.detach()[i * d:(i + 1) * d], requires_grad=bias.requires_grad)
    return projs


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v/out ``nn.Linear`` layers (same call signature)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ConfigError("attention with different key/value dimensions cannot be split yet")
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.dropout = d, mha.num_heads, mha.dropout
        self.batch_first = mha.batch_first
        self.q_proj, self.k_proj, self.v_proj = _split_linear(mha.in_proj_weight, mha.in_proj_bias)
        # a plain Linear holding the MHA's own out-projection parameters (shared, not copied)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None, device="meta")
        self.out_proj.weight, self.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        self.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **_):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        ls = key.shape[1]
        h, hd = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(query).view(n, lq, h, hd).transpose(1, 2)
        k = self.k_proj(key).view(n, ls, h, hd).transpose(1, 2)
        v = self.v_proj(value).view(n, ls, h, hd).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:  # MHA: True = not allowed
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            mask = mask.to(q.dtype)
            mask = mask.view(n, h, lq, ls) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(key_padding_mask.bool(), float("-inf")).view(n, 1, 1, ls)
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear (timm attention) as three Linears whose outputs are concatenated."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        d = fused.in_features
        if fused.out_features != 3 * d:
            raise ConfigError(f"fused qkv layer has {fused.out_features} outputs, expected 3 x {d}")
        self.q_proj, self.k_proj, self.v_proj = _split_linear(fused.weight, fused.bias)
        self.to(fused.weight.device, fused.weight.dtype)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def split_attention(model: nn.Module) -> int:
    """Split every fused attention projection in ``model`` in place; returns how many were split."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, SplitAttention(child))
                count += 1
            elif (child_name == "qkv" and isinstance(child, nn.Linear)
                  and child.out_features == 3 * child.in_features):
                setattr(module, child_name, SplitQKV(child))
                count += 1
    return count


def unsplit_state_dict(state: dict) -> dict:
    """The inverse of :func:`split_attention` on a state dict: separate ``q_proj``/``k_proj``/``v_proj``
    tensors are concatenated back into the fused ``in_proj_weight``/``in_proj_bias`` of an
    ``nn.MultiheadAttention`` (or the ``qkv.weight``/``qkv.bias`` of a timm attention), so an adapted
    split model's weights load into the unmodified open_clip architecture."""
    import re

    out, groups = {}, {}
    for key, value in state.items():
        m = re.match(r"(.*)\.(q_proj|k_proj|v_proj)\.(weight|bias)$", key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in groups.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ConfigError(f"unsplit_state_dict: {prefix} has only {sorted(parts)} of q/k/v.")
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
        out[f"{prefix}.{kind}" if prefix.endswith(".qkv") else f"{prefix}.in_proj_{kind}"] = fused
    return out
