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


class Predictor:
    def __init__(self, backbone, method: Method, templates: Sequence[str] | None = None, metrics: dict | None = None,
                 calibration: tuple[torch.Tensor, torch.Tensor] | None = None):
        method._check_fitted()
        self.backbone = backbone
        self.method = method
        self.templates = list(templates or [])
        self.metrics = metrics or {}
        #: (probabilities [N, C], labels [N]) on held-out labelled images: the K-shot validation set
        self.calibration = calibration

    @property
    def class_names(self) -> list[str]:
        return list(self.method.class_names)

    def predict_logits(self, images: Sequence) -> torch.Tensor:
        """Logits for PIL images, arrays or file paths (each decoded and converted to RGB)."""
        pixels = []
        for i, img in enumerate(images):
            try:
                pixels.append(self.backbone.preprocess(open_rgb(img)))
            except UnreadableImage as err:
                raise UnreadableImage(f"image {i} ({img if isinstance(img, (str, Path)) else type(img).__name__}): "
                                      f"{err}") from None
        if not pixels:
            raise ConfigError("predict() needs at least one image.")
        encoder = self.method.image_backbone(self.backbone)
        feats = torch.cat([encoder.encode_images(torch.stack(pixels[i:i + 64]),
                                                 normalize=self.method.normalized_input).cpu()
                           for i in range(0, len(pixels), 64)])
        return self.method.predict_logits(feats)

    def predict(self, images: Sequence, coverage: float | None = None, class_conditional: bool = False) -> pd.DataFrame:
        """One row per image: predicted ``label``, its ``confidence``, and every class probability.

        With ``coverage`` (e.g. 0.9) each row also gets a ``prediction_set``: the classes that
        contain the true one with probability ≥ coverage (split conformal, calibrated on the
        run's K-shot validation images; ``class_conditional=True`` for per-class coverage), and
        its ``set_size``.
        """
        if isinstance(images, (str, Path)) or not hasattr(images, "__len__"):
            images = [images]
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
            sets = self.conformal(coverage, class_conditional).predict_sets(probs_t)
            table.insert(3, "prediction_set", [[names[c] for c in row.nonzero().flatten().tolist()] for row in sets])
            table.insert(4, "set_size", sets.sum(1).numpy())
        return table

    def conformal(self, coverage: float = 0.9, class_conditional: bool = False):
        """A :class:`~workbench.conformal.ConformalCalibrator` fitted on the stored validation probabilities."""
        from .conformal import ConformalCalibrator

        if self.calibration is None:
            raise ConfigError("this model has no calibration images (its run had no K-shot validation set), so it "
                              "cannot give prediction sets; refit with a split that has validation images.")
        return ConformalCalibrator(coverage, class_conditional).fit(*self.calibration)

    def save(self, folder) -> Path:
        """Write the folder atomically: into a hidden sibling renamed at the end, ``predictor.json``
        last (with the size and SHA-256 of every file), so a half-written folder never looks complete."""
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
                    "files": file_manifest(tmp)}
            (tmp / "predictor.json").write_text(json.dumps(meta, indent=1))
        return Path(folder)

    @classmethod
    def load(cls, folder, device: str = "auto") -> "Predictor":
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
        backbone = load_backbone(spec["name"], spec["pretrained"], device=device)
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
                   calibration=calibration)


def load(folder, device: str = "auto") -> Predictor:
    """Load a saved model folder (``Predictor.save`` / ``run_experiment(save_model=True)``)."""
    return Predictor.load(folder, device=device)
