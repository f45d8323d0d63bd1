"""A fitted method plus its backbone: predicts labels on new images with no dataset and no training code.

``Predictor.save(folder)`` writes ``predictor.json`` (backbone recipe and weights hash,
preprocessing, class names, templates) and the method's own folder; ``workbench.load(folder)``
rebuilds it and ``predict(images)`` returns a table of labels and class probabilities.

When the run had K-shot validation images, their predicted probabilities and labels are kept
(``calibration.safetensors``, a few KB) so that ``predict(images, coverage=0.9)`` can add
split-conformal prediction sets (:mod:`workbench.conformal`) at any coverage asked for.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .backbones import load_backbone
from .data.images import UnreadableImage, open_rgb
from .errors import BackboneError, ConfigError
from .methods.base import Method, atomic_folder, check_manifest, file_manifest, read_json

PREDICTOR_FORMAT = 1


def _as_image_list(images) -> list:
    """One image or a sequence of them as a list; ``None`` is refused."""
    import numpy as np

    if images is None:
        raise ConfigError("predict() got None; pass image files, PIL images or arrays (one or a list).")
    if isinstance(images, (str, Path, np.ndarray, torch.Tensor)) or not hasattr(images, "__len__"):
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)   # a batch N x H x W x C
        return [images]
    return list(images)


class Predictions(pd.DataFrame):
    """``predict()``'s table; printed as what a reader wants first, every column still there.

    The table holds ``image``, ``label``, ``confidence`` (the label's probability, a fraction in
    0–1), with ``coverage=`` a ``prediction_set`` and ``set_size``, then one probability column per
    class. Printed (or shown in a notebook) it gives those leading columns plus the three most
    probable classes, instead of a row cut to "image … <last class>" by the terminal width.
    """

    _LEAD = ("image", "label", "confidence", "prediction_set", "set_size")

    @property
    def _constructor(self):
        return Predictions

    def _readable(self) -> pd.DataFrame | None:
        lead = [c for c in self._LEAD if c in self.columns]
        classes = [c for c in self.columns if c not in self._LEAD]
        if "label" not in lead:
            return None
        view = pd.DataFrame(self[lead])
        if "confidence" in view:
            view["confidence"] = [f"{100 * v:.1f}%" for v in view["confidence"]]
        if len(classes) > 1:
            probs = self[classes].to_numpy(dtype=float)
            view["top classes"] = [", ".join(f"{classes[j]} {100 * row[j]:.0f}%" for j in row.argsort()[::-1][:3])
                                   for row in probs]
        return view

    def __repr__(self) -> str:
        view = self._readable()
        if view is None:
            return super().__repr__()
        more = "" if "prediction_set" in self.columns else "; predict(..., coverage=0.9) adds prediction sets"
        return (f"{view.to_string(index=False)}\n[{len(self)} image(s); one probability column per class "
                f"(table['<class>']){more}]")

    def _repr_html_(self):
        view = self._readable()
        return super()._repr_html_() if view is None else view._repr_html_()


class Predictor:
    def __init__(self, backbone, method: Method, templates: Sequence[str] | None = None, metrics: dict | None = None,
                 calibration: tuple[torch.Tensor, torch.Tensor] | None = None, calibration_certified: bool = False):
        method._check_fitted()
        self.backbone = backbone
        self.method = method
        self.templates = list(templates or [])
        self.metrics = metrics or {}
        #: (probabilities [N, C], labels [N]) on held-out labelled images: the K-shot validation set
        self.calibration = calibration
        #: True when the calibration images were held out of fitting and selection (or the method never read
        #: them): only then do the prediction sets carry the coverage guarantee
        self.calibration_certified = bool(calibration_certified)

    @property
    def class_names(self) -> list[str]:
        return list(self.method.class_names)

    def predict_logits(self, images: Sequence) -> torch.Tensor:
        """Logits for PIL images, arrays or file paths (each decoded and converted to RGB).

        Refused with a clear error: ``None``, a folder, an image with NaN/inf values (it would get
        a confident label from garbage), anything that does not decode.
        """
        images = _as_image_list(images)
        pixels = []
        for i, img in enumerate(images):
            what = f"image {i} ({img if isinstance(img, (str, Path)) else type(img).__name__})"
            if img is None:
                raise ConfigError(f"predict(): {what} is None; pass image files, PIL images or arrays.")
            if isinstance(img, (str, Path)) and Path(img).is_dir():
                raise ConfigError(f"predict(): {str(img)!r} is a folder: pass image files or a dataset "
                                  "(e.g. sorted(Path(folder).glob('*.png'))).")
            if isinstance(img, torch.Tensor):
                img = img.detach().cpu().numpy()
            try:
                pixel = self.backbone.preprocess(open_rgb(img))
            except UnreadableImage as err:
                raise UnreadableImage(f"{what}: {err}") from None
            if not torch.isfinite(pixel).all():
                raise UnreadableImage(f"{what}: NaN or infinite values after preprocessing; not predicted.")
            pixels.append(pixel)
        if not pixels:
            raise ConfigError("predict() needs at least one image.")
        encoder = self.method.image_backbone(self.backbone)
        feats = torch.cat([encoder.encode_images(torch.stack(pixels[i:i + 64]),
                                                 normalize=self.method.normalized_input).cpu()
                           for i in range(0, len(pixels), 64)])
        return self.method.predict_logits(feats)

    def predict(self, images: Sequence, coverage: float | None = None, class_conditional: bool = False,
                score: str = "lac") -> pd.DataFrame:
        """One row per image: predicted ``label``, its ``confidence``, and every class probability.

        With ``coverage`` (e.g. 0.9) each row also gets a ``prediction_set``: the classes that
        contain the true one with probability ≥ coverage (split conformal, calibrated on the
        run's calibration images; ``class_conditional=True`` for per-class coverage; ``score``
        "lac", "aps" or "raps", see :mod:`workbench.conformal`), and its ``set_size``. A warning says
        when the calibration images were also selection images (the guarantee then does not hold).
        """
        images = _as_image_list(images)
        if hasattr(self.method, "predict_findings"):   # multi-label: findings above threshold + every probability
            if coverage is not None:
                raise ConfigError("prediction sets (coverage=) are for single-label models; a multi-label model "
                                  "already returns every finding above its threshold.")
            logits = self.predict_logits(images).float()
            probs = torch.sigmoid(logits).numpy()
            table = pd.DataFrame(probs, columns=self.class_names)
            thr = self.method.thresholds.double().numpy()
            table.insert(0, "findings", [[n for n, p, t in zip(self.class_names, row, thr) if p >= t] for row in probs])
            table.insert(0, "image", [str(i) if isinstance(i, (str, Path)) else f"#{n}" for n, i in enumerate(images)])
            return table
        probs_t = torch.softmax(self.predict_logits(images).float(), dim=-1)
        probs = probs_t.numpy()
        names = self.class_names
        table = pd.DataFrame(probs, columns=names)
        table.insert(0, "confidence", probs.max(axis=1))
        table.insert(0, "label", [names[i] for i in probs.argmax(axis=1)])
        table.insert(0, "image", [str(i) if isinstance(i, (str, Path)) else f"#{n}" for n, i in enumerate(images)])
        if coverage is not None:
            sets = self.conformal(coverage, class_conditional, score).predict_sets(probs_t)
            table.insert(3, "prediction_set", [[names[c] for c in row.nonzero().flatten().tolist()] for row in sets])
            table.insert(4, "set_size", sets.sum(1).numpy())
        return Predictions(table)

    def __repr__(self) -> str:
        b = self.backbone
        fitted = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        score = ", ".join(f"test {k.replace('_', ' ')} {100 * v:.1f}%" for k, v in list(fitted.items())[:2])
        return (f"Predictor({self.method.name} on {b.name} ({b.pretrained or 'random weights'}), "
                f"{len(self.class_names)} classes: {', '.join(self.class_names[:4])}"
                f"{', …' if len(self.class_names) > 4 else ''}"
                f"{'; run ' + score if score else ''}; prediction sets: "
                f"{'yes (coverage=…)' if self.calibration is not None else 'no calibration images'}; device {b.device})")

    def conformal(self, coverage: float = 0.9, class_conditional: bool = False, score: str = "lac"):
        """A :class:`~workbench.conformal.ConformalCalibrator` fitted on the stored validation probabilities."""
        from .conformal import ConformalCalibrator

        if self.calibration is None:
            raise ConfigError("this model has no calibration images (its run had no K-shot validation set), so it "
                              "cannot give prediction sets; refit with a split that has validation images.")
        if not self.calibration_certified:
            import warnings

            warnings.warn("prediction sets not certified: this model's calibration images are K-shot validation images "
                          "its method read while fitting (hyper-parameter or epoch selection), so the sets tend to "
                          "cover less than asked. Refit with run_experiment(..., calibration_fraction=0.5).",
                          stacklevel=3)
        return ConformalCalibrator(coverage, class_conditional, score=score).fit(*self.calibration)

    def save(self, folder) -> Path:
        """Write the folder atomically: into a hidden sibling renamed at the end, ``predictor.json``
        last (with the size and SHA-256 of every file), so a half-written folder never looks complete.
        A failed write (full disk, read-only folder) is a ConfigError naming the folder; an older
        save there stays intact."""
        try:
            return self._save(folder)
        except OSError as err:
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            raise ConfigError(f"cannot save the model to {str(folder)!r}: {err.strerror or err}{where} (full disk or "
                              "read-only folder?). An older model saved there is intact; free space or choose "
                              "another folder.") from None

    def _save(self, folder) -> Path:
        with atomic_folder(folder) as tmp:
            self.method.save(tmp / "method")
            if self.calibration is not None:
                from safetensors.torch import save_file

                probs, labels = self.calibration
                save_file({"probs": probs.detach().float().cpu().contiguous(),
                           "labels": labels.detach().long().cpu().contiguous()}, str(tmp / "calibration.safetensors"))
            meta = {"format": PREDICTOR_FORMAT, "backbone": {"name": self.backbone.name,
                                                             "pretrained": self.backbone.pretrained,
                                                             "weights_hash": self.backbone.weights_hash,
                                                             "preprocess": self.backbone.provenance()["preprocess"]},
                    "class_names": self.class_names, "templates": self.templates, "metrics": self.metrics,
                    "calibration_certified": self.calibration_certified,
                    "files": file_manifest(tmp)}
            (tmp / "predictor.json").write_text(json.dumps(meta, indent=1))
        return Path(folder)

    @classmethod
    def load(cls, folder, device: str = "auto", pretrained: str | None = None) -> "Predictor":
        """Load a saved folder. Its backbone recipe is data: see :func:`saved_backbone_recipe` for what is
        followed; ``pretrained`` (a path, ``url-zip:`` or ``hf-file:`` recipe) replaces the saved weights
        recipe when the folder names weights outside itself and your cache (the weights hash is checked)."""
        folder = Path(folder)
        meta_path = folder / "predictor.json"
        if not meta_path.is_file():
            if (folder / "method").is_dir():
                raise ConfigError(f"saved model folder {str(folder)!r} is incomplete: predictor.json is missing. The "
                                  "save was interrupted or the folder was copied only partly; save the model again.")
            raise ConfigError(f"{str(folder)!r} is not a saved model folder (no predictor.json).")
        meta = read_json(meta_path, "saved model folder")
        # Every file checked before the backbone is built or a tensor read: a missing adapter would
        # otherwise surface as a Hub-id error from inside peft.
        check_manifest(folder, meta.get("files"), required=["method/method.json"])
        spec = meta["backbone"]
        name, weights = saved_backbone_recipe(folder, spec, pretrained)
        backbone = load_backbone(name, weights, device=device)
        if backbone.weights_hash != spec["weights_hash"]:
            raise BackboneError(f"{str(folder)!r} was fitted on backbone {spec['name']!r} with weights "
                                f"{spec['weights_hash'][:16]}, but loading it now gives {backbone.weights_hash[:16]}; "
                                "the checkpoint changed. Re-fit, or restore the original weights file.")
        method = Method.load(folder / "method", backbone=backbone)
        calibration = None
        if (folder / "calibration.safetensors").is_file():
            from safetensors.torch import load_file

            stored = load_file(str(folder / "calibration.safetensors"))
            calibration = (stored["probs"], stored["labels"])
        return cls(backbone, method, templates=meta.get("templates"), metrics=meta.get("metrics"),
                   calibration=calibration, calibration_certified=meta.get("calibration_certified") is True)


def load(folder, device: str = "auto", pretrained: str | None = None) -> Predictor:
    """Load a saved model folder (``Predictor.save`` / ``run_experiment(save_model=True)``).

    ``pretrained`` names the backbone weights yourself when the folder's recipe points outside
    the folder and your cache (a URL to fetch, a file elsewhere): see :func:`saved_backbone_recipe`.
    """
    return Predictor.load(folder, device=device, pretrained=pretrained)


def _user_caches() -> list[Path]:
    """The folders a saved model's weights may come from without asking: the user's own caches."""
    import os

    from .backbones import checkpoint_cache_root

    roots = [checkpoint_cache_root(), Path.home() / ".cache" / "huggingface"]
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]).expanduser())
    return roots


def _inside(path: Path, roots) -> bool:
    p = path.expanduser().resolve()
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)


def saved_backbone_recipe(folder, spec: dict, pretrained: str | None = None) -> tuple[str, str | None]:
    """The (name, pretrained) to rebuild a saved model's backbone with; a ConfigError for anything unsafe.

    ``predictor.json`` may come from someone else, so its recipe is followed only where it stays
    on this machine's trusted ground: an open_clip architecture or alias name, ``hf-hub:ORG/REPO``
    and ``hf-file:`` (the Hub client, which honours ``HF_HUB_OFFLINE``), an open_clip pretrained
    tag, a weights file inside the saved folder or the user's caches, a ``local-dir:`` inside them,
    and a ``url-zip:`` recipe whose file is already unpacked in the cache or that
    ``domains/backbones.yaml`` ships. A URL to fetch or a path elsewhere is refused unless the
    user passes ``pretrained`` to :func:`load` explicitly.
    """
    from .backbones import zip_checkpoint_target

    folder = Path(folder)
    name, saved = spec.get("name"), spec.get("pretrained")
    where = f"saved model {str(folder)!r}: predictor.json"
    if not isinstance(name, str) or not name or (saved is not None and not isinstance(saved, str)):
        raise ConfigError(f"{where} has no valid backbone name/pretrained; save the model again.")
    trusted = [folder, *_user_caches()]
    explicit = f"If you trust it, pass it yourself: wb.load({str(folder)!r}, pretrained=...)."
    if "://" in name or (name.startswith("local-dir:") and not _inside(Path(name[len("local-dir:"):]), trusted)):
        raise ConfigError(f"{where} names backbone {name!r}, outside the folder and your cache; it is not followed. "
                          "Copy the model folder into the saved folder or your cache, or load the backbone yourself "
                          "and use workbench.Predictor(backbone, method).")
    if name.startswith("hf-hub:") and (".." in name or name.count("/") != 1):
        raise ConfigError(f"{where} names backbone {name!r}: expected 'hf-hub:ORG/REPO'.")
    if pretrained is not None:
        return name, pretrained
    if not saved or saved.startswith("hf-file:"):
        if saved and ".." in saved.split("/"):
            raise ConfigError(f"{where} names weights {saved!r}: a Hub file path may not contain '..'.")
        return name, saved
    if saved.startswith("url-zip:"):
        from .domains import backbone_recipes

        url, _, member = saved[len("url-zip:"):].partition("#")
        shipped = any(r.get("pretrained") == saved for r in backbone_recipes().values())
        cached = (member and Path(member).name == member
                  and zip_checkpoint_target(url, member).is_file())
        if shipped or cached:
            return name, saved
        raise ConfigError(f"{where} asks to download its weights from {url!r}; a saved model never reaches the "
                          f"network by itself. {explicit}")
    if "://" in saved:
        raise ConfigError(f"{where} names weights at a URL ({saved!r}); it is not followed. {explicit}")
    looks_like_path = "/" in saved or "\\" in saved or Path(saved).suffix in (".pt", ".pth", ".bin", ".safetensors",
                                                                            ".ckpt")
    if not looks_like_path:
        return name, saved   # an open_clip pretrained tag (load_backbone checks it against the known tags)
    path = Path(saved).expanduser()
    candidates = [path] if path.is_absolute() else [folder / path, Path.cwd() / path]
    for p in candidates:
        if _inside(p, trusted):
            return name, str(p)
    raise ConfigError(f"{where} names weights file {saved!r}, outside the folder and your cache; a saved model "
                      f"does not read files elsewhere by itself. {explicit}")
