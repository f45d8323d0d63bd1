"""What a method may look at while it fits: the support set, the K-shot validation set and text.

The test split is *not* reachable from a :class:`FewShotTask`, by construction: the task keeps
no reference to the dataset or to the feature cache in any public attribute. It holds a
:class:`FitView`, which knows only the support and validation samples (and the dataset's own
``val`` split, for the reference papers' full-validation protocol), and it encodes through the
cache only by its own methods (``support``, ``validation``, ``support_images``...). The
experiment runner encodes the test images separately and only hands their features to
``predict_logits``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .data.dataset import Dataset, Sample
from .data.sampling import FewShotSplit
from .errors import ConfigError, DataError
from .features import FeatureCache, Features, content_signature
from .prompts import DEFAULT_TEMPLATES, text_classifier, validate_templates


class FitView:
    """The part of a dataset that fitting may see: support and validation samples, nothing else.

    It answers the feature cache's questions (name, fingerprint, reader, samples by id) with the
    dataset's own values, so features keep the same cache keys as in a sweep's shared pool, but
    it refuses any sample id that is not a support or validation image.
    """

    def __init__(self, dataset: Dataset, split: FewShotSplit):
        self.name = dataset.name
        self.class_names = list(dataset.class_names)
        self.class_ids = list(dataset.class_ids)
        self.reader = dataset.reader
        self._fingerprint = dataset.fingerprint()
        self._support = split.train(dataset)
        self._val = split.val(dataset)
        self._full_val = list(dataset.split("val")) if dataset.has_split("val") else []
        self._allowed = {s.id: s for s in self._support + self._val + self._full_val}

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        return self._fingerprint

    def samples(self, ids: Sequence[str]) -> list[Sample]:
        refused = [i for i in ids if i not in self._allowed]
        if refused:
            raise DataError(f"dataset {self.name!r}: sample id(s) {refused[:3]} are not support or validation images; "
                            "fitting may not read them (the test split is unreachable while fitting).")
        return [self._allowed[i] for i in ids]

    def load_image(self, sample: Sample):
        self.samples([sample.id])
        return self.reader(sample.ref)


class FewShotTask:
    """Support set, K-shot validation set, class names and prompts of one (dataset, K, seed).

    Built from the dataset, split and cache, but keeps none of them publicly: see the module
    docstring. ``backbone``, ``split`` (support / validation ids only), ``templates``,
    ``descriptions`` and ``aug_seed`` are public.
    """

    def __init__(self, dataset: Dataset, split: FewShotSplit, backbone, cache: FeatureCache,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, descriptions: Mapping[str, Sequence[str]] | None = None,
                 aug_seed: int | None = None, language: Mapping | None = None, unlabeled=None):
        self._view = FitView(dataset, split)
        # the run's pool of unlabeled images (workbench.unlabeled.UnlabeledPool): features only, no labels
        self._unlabeled = unlabeled
        self._cache = cache
        self.split = split
        self.backbone = backbone
        self.templates = validate_templates(templates)
        self.descriptions = descriptions
        # language options of the text classifier every method starts from (descriptions, random-words
        # control, ZPE template weights): see workbench.prompts.task_text_classifier
        self.language = _check_language(language)
        self.language_info: dict = {}
        self.aug_seed = split.seed if aug_seed is None else aug_seed
        self._used: dict = {}

    def __repr__(self) -> str:
        return f"FewShotTask({self._view.name}, K={self.shots}, seed={self.seed}, {self.n_classes} classes)"

    @property
    def class_names(self) -> list[str]:
        return list(self._view.class_names)

    @property
    def n_classes(self) -> int:
        return self._view.n_classes

    @property
    def shots(self) -> int:
        return self.split.shots

    @property
    def seed(self) -> int:
        return self.split.seed

    @property
    def dataset_name(self) -> str:
        return self._view.name

    def fingerprint(self) -> dict:
        """What identifies the data a method fits on: dataset fingerprint, content of the support and
        validation images (:func:`~workbench.features.content_signature`), split ids, backbone, templates.

        Training checkpoints carry it, so a checkpoint is never resumed on other data.
        """
        seen = self._view._support + self._view._val
        language = {}
        if self.language:   # other language options give another text classifier: never resume across them
            language = {"language": {k: (hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()[:16]
                                         if isinstance(v, torch.Tensor) else v) for k, v in self.language.items()}}
        return {**language, "dataset": self._view.name, "dataset_fingerprint": self._view.fingerprint(),
                "content": content_signature(self._view, seen), "split": self.split.sha,
                "shots": self.shots, "seed": self.seed, "backbone": getattr(self.backbone, "provenance_id", None),
                "templates": list(self.templates), "aug_seed": self.aug_seed}

    def support_samples(self) -> list[Sample]:
        return list(self._view._support)

    def val_samples(self) -> list[Sample]:
        self._used["val_read"] = True   # the method may have selected on them: their scores are optimistic
        return list(self._view._val)

    @property
    def read_validation(self) -> bool:
        """Whether anything asked for the K-shot validation images since the task was built: a
        method that did may have chosen hyper-parameters on them, so its score
        on them is optimistic and they cannot calibrate conformal sets."""
        return bool(self._used.get("val_read"))

    def targets_for(self, ids: Sequence[str]) -> torch.Tensor:
        """Multi-label tasks: the ``[N, L]`` finding values (1 / 0 / -1 uncertain) of support or
        validation images, in the order of ``ids`` (e.g. a :class:`Features`' ids)."""
        samples = self._view.samples(ids)
        if not samples or getattr(samples[0], "targets", None) is None:
            raise ConfigError(f"dataset {self._view.name!r} is not a multi-label dataset: its images have one class "
                              "each (use Features.labels).")
        return torch.tensor([s.targets for s in samples], dtype=torch.long)

    def support_images(self) -> tuple[list, list[int]]:
        """The support images (PIL, RGB) and their labels, for methods that train the encoders."""
        samples = self.support_samples()
        return [self._view.load_image(s) for s in samples], [s.label for s in samples]

    def val_images(self) -> tuple[list, list[int]]:
        """The K-shot validation images (PIL, RGB) and their labels."""
        samples = self.val_samples()
        return [self._view.load_image(s) for s in samples], [s.label for s in samples]

    def support(self, views: int = 0, aug_scale: tuple[float, float] = (0.5, 1.0), flip: bool = True,
                stream: str = "") -> Features:
        """Support features; ``views > 0`` gives that many augmented passes (RandomResizedCrop + flip).

        ``stream`` names an independent sequence of random crops: Tip-Adapter-F trains on fresh
        augmentations (``stream="train"``) rather than on the crops that built its cache keys.
        """
        seed = self.aug_seed if not stream else f"{self.aug_seed}/{stream}"
        feats = self._cache.get(self._view, self.support_samples(), views=views, aug_seed=seed,
                                aug_scale=aug_scale, flip=flip, desc=f"support x{max(views, 1)}")
        self._used["support_skipped"] = feats.skipped
        return feats

    def validation(self) -> Features | None:
        """K-shot validation features, or None when the split has no validation images."""
        samples = self.val_samples()
        if not samples:
            return None
        feats = self._cache.get(self._view, samples, desc="validation")
        self._used["val_skipped"] = feats.skipped
        return feats

    def full_validation(self) -> Features:
        """The dataset's whole ``val`` split: the reference papers' selection protocol (Tip-Adapter, GDA).

        Only for reproducing paper tables: a real few-shot user does not have thousands of
        labelled validation images. Never the test split.
        """
        if not self._view._full_val:
            raise DataError(f"dataset {self._view.name!r} has no 'val' split, so selection='full_val' (the "
                            "reference protocol) is impossible; use selection='kshot_val'.")
        feats = self._cache.get(self._view, self._view._full_val, desc="full validation split")
        self._used["val_skipped"] = feats.skipped
        return feats

    def selection_set(self, selection: str) -> Features | None:
        """Features used to choose hyper-parameters: ``kshot_val`` (default) or ``full_val``."""
        if selection == "kshot_val":
            return self.validation()
        if selection == "full_val":
            return self.full_validation()
        raise ConfigError(f"selection {selection!r} is not one of 'kshot_val', 'full_val'.")

    @property
    def unlabeled_source(self) -> str:
        """Where the run's unlabeled images come from ("" for none, "test" for the transductive setting)."""
        return "" if self._unlabeled is None else self._unlabeled.source

    def unlabeled_features(self) -> torch.Tensor | None:
        """The pool's L2-normalised features ``[N, D]`` (no labels), or None: no pool, or the pool is the test
        split (then a transductive method uses the images it is asked to predict)."""
        if self._unlabeled is None or self._unlabeled.is_test:
            return None
        self._used["unlabeled"] = len(self._unlabeled)
        return self._unlabeled.x

    def text_classifier(self, templates: Sequence[str] | None = None) -> torch.Tensor:
        if self.language:
            from .prompts import task_text_classifier

            weights, self.language_info = task_text_classifier(self, templates or self.templates, **self.language)
            return weights
        return text_classifier(self.backbone, self.class_names, templates or self.templates, self.descriptions)

    @property
    def skipped(self) -> list[dict]:
        return self._used.get("support_skipped", []) + self._used.get("val_skipped", [])


def _check_language(language: Mapping | None) -> dict:
    allowed = {"descriptions", "weighting", "seed", "prior_features"}
    language = dict(language or {})
    unknown = sorted(set(language) - allowed)
    if unknown:
        raise ConfigError(f"FewShotTask(language=...): unknown key {unknown[0]!r}; allowed {sorted(allowed)}.")
    from .prompts import DESCRIPTION_MODES, WEIGHTINGS, check_choice

    check_choice(language.get("descriptions", "none"), DESCRIPTION_MODES, "language['descriptions']", "FewShotTask")
    check_choice(language.get("weighting", "equal"), WEIGHTINGS, "language['weighting']", "FewShotTask")
    return language


class TensorTask:
    """A few-shot task over features you already have (no images, no encoder).

    ``support_views`` is ``[V, N, D]`` raw features of V augmented passes of the support set
    (V=1 is fine for methods that take no augmented views), ``support_eval`` the ``[N, D]``
    eval-transform features, ``val_x``/``val_y`` the K-shot validation set and ``text`` the
    ``[C, D]`` text classifier. Used by the benchmarks, and by users who extracted features
    elsewhere.
    """

    def __init__(self, support_views, support_labels, support_eval, val_x, val_y, text, *, seed: int = 1,
                 logit_scale: float = 100.0, logit_bias: float | None = None, train_views=None, full_val=None,
                 class_names=None, unlabeled=None):
        import torch.nn.functional as F

        self.raw_views, self.labels, self.eval_feats = support_views, support_labels, support_eval
        self.val = Features(raw=val_x[None], labels=val_y, ids=[f"val/{i}" for i in range(len(val_y))])
        self.full_val = full_val
        self.text = F.normalize(text.float(), dim=-1)
        self.train_views = train_views
        self.seed = seed
        self.backbone = _TensorBackbone(logit_scale, logit_bias)
        self.n_classes = text.shape[0]
        self.class_names = list(class_names or [f"class {i}" for i in range(self.n_classes)])
        self.templates = ["{}"]
        self.requests: list[tuple[int, str]] = []
        #: unlabeled pool features [N, D] (normalised here), or None / "test" (transductive)
        self.unlabeled = unlabeled if unlabeled is None or isinstance(unlabeled, str) else F.normalize(
            unlabeled.float(), dim=-1)

    @property
    def unlabeled_source(self) -> str:
        if self.unlabeled is None or isinstance(self.unlabeled, str):
            return self.unlabeled or ""
        return "tensor"

    def unlabeled_features(self):
        return None if self.unlabeled is None or isinstance(self.unlabeled, str) else self.unlabeled

    def support(self, views: int = 0, aug_scale=(0.5, 1.0), flip: bool = True, stream: str = "") -> Features:
        self.requests.append((views, stream))
        ids = [f"support/{i}" for i in range(len(self.labels))]
        if views == 0:
            return Features(raw=self.eval_feats[None], labels=self.labels, ids=ids)
        source = self.train_views if stream == "train" and self.train_views is not None else self.raw_views
        if views > source.shape[0]:
            raise ValueError(f"asked for {views} augmented views, the task holds {source.shape[0]}")
        return Features(raw=source[:views], labels=self.labels, ids=ids)

    def validation(self) -> Features:
        return self.val

    def fingerprint(self) -> dict:
        """A hash of every tensor the task holds (training checkpoints carry it)."""
        h = hashlib.sha256()
        for t in (self.raw_views, self.labels, self.eval_feats, self.val.raw, self.val.labels, self.text,
                  self.train_views):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {"tensors": h.hexdigest()[:20], "seed": self.seed}

    def selection_set(self, selection: str) -> Features | None:
        from .errors import ConfigError

        if selection == "kshot_val":
            return self.val
        if selection == "full_val":
            if self.full_val is None:
                raise ConfigError("selection='full_val' needs full_val features in this TensorTask.")
            return self.full_val
        raise ConfigError(f"selection {selection!r} is not one of 'kshot_val', 'full_val'.")

    def text_classifier(self, templates=None) -> torch.Tensor:
        return self.text


@dataclass
class _TensorBackbone:
    logit_scale: float
    logit_bias: float | None
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
