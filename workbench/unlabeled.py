"""Images nobody labelled, as part of a task: where they come from and what a method may see of them.

``run_experiment(..., unlabeled=...)`` and ``compare(..., unlabeled=...)`` take:

* ``"test"`` — the transductive setting: the test images themselves are the pool. Nothing is given to
  the method at fit time; a transductive method (TransCLIP, TDA) uses the batch it is asked to
  predict. Refused under ``protocol="paper"`` (the papers' few-shot protocol is inductive). A method
  that uses unlabeled images and is given none falls back to it, with a warning (so a comparison or
  a recommendation over every method still runs, and its rows say ``transductive=True``).
* a split name of the dataset (``"train"``, ``"val"``, ``"unlabeled"`` ...) — its images, without labels;
* a folder (every image file under it, any depth, any class layout), a CSV manifest (a ``path``
  column, paths relative to the CSV's folder and never outside it) or a MedMNIST-style ``.npz``
  (``images`` or ``train_images`` / ``val_images`` / ``test_images`` arrays; loaded without pickle).

The pool's images are encoded once through the feature cache (the same keys as any other request,
so a sweep or ``compare`` encodes them once), and a method only ever gets their L2-normalised
features: the labels a split carries are replaced by ``-1`` before anything is encoded, so no code
path can read them. Pool images that are also support or K-shot validation images of the run
(identical features) are removed with a warning naming the count: their labels would otherwise leak
into the "unlabeled" statistics. An empty pool is an error.

Every result row says what the method saw: ``unlabeled_source`` (``""`` for none, ``"test"``,
``"split:train"``, ``"folder:<path>"``, ...) and ``transductive`` (the prediction for a test image
depended on other test images: TransCLIP on ``"test"``, TDA's stream).
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.dataset import Dataset, Reader, Sample
from .errors import ConfigError, DataError

#: the result-row columns this module fills: where the method's unlabeled images came from ("" for none) and
#: whether its prediction for a test image depended on other test images
UNLABELED_COLUMNS = ["unlabeled_source", "transductive"]

#: what the ``unlabeled`` argument may be, for error messages
ACCEPTED = ("'test' (transductive)", "a split name of the dataset", "an image folder", "a .csv manifest",
            "an .npz file")


@dataclass
class UnlabeledPool:
    """The pool of one run: where it came from, and (unless it is the test split) its features."""

    source: str
    #: L2-normalised features [N, D]; None when the pool is the test split (handed over at predict time)
    x: torch.Tensor | None = None
    removed_overlap: int = 0
    skipped: list = field(default_factory=list)

    @property
    def is_test(self) -> bool:
        return self.source == "test"

    def __len__(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])

    def describe(self) -> dict:
        return {"source": self.source, "images": None if self.x is None else len(self),
                "removed_overlap": self.removed_overlap, "skipped": len(self.skipped)}


class _PoolView:
    """The pool's images as the feature cache sees a dataset: name, fingerprint, reader, samples."""

    def __init__(self, name: str, fingerprint: str, reader, samples: list[Sample]):
        self.name, self._fingerprint, self.reader = name, fingerprint, reader
        self._samples = {s.id: s for s in samples}
        self.class_names: list[str] = []

    def fingerprint(self) -> str:
        return self._fingerprint

    def samples(self, ids):
        return [self._samples[i] for i in ids]

    def load_image(self, sample: Sample):
        return self.reader(sample.ref)


def _unlabelled(samples) -> list[Sample]:
    """The samples with their labels replaced by -1: what is encoded never carries a label."""
    return [Sample(s.id, -1, s.ref) for s in samples]


class _ArrayPoolReader(Reader):
    """Image ``i`` of an ``.npz`` pool; ``arrays`` (not one array) so the cache keys hash the content."""

    def __init__(self, array: np.ndarray):
        self.arrays = {"images": array}

    def __call__(self, ref):
        from .data.images import array_to_image

        return array_to_image(self.arrays["images"][ref])


def _folder_samples(root: Path) -> list[Sample]:
    from .data.sources import IMAGE_EXTENSIONS

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [Sample(p.relative_to(root).as_posix(), -1, str(p)) for p in files]


def _csv_samples(path: Path, path_column: str = "path") -> list[Sample]:
    root = path.parent.resolve()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or path_column not in reader.fieldnames:
            raise DataError(f"unlabeled CSV {str(path)!r} has no {path_column!r} column (columns: "
                            f"{reader.fieldnames}); it needs one path per row, relative to the CSV's folder.")
        samples = []
        for n, row in enumerate(reader, start=2):
            rel = (row.get(path_column) or "").strip()
            if not rel:
                continue
            full = (root / rel).resolve()
            if root not in full.parents and full != root:
                raise DataError(f"unlabeled CSV {str(path)!r}, line {n}: path {rel!r} leads outside the CSV's "
                                "folder; paths must be relative to it (absolute paths and '..' are refused).")
            samples.append(Sample(rel, -1, str(full)))
    return samples


def _npz_images(path: Path) -> np.ndarray:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if "images" in z:
                return z["images"]
            parts = [z[f"{s}_images"] for s in ("train", "val", "test") if f"{s}_images" in z]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise DataError(f"unlabeled npz {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}); "
                        "the file is truncated or corrupt.") from None
    if not parts:
        raise DataError(f"unlabeled npz {str(path)!r} has no 'images' (or train_/val_/test_images) array; keys: "
                        f"{keys}.")
    return np.concatenate(parts)


def _file_pool(value) -> tuple[str, _PoolView]:
    """(source, view) of a folder / CSV / npz pool."""
    import hashlib

    from .paths import find_existing

    found = find_existing(str(value))
    if found is None:
        raise DataError(f"unlabeled={str(value)!r} is neither a split of the dataset nor an existing path; it may "
                        f"be {', '.join(ACCEPTED)}.")
    found = Path(found)
    if found.is_dir():
        kind, samples, reader = "folder", _folder_samples(found), Reader()
    elif found.suffix.lower() == ".csv":
        kind, samples, reader = "csv", _csv_samples(found), Reader()
    elif found.suffix.lower() == ".npz":
        images = _npz_images(found)
        kind, reader = "npz", _ArrayPoolReader(images)
        samples = [Sample(f"{i}", -1, i) for i in range(len(images))]
    else:
        raise DataError(f"unlabeled={str(value)!r}: {found.suffix or 'no suffix'} is not a pool format; it may be "
                        f"{', '.join(ACCEPTED)}.")
    source = f"{kind}:{found}"
    fingerprint = hashlib.sha256(f"unlabeled\x00{source}\x00{len(samples)}".encode()).hexdigest()[:20]
    return source, _PoolView(f"unlabeled:{found.name}", fingerprint, reader, samples)


def check_unlabeled(unlabeled, protocol: str = "default", where: str = "run_experiment", method=None) -> None:
    """Refuse a bad ``unlabeled=`` before any work: a type error, ``"test"`` under the inductive paper protocol
    (also when a method that uses unlabeled images would fall back to it), TDA with a pool that is not the test
    stream."""
    uses = getattr(method, "uses_unlabeled", None)
    name = getattr(method, "name", "")
    if uses and unlabeled is None:
        unlabeled = "test"   # what such a method uses by default (see default_unlabeled)
    if uses == "stream" and unlabeled is not None and str(unlabeled) != "test":
        raise ConfigError(f"{where}: method {name!r} adapts on the stream of test images it predicts; it takes "
                          f"unlabeled='test', not {str(unlabeled)!r}.")
    if unlabeled is None:
        return
    if not isinstance(unlabeled, (str, Path)):
        raise ConfigError(f"{where}: unlabeled must be a string or path ({', '.join(ACCEPTED)}), got "
                          f"{type(unlabeled).__name__}.")
    if str(unlabeled) == "":
        raise ConfigError(f"{where}: unlabeled is empty; pass None for no pool, or {', '.join(ACCEPTED)}.")
    if str(unlabeled) == "test" and protocol == "paper":
        who = f"method {name!r} uses images nobody labelled; " if uses else ""
        raise ConfigError(f"{where}: {who}unlabeled='test' (transductive: the test images are the pool) cannot run under "
                          "protocol='paper': the papers' few-shot protocol is inductive. Use protocol='default', or "
                          "an unlabeled pool that is not the test split.")


def default_unlabeled(unlabeled, method, where: str = "run_experiment"):
    """``unlabeled`` for ``method`` (class or instance): a method that uses unlabeled images and was given none
    runs in the transductive setting (``"test"``), with a warning; the row says ``transductive=True``."""
    if unlabeled is None and getattr(method, "uses_unlabeled", None):
        warnings.warn(f"{where}: method {getattr(method, 'name', '')!r} uses images nobody labelled and none were "
                      "given (unlabeled=None): it runs transductively on the test images, as with unlabeled='test', "
                      "and its rows say transductive=True. Pass unlabeled= ('test', a split name, a folder, CSV or "
                      ".npz) to choose.", stacklevel=3)
        return "test"
    return unlabeled


def resolve_unlabeled(unlabeled, dataset: Dataset, split, cache, protocol: str = "default") -> UnlabeledPool | None:
    """The pool of one run, encoded through ``cache``; its labels are never read (see the module docstring)."""
    check_unlabeled(unlabeled, protocol)
    if unlabeled is None:
        return None
    name = str(unlabeled)
    if name == "test":
        return UnlabeledPool("test")
    if isinstance(unlabeled, str) and dataset.has_split(name):
        source = f"split:{name}"
        view = _PoolView(dataset.name, dataset.fingerprint(), dataset.reader, _unlabelled(dataset.split(name)))
    else:
        source, view = _file_pool(unlabeled)
    samples = list(view._samples.values())
    if not samples:
        raise DataError(f"unlabeled pool {source!r} is empty: it holds no image. Point unlabeled= at a folder, CSV, "
                        "npz or split with images, or pass None.")
    feats = cache.get(view, samples, desc=f"unlabeled pool ({len(samples)})")
    x = feats.x.float()
    if x.shape[0] == 0:
        raise DataError(f"unlabeled pool {source!r}: none of its {len(samples)} image(s) could be read "
                        f"(e.g. {feats.skipped[:1]}).")
    # images that are also support / K-shot validation images of this run: same image, same features
    seen = [s for s in split.train(dataset) + split.val(dataset)]
    labelled = cache.get(dataset, seen, desc="support + validation").x.float() if seen else None
    removed = 0
    if labelled is not None and len(labelled):
        sims = x @ labelled.T
        dup = (sims > 1 - 1e-5).any(1)
        removed = int(dup.sum())
        if removed:
            warnings.warn(f"unlabeled pool {source!r}: {removed} of its {len(x)} image(s) are also support or "
                          "validation images of this run; removed from the pool (their labels would leak into the "
                          "unlabeled statistics).", stacklevel=3)
            x = x[~dup]
    if x.shape[0] == 0:
        raise DataError(f"unlabeled pool {source!r} is empty once the {removed} image(s) that are also support or "
                        "validation images are removed. Use images the run does not label.")
    return UnlabeledPool(source, x, removed, list(feats.skipped))


def method_unlabeled_source(method, pool: UnlabeledPool | None) -> dict:
    """The row's ``unlabeled_source`` and ``transductive`` for a fitted ``method``: what it actually used."""
    uses = getattr(method, "uses_unlabeled", None)
    if not uses:
        return {"unlabeled_source": "", "transductive": False}
    if uses == "stream":
        return {"unlabeled_source": "test (stream)", "transductive": True}
    return {"unlabeled_source": pool.source if pool is not None else "test",
            "transductive": bool(getattr(method, "transductive", False))}


# Transductive rows in tables: marked so that summaries, rankings and plots never mix them silently.
#: appended to the method name of transductive rows (``transductive`` column) in summaries, rankings and
#: plot legends, so they are never mixed with inductive rows without saying so
TRANSDUCTIVE_MARK = " [transductive]"


def mark_transductive(table: pd.DataFrame) -> pd.DataFrame:
    """The table with ``method`` suffixed by :data:`TRANSDUCTIVE_MARK` on transductive rows (a copy; the table
    itself when there is nothing to mark): such a method used the test images it is scored on, so it is its own
    group."""
    if "transductive" not in table.columns:
        return table
    flag = _transductive_flag(table) & ~table["method"].astype(str).str.endswith(TRANSDUCTIVE_MARK)    # marked once
    if not flag.any():
        return table
    table = table.copy()
    table.loc[flag, "method"] = table.loc[flag, "method"].astype(str) + TRANSDUCTIVE_MARK
    return table


def _transductive_flag(table: pd.DataFrame) -> pd.Series:
    """The ``transductive`` column as booleans (a CSV read back may hold "True" strings; old rows NaN)."""
    return table["transductive"].fillna(False).astype(str).str.lower().isin(["true", "1", "1.0"])
