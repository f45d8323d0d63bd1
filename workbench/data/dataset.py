"""The one dataset type every source produces.

A :class:`Dataset` is a list of samples (stable string id, integer label, a reference the
reader turns into an image) grouped into named splits (``train``, optionally ``val``,
``test``), plus class ids (as the source spells them: folder names, label strings) and the
readable class names that go into prompts (``footballfield`` → ``football field``).

Images are decoded lazily by a picklable *reader*, so a 30k-image set costs no memory until
it is encoded, and encoding can run in DataLoader worker processes.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError, did_you_mean
from .images import UnreadableImage, array_to_image, check_decodes, open_rgb

STANDARD_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    id: str      # stable across runs: relative path, "split/index", hub row id
    label: int   # index into Dataset.class_names
    ref: Any     # what the reader needs to produce the image (path, row index, array index)


class Reader:
    """Turns a sample's ``ref`` into an RGB image. Subclasses must stay picklable.

    ``max_image_pixels``: images above it are refused as unreadable (see ``data.images``);
    None means PIL's default limit.
    """

    def __init__(self, max_image_pixels: int | None = None):
        self.max_image_pixels = max_image_pixels

    def __call__(self, ref) -> Image.Image:
        return open_rgb(ref, getattr(self, "max_image_pixels", None))


@dataclass
class Dataset:
    name: str
    class_ids: list[str]
    class_names: list[str]
    splits: dict[str, list[Sample]]
    reader: Callable[[Any], Image.Image] = field(default_factory=Reader)
    source: dict = field(default_factory=dict)      # how it was loaded, for provenance
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason"} found while loading
    notes: list[str] = field(default_factory=list)   # e.g. how a hold-out test split was made
    domain: str | None = None
    templates: list[str] | None = None
    metric: str = "accuracy"
    #: metadata columns for subgroup audits (workbench.audit): column -> {sample id -> value}; never used in fitting
    groups: dict = field(default_factory=dict)

    def __post_init__(self):
        self.class_ids = [str(c) for c in self.class_ids]
        self.class_names = [str(c) for c in self.class_names]
        validate_class_names(self.class_ids, self.class_names, where=f"dataset {self.name!r}")
        n = len(self.class_names)
        seen: dict[str, str] = {}
        for split, samples in self.splits.items():
            for s in samples:
                if not 0 <= s.label < n:
                    raise DataError(f"dataset {self.name!r}, split {split!r}: sample {s.id!r} has label {s.label}, "
                                    f"outside 0..{n - 1} ({n} classes).")
                if s.id in seen:
                    raise DataError(f"dataset {self.name!r}: sample id {s.id!r} appears in split {seen[s.id]!r} "
                                    f"and in {split!r}; ids must be unique across splits.")
                seen[s.id] = split
        for split, samples in self.splits.items():
            if split == "test":
                continue
            counts = Counter(s.label for s in samples)
            empty = [self.class_ids[c] for c in range(n) if counts[c] == 0]
            if split == "train" and empty:
                raise DataError(f"dataset {self.name!r}: class(es) {empty} have no images in the 'train' split. "
                                "Remove them from the class list or add images.")

    # -- access -----------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DataError(f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}."
                            + did_you_mean(name, self.splits))
        return self.splits[name]

    def has_split(self, name: str) -> bool:
        return name in self.splits

    def samples(self, ids: Sequence[str]) -> list[Sample]:
        index = self._index()
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(f"dataset {self.name!r}: {len(missing)} sample id(s) not found, e.g. {missing[:3]}. "
                            "The split file was probably made from another version of this dataset; "
                            "delete it to resample.")
        return [index[i] for i in ids]

    def _index(self) -> dict[str, Sample]:
        if getattr(self, "_index_cache", None) is None:
            self._index_cache = {s.id: s for ss in self.splits.values() for s in ss}
        return self._index_cache

    def load_image(self, sample: Sample) -> Image.Image:
        return self.reader(sample.ref)

    def counts(self) -> "Any":
        """Images per class and split, as a pandas table."""
        import pandas as pd

        rows = {split: Counter(s.label for s in ss) for split, ss in self.splits.items()}
        table = pd.DataFrame({split: [c[i] for i in range(self.n_classes)] for split, c in rows.items()},
                             index=pd.Index(self.class_names, name="class"))
        return table

    def fingerprint(self) -> str:
        """Hash of everything that identifies the samples: name, classes, split membership, labels."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.class_ids, self.class_names], ensure_ascii=False).encode())
        for split in sorted(self.splits):
            h.update(split.encode())
            for s in self.splits[split]:
                h.update(f"{s.id}\x00{s.label}\x01".encode())
        return h.hexdigest()[:20]

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        layout = f", {self.source['layout']} layout" if self.source.get("layout") else ""
        unlabelled = sum(1 for s in self.skipped if s.get("kind") == "label")
        unreadable = len(self.skipped) - unlabelled
        extra = f"; {unreadable} unreadable file(s) skipped" if unreadable else ""
        extra += f"; {unlabelled} row(s) without a label skipped" if unlabelled else ""
        return f"{self.name}: {self.n_classes} classes, {sizes}{layout}{extra}"

    def __repr__(self) -> str:
        return f"Dataset({self.describe()})"


def validate_class_names(class_ids: Sequence[str], class_names: Sequence[str], where: str) -> None:
    if len(class_ids) == 0:
        raise DataError(f"{where}: no classes found.")
    if len(class_ids) != len(class_names):
        raise DataError(f"{where}: {len(class_ids)} class ids but {len(class_names)} readable names; "
                        "give one readable name per class id.")
    for kind, values in (("class id", class_ids), ("readable class name", class_names)):
        dup = [v for v, c in Counter(values).items() if c > 1]
        if dup:
            raise DataError(f"{where}: duplicate {kind}(s) {dup}. Each class needs a distinct {kind}, "
                            "otherwise prompts and labels become ambiguous.")
        blank = [i for i, v in enumerate(values) if not str(v).strip()]
        if blank:
            raise DataError(f"{where}: empty {kind} at position(s) {blank}.")


def require_two_classes(class_ids: Sequence[str], where: str) -> None:
    """Refuse a one-class dataset: every prediction would be right (accuracy 1.000) and mean nothing."""
    if len(class_ids) < 2:
        raise DataError(f"{where}: only one class ({list(class_ids)}) was found; classification needs at least two. "
                        "Check the folder layout / label column (with layout='auto' a folder whose top folders "
                        "are train/val/test is read as splits; pass layout='classes' or 'splits' to decide).")


def readable_name(class_id: str) -> str:
    """Default readable name: ``Sea_Lake`` → ``sea lake``. Use a mapping for anything smarter."""
    return " ".join(str(class_id).replace("_", " ").replace("-", " ").split()).lower()


def resolve_class_names(class_ids: Sequence[str], class_names, where: str) -> list[str]:
    """Readable names from ``None`` (derived), a list (in class-id order) or a mapping id → name."""
    if class_names is None:
        return [readable_name(c) for c in class_ids]
    if isinstance(class_names, dict):
        mapping = {str(k): str(v) for k, v in class_names.items()}
        unknown = sorted(set(mapping) - set(map(str, class_ids)))
        if unknown:
            raise DataError(f"{where}: class_names maps id(s) {unknown} that are not classes of the data "
                            f"(classes: {list(class_ids)})." + did_you_mean(unknown[0], class_ids))
        return [mapping.get(str(c), readable_name(c)) for c in class_ids]
    names = [str(n) for n in class_names]
    if len(names) != len(class_ids):
        raise DataError(f"{where}: {len(names)} class names given for {len(class_ids)} classes {list(class_ids)}.")
    return names


def finish_splits(name: str, splits: dict, test_fraction: float, split_seed: int, notes: list[str], *,
                  holdout=None, how: str = "per class") -> dict:
    """Refuse a source without training images; without a test split, hold ``test_fraction`` of the
    training images out as ``test`` (``holdout``: :func:`stratified_holdout` by default; multi-label
    sets pass a plain random one) and say so in ``notes``."""
    if not splits.get("train"):
        raise DataError(f"dataset {name!r}: no 'train' split with images (splits found: {sorted(splits)}).")
    if "test" not in splits:
        rest, held = (holdout or stratified_holdout)(splits["train"], test_fraction, split_seed)
        splits = dict(splits, train=rest, test=held)
        notes.append(f"no test split in the source: held out {len(held)} images "
                     f"({test_fraction:.0%} {how}, split_seed={split_seed}) as 'test'")
    return splits


def stratified_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split samples per class into (rest, held_out) with ``fraction`` of each class held out.

    Deterministic for a seed, and independent of the few-shot seed, so every run of a
    dataset is tested on the same images.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {fraction}.")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rest, held = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: s.id)
        random.Random(f"holdout-{seed}-{label}").shuffle(group)
        n_held = int(round(len(group) * fraction))
        n_held = min(max(n_held, 1), len(group) - 1) if len(group) > 1 else 0
        held.extend(group[:n_held])
        rest.extend(group[n_held:])
    key = lambda s: s.id  # noqa: E731 - keep splits in a stable order
    return sorted(rest, key=key), sorted(held, key=key)


def check_bad_fraction(name: str, n_total: int, skipped: list[dict], max_bad_fraction: float) -> None:
    if n_total and len(skipped) / n_total > max_bad_fraction:
        examples = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(f"dataset {name!r}: {len(skipped)} of {n_total} images are unreadable "
                        f"(more than max_bad_fraction={max_bad_fraction}). Examples: {examples}. "
                        "Fix or remove the files, or raise max_bad_fraction to skip them.")


def probe_image(path, max_image_pixels: int | None = None) -> str | None:
    """Return None if the file decodes, else the reason it does not (JPEGs checked at 1/8 scale)."""
    try:
        check_decodes(path, max_image_pixels)
        return None
    except UnreadableImage as err:
        return str(err)


def labels_of(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


class ArrayReader(Reader):
    """Reads image ``i`` of split ``s`` from in-memory arrays (picklable for DataLoader workers)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)

    def __call__(self, ref):
        split, i = ref
        return array_to_image(self.arrays[split][i])
