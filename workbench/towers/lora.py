"""LoRA adapters on chosen Linear layers of a (split) CLIP model, through peft.

``y = W·x + s·B·A·dropout(x)`` with ``s = alpha / sqrt(r)`` when ``rslora`` (CLIP-LoRA's
reference scaling, MaxZanella/CLIP-LoRA ``loralib/layers.py``), A Kaiming-uniform and B zero,
so the adapted model equals the base model at initialisation (tested).

Comp-LoRA (:func:`constrain_to_complement`; Wang et al., "Complementary Subspace Low-Rank
Adaptation of Vision-Language Models for Few-Shot Classification", arXiv 2501.15040): the LoRA
update of a layer with pretrained ``W = U Σ Vᵀ`` is kept out of the span of its ``p`` top
singular directions ``U_p``, ``V_p``::

    ΔW = s · (I − U_p U_pᵀ) · B · A · (I − V_p V_pᵀ)

i.e. the input is projected onto the orthogonal complement of the top right-singular subspace
before ``A``, and ``B``'s output onto the complement of the top left-singular subspace, so
``U_pᵀ ΔW = 0`` and ``ΔW V_p = 0``: the directions that carry most of ``W`` are untouched. It is
applied as a ``torch.nn.utils.parametrize`` projection of ``A`` (``A ↦ A (I − V_p V_pᵀ)``) and
``B`` (``B ↦ (I − U_p U_pᵀ) B``): the same trainable shapes and count as LoRA, and
:func:`bake_complement` turns the result into a plain peft adapter (save, merge, reload as LoRA).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError


def add_lora(model: nn.Module, target_names: Sequence[str], r: int, alpha: float, dropout: float,
             rslora: bool = True) -> nn.Module:
    """Wrap ``model`` (already frozen and split) with peft LoRA on exactly ``target_names``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                     target_modules=list(target_names), bias="none", init_lora_weights=True)
    return get_peft_model(model, cfg)


def lora_parameters(model: nn.Module) -> dict[str, "object"]:
    """The adapter tensors of a peft model (for checkpoints and best-epoch snapshots)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def save_lora(model: nn.Module, folder: Path) -> None:
    """peft ``save_pretrained`` format: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    model.save_pretrained(str(folder))


def load_lora(base: nn.Module, folder: Path) -> nn.Module:
    """Re-attach adapters saved by :func:`save_lora` to a split base model."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ConfigError(
            f"LoRA adapter folder {str(folder)!r} has "
            + ("only adapter_model.bin, a pickled file that can run code when read: it is not loaded, for safety. "
               "Convert it where it was made (peft: save_pretrained(..., safe_serialization=True)) or refit."
               if pickled else "no adapter_model.safetensors; save the model again."))
    # with adapter_model.safetensors present, peft reads it and never the pickled adapter_model.bin
    return PeftModel.from_pretrained(base, str(folder))


class _ProjectOut(nn.Module):
    """Removes the component of a LoRA factor along fixed orthonormal columns ``basis``."""

    def __init__(self, basis: torch.Tensor, side: str):
        super().__init__()
        self.register_buffer("basis", basis)
        self.side = side  # "in": rows of A live in the input space; "out": columns of B in the output space

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        p = self.basis.to(weight.dtype)
        if self.side == "in":
            return weight - (weight @ p) @ p.T
        return weight - p @ (p.T @ weight)


def _lora_layers(model: nn.Module, target_names: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {name: modules["base_model.model." + name] for name in target_names}


def protected_subspace(weight: torch.Tensor, protected_rank: int, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_p, V_p)``: the top ``protected_rank`` left and right singular vectors of ``weight``."""
    out_features, in_features = weight.shape
    if isinstance(protected_rank, bool) or not isinstance(protected_rank, int) or protected_rank < 1:
        raise ConfigError(f"clip_lora: protected_rank must be a positive integer, got {protected_rank!r}.")
    if protected_rank >= min(out_features, in_features):
        raise ConfigError(f"clip_lora: protected_rank={protected_rank} leaves no complement in {name} "
                          f"({out_features} x {in_features}, rank at most {min(out_features, in_features)}); "
                          f"choose protected_rank below {min(out_features, in_features)}.")
    u, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return (u[:, :protected_rank].to(weight.dtype).contiguous(),
            vh[:protected_rank].T.to(weight.dtype).contiguous())


def constrain_to_complement(model: nn.Module, target_names: Sequence[str], protected_rank: int,
                            adapter: str = "default") -> None:
    """Comp-LoRA: project each target's LoRA factors off its pretrained top-``protected_rank`` subspace.

    All layers are checked before any is changed, so a rank too large for one layer fails cleanly.
    """
    import torch.nn.utils.parametrize as parametrize

    layers = _lora_layers(model, target_names)
    bases = {name: protected_subspace(layer.base_layer.weight, protected_rank, name) for name, layer in layers.items()}
    for name, layer in layers.items():
        u_p, v_p = bases[name]
        parametrize.register_parametrization(layer.lora_A[adapter], "weight", _ProjectOut(v_p, "in"))
        parametrize.register_parametrization(layer.lora_B[adapter], "weight", _ProjectOut(u_p, "out"))


def bake_complement(model: nn.Module) -> int:
    """Replace the Comp-LoRA projections by their current values: a plain peft LoRA with the same update."""
    import torch.nn.utils.parametrize as parametrize

    count = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            count += 1
    return count


def lora_b_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``lora_B`` weights (the factor that is zero at initialisation; WiSE-FT scales it)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
