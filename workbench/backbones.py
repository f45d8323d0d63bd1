"""Backbones: any open_clip model behind one object every method uses.

``load_backbone`` accepts

* an architecture + pretrained tag: ``load_backbone("ViT-B-16-quickgelu", "openai")``;
* a Hub model with an ``open_clip_config.json``: ``"hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"``;
* a local folder with config + weights: ``"local-dir:/path/to/model"``;
* a plain checkpoint file on a named architecture, as RemoteCLIP and GeoRSCLIP ship them:
  ``load_backbone("ViT-B-32-quickgelu", "/path/RemoteCLIP-ViT-B-32.pt")``, or fetched from
  the Hub on first use: ``pretrained="hf-file:chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt"``;
* a checkpoint inside a zip archive on the web, as SkyScript ships SkyCLIP:
  ``pretrained="url-zip:https://…/SkyCLIP_ViT_L14_top50pct.zip#epoch_20.pt"`` (downloaded and
  unpacked once into ``cache_dir`` or ``~/.cache/workbench/checkpoints``; ``#NAME`` is the file
  name inside the archive);
* a folder written by :func:`save_backbone` (a backbone fine-tuned on image–text pairs by a
  ``pairs`` method): ``load_backbone("runs/my_adapted_backbone")``;
* the offline default ``"workbench-tiny-scenes"``: a tiny CLIP (48 px, two 64-wide blocks per
  tower) that this workbench pretrained itself (:mod:`workbench.pretrain`, ``make pretrain``) on
  its procedurally generated captioned-scene corpus, shipped with the package (fp16 safetensors,
  under 1 MB; card: ``workbench/assets/workbench-tiny-scenes/MODEL_CARD.md``). It knows the
  corpus words (shapes, colours, backgrounds, sizes, textures) and nothing else, so zero-shot is
  meaningful on the shifted scene domains (``xray_like_scenes``, ``aerial_like_scenes``,
  ``leaf_like_scenes``) and noise on real images. Its random init stays available as
  ``load_backbone("workbench-tiny-scenes", "random-init")``;
* ``"workbench-tiny"``: a smaller architecture, randomly initialised with a fixed seed (zero-shot
  at chance). It **demonstrates the workflow only**; the tests use it where weights must not
  matter.
  Switch to a real model with one parameter, e.g. ``backbone="ViT-B-16-quickgelu", pretrained="openai"``.

QuickGELU: open_clip >= 2.29 no longer switches QuickGELU on for OpenAI weights by itself; a
tag whose weights were trained with QuickGELU loaded on a plain-GELU architecture gives subtly
wrong features. We switch it on (with a warning) when the tag says so.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import BackboneError

#: the offline model pretrained by the workbench on its scene corpus (workbench/pretrain.py; shipped weights)
SCENES_MODEL = "workbench-tiny-scenes"   # = scenes_model.SCENES_MODEL
#: what ``load_backbone()`` gives with no name: the pretrained offline model (no network needed)
OFFLINE_DEFAULT = SCENES_MODEL
#: the random-init tiny architecture (seeded): the workflow without any learned weights
RANDOM_TINY = "workbench-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make the package's own open_clip configs (``workbench-tiny``) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


# -- device and precision ---------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA if present (``cuda:LOCAL_RANK`` under torchrun), else Apple MPS, else CPU.

    Under torchrun a bare ``cuda`` (no index) is also ``cuda:LOCAL_RANK``: every process's own GPU,
    as the training loop requires — resolved here, before any image is encoded, rather than failing
    in the first training step. An explicit index (``cuda:1``) is kept as given.
    """
    if isinstance(device, torch.device):
        return _own_gpu(device)
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            from .distributed import default_cuda_device  # one GPU per torchrun process

            return default_cuda_device()
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackboneError(f"device {device!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} asked for, but CUDA is not available here. Use device='auto' or 'cpu'.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BackboneError(f"device {device!r} asked for, but MPS is not available here. Use device='auto' or 'cpu'.")
    return _own_gpu(dev)


def _own_gpu(dev: torch.device) -> torch.device:
    """A bare ``cuda`` under torchrun is this process's ``cuda:LOCAL_RANK``; anything else unchanged."""
    if dev.type != "cuda" or dev.index is not None:
        return dev
    from .distributed import default_cuda_device, torchrun_env

    return default_cuda_device() if torchrun_env() is not None else dev


PRECISIONS = ("fp32", "amp_fp16", "amp_bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → mixed precision fp16 on CUDA (as the reference implementations), fp32 elsewhere.

    MPS gets fp32: autocast coverage on MPS is incomplete and CLIP features are sensitive to it.
    """
    if precision in (None, "", "auto"):
        return "amp_fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise BackboneError(f"precision {precision!r} is not one of {('auto',) + PRECISIONS}.")
    if precision != "fp32" and device.type == "cpu":
        raise BackboneError(f"precision {precision!r} needs a GPU; on CPU use precision='fp32' (or 'auto').")
    return precision


def autocast_context(device: torch.device, precision: str):
    """The autocast context for a forward pass (a no-op for fp32)."""
    if precision == "fp32":
        import contextlib

        return contextlib.nullcontext()  # also on MPS, whose autocast support varies between torch builds
    dtype = torch.float16 if precision == "amp_fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- the backbone object ----------------------------------------------------------------------

@dataclass
class Backbone:
    """A loaded vision-language model and everything methods need from it.

    Features are always L2-normalised float32. ``logit_scale`` is the model's own (100 for
    OpenAI CLIP); ``logit_bias`` is set for SigLIP models and must be added to their logits.
    """

    model: torch.nn.Module
    tokenizer: object
    preprocess: object                 # eval transform: PIL image -> tensor
    name: str
    pretrained: str | None
    device: torch.device
    precision: str
    preprocess_cfg: dict
    source: dict = field(default_factory=dict)
    _weights_hash: str | None = None
    _text_cache: dict = field(default_factory=dict, repr=False)

    # -- identity ---------------------------------------------------------------------------
    @property
    def weights_hash(self) -> str:
        """Hash of every parameter and buffer, so two runs can tell they used the same weights."""
        if self._weights_hash is None:
            h = hashlib.blake2b(digest_size=16)
            for key, tensor in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                t = tensor.detach().to("cpu").contiguous()
                h.update(str(t.dtype).encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_hash = h.hexdigest()
        return self._weights_hash

    @property
    def provenance_id(self) -> str:
        return f"{self.name}|{self.pretrained or 'random-init'}|{self.weights_hash[:16]}"

    @property
    def preprocess_id(self) -> str:
        return repr(sorted(self.preprocess_cfg.items()))

    @property
    def embed_dim(self) -> int:
        return int(self.text_features(["x"]).shape[-1])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100).item())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().item())

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", 224)
        return int(size if isinstance(size, int) else size[0])

    def provenance(self) -> dict:
        import open_clip

        return {"name": self.name, "pretrained": self.pretrained, "weights_hash": self.weights_hash,
                "provenance_id": self.provenance_id, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias,
                "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg.items()},
                "device": str(self.device), "precision": self.precision, "open_clip": open_clip.__version__,
                "source": self.source}

    # -- transforms -------------------------------------------------------------------------
    def augment_transform(self, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True):
        """Training-time augmentation as the reference code uses it: RandomResizedCrop + horizontal flip.

        Tip-Adapter and GDA use ``scale=(0.5, 1)``; CLIP-LoRA uses ``(0.08, 1)``. Resizing
        follows the model's own interpolation and normalisation.
        """
        from torchvision import transforms as T

        interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}[self.preprocess_cfg.get("interpolation", "bicubic")]
        steps = [T.RandomResizedCrop(self.image_size, scale=tuple(scale), interpolation=interp)]
        if flip:
            steps.append(T.RandomHorizontalFlip(p=0.5))
        steps += [T.ToTensor(), T.Normalize(self.preprocess_cfg["mean"], self.preprocess_cfg["std"])]
        return T.Compose(steps)

    # -- encoding ---------------------------------------------------------------------------
    def autocast(self):
        return autocast_context(self.device, self.precision)

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Float32 image features on the backbone's device (no gradient), L2-normalised unless asked not to."""
        with torch.inference_mode(), self.autocast():
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1) if normalize else feats.float()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised float32 text features on CPU; cached in memory per text."""
        texts = list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            tokens = self.tokenize(chunk).to(self.device)
            with torch.inference_mode(), self.autocast():
                feats = self.model.encode_text(tokens)
            feats = F.normalize(feats.float(), dim=-1).cpu()
            self._text_cache.update(zip(chunk, feats))
        if not texts:
            raise BackboneError("text_features() needs at least one text.")
        return torch.stack([self._text_cache[t] for t in texts])

    def with_model(self, model: torch.nn.Module, adapted_by: str) -> "Backbone":
        """The same backbone with another (adapted) model: new weights hash, fresh text cache."""
        import dataclasses

        return dataclasses.replace(self, model=model, _weights_hash=None, _text_cache={},
                                   source=dict(self.source, adapted_by=adapted_by))

    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, pretrained={self.pretrained!r}, device={self.device}, "
                f"precision={self.precision}, image_size={self.image_size})")


# -- loading ----------------------------------------------------------------------------------

def _read_state_dict(path: Path) -> dict:
    """Weights from a ``.pt``/``.pth``/``.bin``/``.safetensors`` file, unwrapped from common containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(str(path))
        else:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"could not read checkpoint {str(path)!r}: {type(err).__name__}: {str(err)[:200]}. "
                            "Only plain tensor state dicts load (open_clip v3 uses weights_only=True); a "
                            "truncated download also ends here — delete the file and download again.") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not ckpt:
        raise BackboneError(f"checkpoint {str(path)!r} holds no state dict (got {type(ckpt).__name__}).")
    state = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            continue  # e.g. OpenAI jit extras such as input_resolution
        for prefix in ("module.", "model.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def _download_url(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``dest`` (the network boundary of ``url-zip:``; tests replace it)."""
    import shutil
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def checkpoint_cache_root(cache_dir=None) -> Path:
    """Where ``url-zip:`` checkpoints are unpacked: ``cache_dir`` or ``~/.cache/workbench/checkpoints``."""
    return Path(cache_dir or Path.home() / ".cache" / "workbench" / "checkpoints")


def zip_checkpoint_target(url: str, member: str, cache_dir=None) -> Path:
    """The local file a ``url-zip:URL#MEMBER`` recipe unpacks to (it may not exist yet)."""
    return checkpoint_cache_root(cache_dir) / hashlib.sha1(url.encode()).hexdigest()[:16] / member


def _zip_checkpoint(pretrained: str, cache_dir) -> Path:
    """``url-zip:URL#NAME``: the file NAME from the zip archive at URL, downloaded and unpacked once."""
    import zipfile

    spec = pretrained[len("url-zip:"):]
    url, _, member = spec.partition("#")
    if not url.startswith(("https://", "http://")) or not member:
        raise BackboneError(f"{pretrained!r}: expected 'url-zip:https://HOST/ARCHIVE.zip#FILE_IN_ARCHIVE'.")
    if Path(member).name != member or member in (".", "..") or "\\" in member:
        # '#/etc/hostname' or '#../x' would name a file outside the download folder
        raise BackboneError(f"{pretrained!r}: the part after '#' must be a plain file name inside the archive "
                            f"(e.g. 'epoch_20.pt'), not a path ({member!r}).")
    target = zip_checkpoint_target(url, member, cache_dir)
    folder = target.parent
    if target.is_file():
        return target
    from .data.hub import _OFFLINE_VARS, _TRUE

    offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUE]
    if offline:
        raise BackboneError(f"{pretrained!r} is not downloaded yet and {offline[0]}={os.environ[offline[0]]} is set: "
                            "no download is made offline. On a machine with network download the archive, unzip "
                            f"it and pass the path of {member!r} as `pretrained`.")
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / ".download.zip"
    try:
        _download_url(url, archive)
    except Exception as err:
        archive.unlink(missing_ok=True)
        raise BackboneError(f"could not download {url}: {type(err).__name__}: {str(err)[:200]}. Offline? On a "
                            f"machine with network run `curl -O {url}`, unzip it and pass the path of {member!r} "
                            "as `pretrained` with the same architecture.") from None
    try:
        with zipfile.ZipFile(archive) as z:
            found = [n for n in z.namelist() if Path(n).name == member and not n.endswith("/")]
            if len(found) != 1:
                raise BackboneError(f"{url}: the archive holds {len(found)} file(s) named {member!r} "
                                    f"({found[:3]}); expected exactly one. Its files: {z.namelist()[:10]}.")
            partial = folder / f".{member}.partial"
            with z.open(found[0]) as src, open(partial, "wb") as out:
                import shutil

                shutil.copyfileobj(src, out, length=1 << 20)
            partial.replace(target)   # atomic: a half-unpacked file is never taken for the checkpoint
    except zipfile.BadZipFile:
        raise BackboneError(f"{url}: the download is not a zip archive (truncated?); delete {folder} and "
                            "try again.") from None
    finally:
        archive.unlink(missing_ok=True)
    return target


def _resolve_checkpoint(pretrained: str, cache_dir) -> Path | None:
    """A local file for ``pretrained`` if it names one (path, ``hf-file:org/repo/file`` or ``url-zip:``), else None."""
    if pretrained.startswith("url-zip:"):
        return _zip_checkpoint(pretrained, cache_dir)
    if pretrained.startswith("hf-file:"):
        spec = pretrained[len("hf-file:"):]
        parts = spec.split("/")
        if len(parts) < 3:
            raise BackboneError(f"{pretrained!r}: expected 'hf-file:ORG/REPO/PATH/IN/REPO'.")
        from huggingface_hub import hf_hub_download

        from .data.hub import offline_message, offline_reason

        offline = offline_reason()
        try:
            with _hub_cache_only(offline):
                return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), cache_dir=cache_dir))
        except Exception as err:
            if offline:
                raise BackboneError(offline_message(
                    f"checkpoint {pretrained!r}", offline,
                    "Download the file on a machine with network and pass its local path as `pretrained`.",
                    err)) from None
            raise BackboneError(f"could not download {pretrained!r}: {type(err).__name__}: {str(err)[:200]}. "
                                "Offline? Download the file elsewhere and pass its local path as `pretrained`.") from None
    path = Path(os.path.expanduser(pretrained))
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt") or os.sep in pretrained:
        if not path.is_file():
            raise BackboneError(f"checkpoint file {pretrained!r} does not exist.")
        return path
    return None


def load_backbone(name: str = OFFLINE_DEFAULT, pretrained: str | None = None, *, device: str = "auto",
                  precision: str = "auto", force_quick_gelu: bool | None = None, seed: int = 0,
                  cache_dir: str | None = None) -> Backbone:
    """Load an open_clip model (see the module docstring for every accepted form)."""
    import open_clip

    if name == SCENES_MODEL:
        from .scenes_model import RANDOM_TAG, SCENES_TAG

        if pretrained in (None, "", SCENES_TAG):   # the shipped weights pretrained by `make pretrain`
            return load_scenes_backbone(device=device, precision=precision)
        if pretrained != RANDOM_TAG:
            raise BackboneError(f"{SCENES_MODEL!r} has the pretrained tags {SCENES_TAG!r} (the shipped weights, the "
                                f"default) and {RANDOM_TAG!r} (its random init); got {pretrained!r}.")
        pretrained = None
    if not pretrained and (Path(os.path.expanduser(name)) / SAVED_BACKBONE_FILE).is_file():
        # a folder written by save_backbone (e.g. contrastive fine-tuning on pairs)
        return _load_saved_backbone(Path(os.path.expanduser(name)), device, precision)
    register_model_configs()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    pretrained = pretrained or None
    schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
    source: dict = {"kind": schema or "open_clip"}
    kwargs: dict = {}
    checkpoint = None

    if schema is None and name not in open_clip.list_models():
        from .domains import resolve_backbone_alias  # an alias from domains/backbones.yaml

        try:
            recipe = resolve_backbone_alias(name)
        except FileNotFoundError:
            recipe = None
        if recipe is not None:
            if pretrained:
                raise BackboneError(f"{name!r} is an alias that fixes its own weights; do not pass pretrained="
                                    f"{pretrained!r} (use the open_clip name instead).")
            name, pretrained = recipe
            schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
            source["alias"] = True
    if schema is None:
        if name not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            raise BackboneError(f"unknown architecture {name!r}." + (f" Close: {close}." if close else "")
                                + " See open_clip.list_models(), workbench.domains.backbones() for aliases, or use "
                                "'hf-hub:ORG/REPO' / 'local-dir:PATH'.")
        if pretrained:
            checkpoint = _resolve_checkpoint(pretrained, cache_dir)
            if checkpoint is None:
                tags = open_clip.list_pretrained_tags_by_model(name)
                if pretrained not in tags:
                    raise BackboneError(f"{name!r} has no pretrained tag {pretrained!r}; known tags: {tags}. "
                                        "A checkpoint file path is also accepted.")
                tag_gelu = open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False)
                arch_gelu = open_clip.get_model_config(name).get("quick_gelu", False)
                if tag_gelu and not arch_gelu and force_quick_gelu is None:
                    warnings.warn(f"{name!r} + {pretrained!r}: these weights were trained with QuickGELU; switching it "
                                  f"on (use '{name}-quickgelu' to silence this).", stacklevel=2)
                    force_quick_gelu = True
        elif name not in (RANDOM_TINY, SCENES_MODEL):
            warnings.warn(f"backbone {name!r} with no pretrained weights: randomly initialised (seed={seed}).",
                          stacklevel=2)
        kwargs["pretrained"] = None if checkpoint else pretrained
    if force_quick_gelu:
        kwargs["force_quick_gelu"] = True
    if schema == "local-dir" and not Path(name[len("local-dir:"):]).expanduser().is_dir():
        raise BackboneError(f"{name!r}: folder does not exist (it must hold open_clip_config.json and weights).")

    # Weights (and an hf-hub model's config and tokenizer) may come from the Hub. Without network
    # the Hub libraries retry for about a minute: find out first, then read the cache only.
    offline = None
    if schema == "hf-hub" or (kwargs.get("pretrained") and checkpoint is None):
        from .data.hub import offline_reason

        offline = offline_reason()
    torch.manual_seed(seed)  # random-init towers (the offline default) are reproducible
    if (name in (RANDOM_TINY, SCENES_MODEL) and not pretrained) or checkpoint is not None:
        # open_clip's "initialized randomly" warning: intended for the offline default, and for a
        # checkpoint file the weights are loaded right below.
        logging.disable(logging.WARNING)
    try:
        with _hub_cache_only(offline):
            model, _, preprocess = open_clip.create_model_and_transforms(name, cache_dir=cache_dir, **kwargs)
    except Exception as err:
        if offline:
            raise _offline_error(name, pretrained, offline, err) from None
        raise BackboneError(f"open_clip could not create {name!r} (pretrained={pretrained!r}): "
                            f"{type(err).__name__}: {str(err)[:300]}") from None
    finally:
        logging.disable(logging.NOTSET)
    if checkpoint is not None:
        state = _read_state_dict(checkpoint)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches raise even with strict=False
            detail = [line.strip() for line in str(err).splitlines() if "size mismatch" in line][:2]
            raise BackboneError(f"checkpoint {str(checkpoint)!r} does not fit architecture {name!r}: {detail}. "
                                "Pick the architecture the checkpoint was trained on (RemoteCLIP/GeoRSCLIP "
                                "ViT-B/32: 'ViT-B-32-quickgelu').") from None
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise BackboneError(f"checkpoint {str(checkpoint)!r} does not fit architecture {name!r}: "
                                f"{len(missing)} missing key(s) (e.g. {missing[:3]}), {len(result.unexpected_keys)} "
                                f"unexpected (e.g. {result.unexpected_keys[:3]}). Pick the architecture the "
                                "checkpoint was trained on (RemoteCLIP/GeoRSCLIP ViT-B/32: 'ViT-B-32-quickgelu').")
        source["checkpoint"] = str(checkpoint)
    model = model.to(dev).eval()
    try:
        with _hub_cache_only(offline):
            tokenizer = (open_clip.get_tokenizer(name, cache_dir=cache_dir) if schema
                         else open_clip.get_tokenizer(name))
    except Exception as err:
        if offline:
            raise _offline_error(name, pretrained, offline, err) from None
        raise BackboneError(f"open_clip could not load the tokenizer of {name!r}: {type(err).__name__}: "
                            f"{str(err)[:300]}") from None
    pp_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return Backbone(model=model, tokenizer=tokenizer, preprocess=preprocess, name=name,
                    pretrained=pretrained, device=dev, precision=prec, preprocess_cfg=pp_cfg, source=source)


def _hub_cache_only(offline: str | None):
    import contextlib

    if not offline:
        return contextlib.nullcontext()
    from .data.hub import cache_only

    return cache_only()


def load_scenes_backbone(device: str = "auto", precision: str = "auto", folder: Path | None = None) -> Backbone:
    """The shipped ``workbench-tiny-scenes`` weights (or those in ``folder``, e.g. a ``make pretrain``
    output) as a :class:`Backbone`, offline: the seed's random init, then the shipped tensors."""
    from .scenes_model import ASSET_DIR, CARD_FILE, META_FILE, RANDOM_TAG, SCENES_TAG, read_shipped

    folder = Path(folder or ASSET_DIR)
    init_seed = 0
    meta_file = folder / META_FILE
    if meta_file.is_file():
        import json

        init_seed = int(json.loads(meta_file.read_text()).get("init_seed", 0))
    backbone = load_backbone(SCENES_MODEL, RANDOM_TAG, device=device, precision=precision, seed=init_seed)
    model = backbone.model
    meta, state = read_shipped(folder, model.state_dict())
    model.load_state_dict(state, strict=False)
    model.to(backbone.device).eval()
    backbone.pretrained = SCENES_TAG
    backbone.source = {"kind": "workbench-pretrained", "asset": str(folder), "card": str(folder / CARD_FILE),
                       "corpus": meta.get("corpus"), "steps": meta.get("steps")}
    backbone._weights_hash, backbone._text_cache = None, {}
    return backbone


def _offline_error(name: str, pretrained: str | None, reason: str, err: BaseException) -> BackboneError:
    from .data.hub import offline_message

    what = f"backbone {name!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    return BackboneError(offline_message(
        what, reason, "Load it once on a machine with network (same cache_dir), or use local weights: "
        "load_backbone(ARCH, '/path/to/weights.pt'), 'local-dir:/path/to/model' (a folder with "
        "open_clip_config.json and weights), or the offline default 'workbench-tiny-scenes' (shipped).", err))


# -- adapted backbones saved as folders (contrastive fine-tuning on pairs) ------------------------

from .paths import SAVED_BACKBONE_FILE  # noqa: E402  (one name for the marker file, also read by run keys)


def save_backbone(backbone: Backbone, folder, info: dict | None = None) -> Path:
    """Write ``backbone`` as a folder ``load_backbone(folder)`` reads: the open_clip state dict
    (``open_clip_model.safetensors``, float32) and ``backbone.json`` (the base architecture and
    pretrained tag it is built on, QuickGELU, how it was adapted, and each file's size and SHA-256).
    Written atomically; never a pickle."""
    import json

    from safetensors.torch import save_file

    from .methods.base import atomic_folder, file_manifest

    quick_gelu = any(type(m).__name__ == "QuickGELU" for m in backbone.model.modules())
    with atomic_folder(folder) as tmp:
        state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                 for k, v in backbone.model.state_dict().items()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        base = backbone.source.get("base") or {"name": backbone.name, "pretrained": backbone.pretrained}
        meta = {"format": 1, "kind": "workbench-backbone", "base": base, "quick_gelu": quick_gelu,
                "adapted_by": info or {}, "weights_hash": backbone.weights_hash,
                "files": file_manifest(tmp, exclude={SAVED_BACKBONE_FILE})}
        (tmp / SAVED_BACKBONE_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return Path(folder)


def _load_saved_backbone(folder: Path, device, precision) -> Backbone:
    import json

    import open_clip
    from safetensors.torch import load_file

    from .methods.base import check_manifest

    try:
        meta = json.loads((folder / SAVED_BACKBONE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise BackboneError(f"saved backbone {str(folder)!r}: {SAVED_BACKBONE_FILE} is unreadable ({err}).") from None
    if meta.get("kind") != "workbench-backbone":
        raise BackboneError(f"{str(folder)!r} is not a saved workbench backbone ({SAVED_BACKBONE_FILE} kind "
                            f"{meta.get('kind')!r}).")
    try:
        check_manifest(folder, meta.get("files"), required=("open_clip_model.safetensors",))
    except Exception as err:
        raise BackboneError(str(err)) from None
    register_model_configs()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    base = meta["base"]["name"]
    offline = None
    if base.startswith("hf-hub:"):
        from .data.hub import offline_reason

        offline = offline_reason()
    logging.disable(logging.WARNING)   # "initialized randomly": the weights are loaded right below
    try:
        with _hub_cache_only(offline):
            model, _, preprocess = open_clip.create_model_and_transforms(
                base, pretrained=None, **({"force_quick_gelu": True} if meta.get("quick_gelu") else {}))
            tokenizer = open_clip.get_tokenizer(base)
    except Exception as err:
        raise BackboneError(f"saved backbone {str(folder)!r}: could not build its base architecture {base!r}: "
                            f"{type(err).__name__}: {str(err)[:200]}") from None
    finally:
        logging.disable(logging.NOTSET)
    state = load_file(str(folder / "open_clip_model.safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneError(f"saved backbone {str(folder)!r} does not fit architecture {base!r}: "
                            f"{str(err).splitlines()[0][:200]}") from None
    model = model.to(dev).eval()
    pp_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return Backbone(model=model, tokenizer=tokenizer, preprocess=preprocess, name=base, pretrained=str(folder),
                    device=dev, precision=prec, preprocess_cfg=pp_cfg,
                    source={"kind": "saved-backbone", "folder": str(folder), "base": meta["base"],
                            "adapted_by": (meta.get("adapted_by") or {}).get("method")})
