"""The shipped offline model ``workbench-tiny-scenes``: its files, how they are written and loaded.

The weights are made by :mod:`workbench.pretrain` (``make pretrain``) and shipped under
``workbench/assets/workbench-tiny-scenes/``: ``weights.safetensors`` (fp16; the token embedding
only for the token ids the training captions use, the other rows re-created from the recorded
init seed), ``model.json`` (how they were made) and ``MODEL_CARD.md``. No pickle is read.
``wb.load_backbone("workbench-tiny-scenes")`` returns them; ``load_backbone("workbench-tiny-scenes",
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


def load_scenes_backbone(device: str = "auto", precision: str = "auto", folder: Path | None = None):
    """The shipped ``workbench-tiny-scenes`` weights as a :class:`~workbench.backbones.Backbone` (offline)."""
    from safetensors.torch import load_file

    from .backbones import load_backbone
    from .errors import BackboneError

    folder = Path(folder or ASSET_DIR)
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise BackboneError(f"{SCENES_MODEL!r}: the shipped weights are missing from {folder} ({WEIGHTS_FILE}, "
                            f"{META_FILE}). Reinstall the package, or run `make pretrain` to make them.")
    meta = json.loads(meta_path.read_text())
    backbone = load_backbone(SCENES_MODEL, RANDOM_TAG, device=device, precision=precision, seed=meta["init_seed"])
    state = load_file(str(weights))
    ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
    model = backbone.model
    embedding = model.token_embedding.weight.detach().clone()
    embedding[ids.long()] = rows.to(embedding)
    state["token_embedding.weight"] = embedding
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) for k, v in state.items() if k in reference}
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(reference[k].shape)}" for k, v in state.items()
              if v.shape != reference[k].shape]
    if shapes:   # weights of another architecture version: say so instead of torch's size-mismatch trace
        raise BackboneError(f"{weights}: made for another {SCENES_MODEL!r} architecture than "
                            f"model_configs/{SCENES_MODEL}.json ({len(shapes)} tensors differ, e.g. {shapes[0]}). "
                            "Reinstall the package, or rerun `make pretrain`.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise BackboneError(f"{weights}: does not fit {SCENES_MODEL!r} ({len(missing)} missing, e.g. {missing[:3]}; "
                            f"{len(result.unexpected_keys)} unexpected). Rerun `make pretrain`.")
    model.to(backbone.device).eval()
    backbone.pretrained = SCENES_TAG
    backbone.source = {"kind": "workbench-pretrained", "asset": str(folder), "card": str(folder / CARD_FILE),
                       "corpus": meta.get("corpus"), "steps": meta.get("steps")}
    backbone._weights_hash, backbone._text_cache = None, {}
    return backbone
