"""The shipped offline model ``workbench-tiny-scenes``: its files, how they are written and loaded.

The weights are made by :mod:`workbench.pretrain` (``make pretrain``) and shipped under
``workbench/assets/workbench-tiny-scenes/``: ``weights.safetensors`` (fp16; the token embedding
only for the token ids the training captions use, the other rows re-created from the recorded
init seed), ``model.json`` (how they were made) and ``MODEL_CARD.md``. No pickle is read.
:func:`workbench.backbones.load_scenes_backbone` (``wb.load_backbone("workbench-tiny-scenes")``) returns them; ``load_backbone("workbench-tiny-scenes",
"random-init")`` returns the architecture's random init (the pretraining's starting point).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SCENES_MODEL = "workbench-tiny-scenes"
#: the pretrained tag of the shipped weights (``load_backbone(SCENES_MODEL)``); "random-init" = the seed's init
SCENES_TAG = "scenes-v1"
RANDOM_TAG = "random-init"
ASSET_DIR = Path(__file__).parent / "assets" / SCENES_MODEL
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"


def used_token_ids(texts, tokenizer) -> torch.Tensor:
    return torch.unique(tokenizer(list(texts)).reshape(-1))


def export_weights(model: torch.nn.Module, token_ids: torch.Tensor, folder: Path) -> Path:
    """fp16 safetensors: every tensor but the token embedding, plus its rows ``token_ids``."""
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k == "token_embedding.weight":
            state["token_embedding.rows"] = v[token_ids].half().contiguous()
            state["token_embedding.ids"] = token_ids.to(torch.int64).contiguous()
        else:
            state[k] = (v.half() if v.is_floating_point() else v).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WEIGHTS_FILE
    save_file(state, str(path))
    return path


def read_shipped(folder: Path | None, reference: dict) -> tuple[dict, dict]:
    """``(meta, state)`` of the shipped weights in ``folder`` (default: the package's), checked against
    ``reference`` (the random-init model's state dict): the token embedding is completed from the
    reference's rows, every tensor cast to the reference's dtype. No pickle is read."""
    from safetensors.torch import load_file

    from .errors import BackboneError

    folder = Path(folder or ASSET_DIR)
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise BackboneError(f"{SCENES_MODEL!r}: the shipped weights are missing from {folder} ({WEIGHTS_FILE}, "
                            f"{META_FILE}). Reinstall the package, or run `make pretrain` to make them.")
    meta = json.loads(meta_path.read_text())
    try:
        state = load_file(str(weights))
        ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
    except Exception as err:   # truncated, foreign or not safetensors at all
        raise BackboneError(f"{weights}: not the shipped {SCENES_MODEL!r} weights ({type(err).__name__}: {err}). "
                            "Reinstall the package, or rerun `make pretrain`.") from None
    embedding = reference["token_embedding.weight"].detach().clone()
    embedding[ids.long()] = rows.to(embedding)
    state["token_embedding.weight"] = embedding
    state = {k: v.to(reference[k].dtype) for k, v in state.items() if k in reference}
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(reference[k].shape)}" for k, v in state.items()
              if v.shape != reference[k].shape]
    if shapes:   # weights of another architecture version: say so instead of torch's size-mismatch trace
        raise BackboneError(f"{weights}: made for another {SCENES_MODEL!r} architecture than "
                            f"model_configs/{SCENES_MODEL}.json ({len(shapes)} tensors differ, e.g. {shapes[0]}). "
                            "Reinstall the package, or rerun `make pretrain`.")
    missing = [k for k in reference if k not in state and not k.endswith("position_ids")]
    if missing:
        raise BackboneError(f"{weights}: does not fit {SCENES_MODEL!r} ({len(missing)} tensors missing, e.g. "
                            f"{missing[:3]}). Rerun `make pretrain`.")
    return meta, state
