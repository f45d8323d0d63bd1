"""The one interface every adaptation method implements, and the registry that names them.

A method is a class with a ``Config`` dataclass (its hyper-parameters, named as in the paper)
and four operations::

    method = get_method("linear_probe", max_iter=500)
    method.fit(task)                      # support + K-shot val of a FewShotTask, never test
    logits = method.predict_logits(test_features)
    method.save(folder); Method.load(folder)

Adding a method = one file in the family folder of ``workbench/methods/`` (``features/``,
``prompts/`` or ``weights/``) with ``@register("name")`` on the class, plus its line in
:data:`workbench.methods.registry.METHODS`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, did_you_mean
from ..validate import check_config
from .registry import method_class

SAVE_FORMAT = 1


@dataclasses.dataclass
class NoConfig:
    pass


class Method:
    """Base class: subclasses set ``Config`` and implement ``fit``, ``predict_logits``, ``state``/``load_state``."""

    name: ClassVar[str] = "method"
    Config: ClassVar[type] = NoConfig
    #: feature-space methods work from cached features; image-space ones train the encoders
    uses_images: ClassVar[bool] = False
    #: predict_logits takes L2-normalised image features; False: the encoder's raw outputs
    #: (the reference linear probe), which callers pass as ``Features.raw.mean(0)``
    normalized_input: bool = True
    #: bounds of Config fields beyond the shared ones in :mod:`workbench.validate`, e.g.
    #: ``{"beta": {"minimum": 0.0}}`` (keyword arguments of :func:`workbench.validate.check_float`)
    param_bounds: ClassVar[dict] = {}
    #: files a saved folder must hold besides method.json (checked on load of folders saved without a manifest)
    saved_files: ClassVar[tuple] = ("state.safetensors",)
    #: which unlabeled images the method uses (see :mod:`workbench.unlabeled`): None (inductive),
    #: ``"pool"`` (a pool of unlabeled images, or the batch it predicts: TransCLIP) or ``"stream"``
    #: (the images it predicts, one after the other: TDA)
    uses_unlabeled: ClassVar[str | None] = None
    #: after fit: whether the prediction for an image depends on the other images predicted with it
    transductive: bool = False

    def __init__(self, config: Any = None, **params):
        if config is not None and params:
            raise ConfigError(f"{self.name}: pass either a config object or keyword parameters, not both.")
        if config is None:
            fields = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(params) - fields)
            if unknown:
                raise ConfigError(f"{self.name}: unknown parameter {unknown[0]!r}; its parameters are "
                                  f"{sorted(fields) or 'none'}." + did_you_mean(unknown[0], fields))
            config = self.Config(**params)
        elif dataclasses.is_dataclass(self.Config) and not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}.")
        # Types and bounds of every parameter, checked now: before any image is encoded or step trained.
        self.config = check_config(config, where=self.name, bounds=self.param_bounds)
        self.class_names: list[str] | None = None
        self.fit_info: dict = {}   # what fitting chose (selected hyper-parameters, templates, ...)

    # -- to implement -----------------------------------------------------------------------
    def fit(self, task) -> "Method":
        raise NotImplementedError

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors needed to predict after loading."""
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def _check_fitted(self):
        if self.class_names is None:
            raise RuntimeError(f"{self.name}: call fit(task) (or load a saved method) before predicting.")

    def image_backbone(self, backbone):
        """The backbone whose image features ``predict_logits`` expects: the frozen one, unless the
        method adapts the image encoder (CLIP-LoRA), which returns its adapted copy."""
        return backbone

    def after_load(self, folder: Path, backbone) -> None:
        """Hook for methods that need the backbone to rebuild themselves (LoRA adapters)."""

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.predict_logits(features).float(), dim=-1)

    def checkpoint_identity(self, task) -> dict:
        """What a training checkpoint of this run must match to be resumed: the task's data
        fingerprint (dataset, split ids, backbone, templates) and this method's name and config."""
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "checkpoint_dir"}
        return {"method": self.name, "config": config, "task": task.fingerprint()}

    def describe(self) -> dict:
        return {"method": self.name, "config": dataclasses.asdict(self.config), "fit_info": self.fit_info}

    def save_extra(self, folder: Path) -> None:
        """Hook: anything beyond tensors (peft adapters) goes here."""

    def save(self, folder) -> Path:
        """Write ``state.safetensors``, the method's extras (LoRA adapter) and, last, ``method.json``
        (name, config, class names, what fitting chose, and the size and SHA-256 of every other file).

        Everything is written into a hidden sibling folder that is renamed to ``folder`` at the
        end, so an interrupted save never leaves a folder that looks complete.
        """
        from safetensors.torch import save_file

        self._check_fitted()
        with atomic_folder(folder) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state().items()},
                      str(tmp / "state.safetensors"))
            self.save_extra(tmp)
            from ..paths import package_version as __version__

            meta = {"format": SAVE_FORMAT, "workbench_version": __version__, "method": self.name,
                    "config": dataclasses.asdict(self.config),
                    "class_names": self.class_names, "fit_info": self.fit_info,
                    "files": file_manifest(tmp, exclude={"method.json"})}
            (tmp / "method.json").write_text(json.dumps(meta, indent=1, default=str))
        return Path(folder)

    @staticmethod
    def load(folder, backbone=None) -> "Method":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / "method.json"
        if not meta_path.is_file():
            if folder.is_dir() and any(folder.iterdir()):
                raise ConfigError(f"saved method folder {str(folder)!r} is incomplete: method.json is missing. "
                                  "The save was interrupted or the folder was copied only partly; save it again.")
            raise ConfigError(f"{str(folder)!r} is not a saved method (no method.json).")
        meta = read_json(meta_path, "saved method folder")
        cls = method_class(meta["method"])
        check_manifest(folder, meta.get("files"), required=cls.saved_files)
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(meta.get("config") or {}) - known)
        if unknown:
            from ..paths import package_version as __version__

            raise ConfigError(f"saved method folder {str(folder)!r}: method.json has setting {unknown[0]!r}, which "
                              f"method {meta['method']!r} of this workbench version ({__version__}) does not know; "
                              f"the folder was written by workbench {meta.get('workbench_version', 'unknown')} (save "
                              f"format {meta.get('format')}). Load it with that version, or refit with this one."
                              + did_you_mean(unknown[0], known))
        method = cls(cls.Config(**meta["config"]))
        method.class_names = list(meta["class_names"])
        method.fit_info = meta.get("fit_info", {})
        try:
            state = load_file(str(folder / "state.safetensors"))
        except Exception as err:  # a truncated file from a folder saved before manifests existed
            raise ConfigError(f"saved method folder {str(folder)!r} is incomplete: state.safetensors cannot be read "
                              f"({type(err).__name__}: {err}); save the model again.") from None
        method.load_state(state)
        method.after_load(folder, backbone)
        return method


# -- saved folders: atomic writes and completeness checks ---------------------------------------

@contextmanager
def atomic_folder(folder):
    """Yield a hidden temporary sibling of ``folder`` to write into; on success rename it to
    ``folder`` (replacing an older one), on any error or interrupt remove it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.parent / f".{folder.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{tag}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(folder: Path, exclude=()) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder``."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in exclude}


def check_manifest(folder: Path, manifest: dict | None, required=()) -> None:
    """Raise ConfigError naming the first file of a saved folder that is missing, truncated or changed."""
    folder = Path(folder)
    # The manifest written at save time is authoritative; folders saved before manifests existed
    # are checked for the files they must have.
    expected = dict(manifest) if manifest else {name: None for name in required}
    for name, info in expected.items():
        path = folder / name
        where = f"saved model folder {str(folder)!r} is incomplete"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(f"saved model folder {str(folder)!r}: its manifest names {name!r}, a file outside the "
                              "folder; the folder is not from the workbench or was altered. Save the model again.")
        if not path.is_file():
            raise ConfigError(f"{where}: {name} is missing. The save was interrupted or the folder was copied only "
                              "partly; copy it again or save the model again.")
        if info is None:
            continue
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ConfigError(f"{where}: {name} is truncated or altered ({size} bytes, {info['bytes']} when saved); "
                              "copy it again or save the model again.")
        if _sha256(path) != info["sha256"]:
            raise ConfigError(f"{where}: {name} differs from what was saved (checksum mismatch); copy it again or "
                              "save the model again.")


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a saved folder, or a ConfigError saying it is truncated."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} {str(Path(path).parent)!r} is incomplete: {Path(path).name} is truncated or "
                          f"unreadable ({type(err).__name__}: {err}); save the model again.") from None
