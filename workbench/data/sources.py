"""Dataset sources: image folders, CSV manifests, arrays / MedMNIST ``.npz``, Hugging Face Hub.

Every function returns a :class:`~workbench.data.dataset.Dataset` with splits named
``train`` / ``val`` / ``test``. Where the source has no test split, a stratified hold-out is
carved from the training images with a fixed seed (recorded in ``dataset.notes``), so the
test images are the same for every few-shot seed and every method.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError, did_you_mean
from .dataset import (Dataset, Reader, Sample, check_bad_fraction, probe_image, resolve_class_names,
                      stratified_holdout)
from .images import array_to_image, open_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def _finish_splits(name: str, splits: dict[str, list[Sample]], test_fraction: float, split_seed: int,
                   notes: list[str]) -> dict[str, list[Sample]]:
    if "train" not in splits:
        raise DataError(f"dataset {name!r}: no 'train' split (splits found: {sorted(splits)}).")
    if "test" not in splits:
        rest, held = stratified_holdout(splits["train"], test_fraction, split_seed)
        splits = dict(splits, train=rest, test=held)
        notes.append(f"no test split in the source: held out {len(held)} images "
                     f"({test_fraction:.0%} per class, split_seed={split_seed}) as 'test'")
    return splits


# -- image folders ----------------------------------------------------------------------------

def from_folder(root, *, name: str | None = None, class_names=None, test_fraction: float = 0.3,
                split_seed: int = 0, check_images: bool = True, max_bad_fraction: float = 0.05,
                extensions: Sequence[str] = IMAGE_EXTENSIONS, **meta) -> Dataset:
    """Images in ``root/<class>/*.jpg``, or ``root/{train,val,test}/<class>/*.jpg``.

    ``class_names`` maps folder names to readable names (dict) or lists them in sorted-folder
    order. Unreadable images are skipped and recorded in ``dataset.skipped``; more than
    ``max_bad_fraction`` of them is an error.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory.")
    name = name or root.name
    split_dirs = {s: root / alias for s, aliases in (("train", ("train", "training", "Training")),
                                                     ("val", ("val", "valid", "validation")),
                                                     ("test", ("test", "testing", "Testing")))
                  for alias in aliases if (root / alias).is_dir()}
    layout = split_dirs if "train" in split_dirs else {"train": root}
    class_ids = sorted({p.name for d in layout.values() for p in d.iterdir()
                        if p.is_dir() and not p.name.startswith(".")})
    if not class_ids:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders; expected root/<class>/<image> "
                        "(or root/train/<class>/<image>).")
    readable = resolve_class_names(class_ids, class_names, where=f"image folder {str(root)!r}")
    exts = {e.lower() for e in extensions}
    splits: dict[str, list[Sample]] = {}
    skipped: list[dict] = []
    ignored = 0
    total = 0
    for split, d in layout.items():
        samples = []
        for label, cid in enumerate(class_ids):
            cdir = d / cid
            if not cdir.is_dir():
                continue
            files = sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith("."))
            for p in files:
                if p.suffix.lower() not in exts:
                    ignored += 1
                    continue
                total += 1
                rel = p.relative_to(root).as_posix()
                if check_images:
                    reason = probe_image(p)
                    if reason:
                        skipped.append({"id": rel, "reason": reason})
                        continue
                samples.append(Sample(rel, label, str(p)))
        splits[split] = samples
    for label, cid in enumerate(class_ids):
        if not any(s.label == label for s in splits["train"]):
            raise DataError(f"image folder {str(root)!r}: class folder {cid!r} has no readable images in the "
                            "training split. Add images or delete the empty folder.")
    check_bad_fraction(name, total, skipped, max_bad_fraction)
    notes = []
    if ignored:
        notes.append(f"ignored {ignored} file(s) whose extension is not an image extension {sorted(exts)}")
    if skipped:
        warnings.warn(f"dataset {name!r}: skipped {len(skipped)} unreadable image(s), e.g. "
                      f"{skipped[0]['id']} ({skipped[0]['reason']}); see dataset.skipped.", stacklevel=2)
    splits = _finish_splits(name, splits, test_fraction, split_seed, notes)
    return Dataset(name=name, class_ids=class_ids, class_names=readable, splits=splits, reader=Reader(),
                   source={"kind": "folder", "root": str(root), "test_fraction": test_fraction,
                           "split_seed": split_seed}, skipped=skipped, notes=notes, **meta)


# -- CSV manifests ----------------------------------------------------------------------------

def from_csv(path, *, name: str | None = None, path_column: str = "path", label_column: str = "label",
             split_column: str | None = None, root=None, classes: Sequence[str] | None = None,
             class_names=None, test_fraction: float = 0.3, split_seed: int = 0, check_images: bool = True,
             max_bad_fraction: float = 0.05, **meta) -> Dataset:
    """A CSV manifest with one row per image: ``path,label[,split]``.

    Relative paths are resolved against ``root`` (default: the CSV's folder). ``classes``
    fixes the class list and order; a label outside it is an error naming the row.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV manifest {str(path)!r} does not exist.")
    root = Path(root).expanduser() if root else path.parent
    name = name or path.stem
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for col, what in ((path_column, "path_column"), (label_column, "label_column"),
                          (split_column, "split_column")):
            if col is not None and col not in columns:
                raise DataError(f"CSV {str(path)!r} has no column {col!r} (set by {what}); its columns are "
                                f"{columns}." + did_you_mean(col, columns))
        rows = list(reader)
    if not rows:
        raise DataError(f"CSV {str(path)!r} has no rows.")
    labels = [str(r[label_column]).strip() for r in rows]
    if classes is None:
        class_ids = sorted(set(labels))
    else:
        class_ids = [str(c) for c in classes]
        unknown = sorted(set(labels) - set(class_ids))
        if unknown:
            first = next(i for i, lab in enumerate(labels) if lab in unknown)
            raise DataError(f"CSV {str(path)!r}: label {unknown[0]!r} (row {first + 2}) is not in the class list "
                            f"{class_ids}; {len(unknown)} unknown label(s): {unknown[:5]}. Add them to `classes` "
                            "or fix the rows." + did_you_mean(unknown[0], class_ids))
    readable = resolve_class_names(class_ids, class_names, where=f"CSV {str(path)!r}")
    index = {c: i for i, c in enumerate(class_ids)}
    split_alias = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                   "test": "test", "testing": "test"}
    splits: dict[str, list[Sample]] = {}
    skipped: list[dict] = []
    for i, (row, lab) in enumerate(zip(rows, labels)):
        raw = str(row[path_column]).strip()
        file = Path(raw) if Path(raw).is_absolute() else root / raw
        split = "train"
        if split_column:
            value = str(row[split_column]).strip().lower()
            if value not in split_alias:
                raise DataError(f"CSV {str(path)!r} row {i + 2}: split {row[split_column]!r} is not one of "
                                f"train/val/test (also accepted: {sorted(split_alias)}).")
            split = split_alias[value]
        reason = probe_image(file) if check_images else (None if file.is_file() else f"file not found: {file}")
        if reason:
            skipped.append({"id": raw, "reason": reason})
            continue
        splits.setdefault(split, []).append(Sample(raw, index[lab], str(file)))
    check_bad_fraction(name, len(rows), skipped, max_bad_fraction)
    if skipped:
        warnings.warn(f"dataset {name!r}: skipped {len(skipped)} unreadable or missing image(s), e.g. "
                      f"{skipped[0]['id']} ({skipped[0]['reason']}); see dataset.skipped.", stacklevel=2)
    notes: list[str] = []
    splits = _finish_splits(name, splits, test_fraction, split_seed, notes)
    return Dataset(name=name, class_ids=class_ids, class_names=readable, splits=splits, reader=Reader(),
                   source={"kind": "csv", "path": str(path), "root": str(root)}, skipped=skipped, notes=notes,
                   **meta)


# -- in-memory arrays (MedMNIST .npz) ---------------------------------------------------------

class ArrayReader(Reader):
    """Reads image ``i`` of split ``s`` from in-memory arrays (picklable for DataLoader workers)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)

    def __call__(self, ref):
        split, i = ref
        return array_to_image(self.arrays[split][i])


def from_arrays(images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], *, name: str,
                class_names: Sequence[str], class_ids: Sequence[str] | None = None, test_fraction: float = 0.3,
                split_seed: int = 0, **meta) -> Dataset:
    """Images as arrays per split (``{"train": (N,H,W[,C]) uint8, ...}``) with integer labels."""
    class_ids = [str(c) for c in (class_ids if class_ids is not None else range(len(class_names)))]
    splits: dict[str, list[Sample]] = {}
    arrays: dict[str, np.ndarray] = {}
    for split, arr in images.items():
        if split not in labels:
            raise DataError(f"dataset {name!r}: images for split {split!r} but no labels.")
        arr = np.asarray(arr)
        lab = np.asarray(labels[split])
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1:
            raise DataError(f"dataset {name!r}, split {split!r}: labels have shape {lab.shape}; only single-label "
                            "classification (one integer per image) is supported yet.")
        if len(lab) != len(arr):
            raise DataError(f"dataset {name!r}, split {split!r}: {len(arr)} images but {len(lab)} labels.")
        bad = np.flatnonzero((lab < 0) | (lab >= len(class_names)))
        if bad.size:
            raise DataError(f"dataset {name!r}, split {split!r}: label {int(lab[bad[0]])} at index {int(bad[0])} is "
                            f"not a class index 0..{len(class_names) - 1}; {bad.size} such label(s). Check the "
                            "class_names list.")
        arrays[split] = arr
        splits[split] = [Sample(f"{split}/{i}", int(lab[i]), (split, i)) for i in range(len(arr))]
    notes: list[str] = []
    splits = _finish_splits(name, splits, test_fraction, split_seed, notes)
    return Dataset(name=name, class_ids=class_ids, class_names=list(class_names), splits=splits,
                   reader=ArrayReader(arrays), source=meta.pop("source", {"kind": "arrays"}), notes=notes, **meta)


def from_npz(path, *, class_names: Sequence[str], name: str | None = None, class_ids=None, **meta) -> Dataset:
    """A MedMNIST-style ``.npz`` with keys ``{train,val,test}_images`` and ``{...}_labels``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist. MedMNIST files can be downloaded from "
                        "medmnist.com (Zenodo) or with the `medmnist` package.")
    with np.load(path) as z:
        keys = list(z.keys())
        images = {s: z[f"{s}_images"] for s in ("train", "val", "test") if f"{s}_images" in z}
        labels = {s: z[f"{s}_labels"] for s in ("train", "val", "test") if f"{s}_labels" in z}
    if "train" not in images:
        raise DataError(f"npz {str(path)!r} has no 'train_images' key; keys are {keys}. Expected MedMNIST keys "
                        "train_images/train_labels, val_*, test_*.")
    return from_arrays(images, labels, name=name or path.stem, class_names=class_names, class_ids=class_ids,
                       source={"kind": "npz", "path": str(path)}, **meta)


# -- Hugging Face Hub -------------------------------------------------------------------------

class HubReader(Reader):
    """Reads row ``i`` of a split from Arrow-backed ``datasets`` tables (memory-mapped, picklable)."""

    def __init__(self, tables: Mapping[str, Any], image_column: str):
        self.tables = dict(tables)
        self.image_column = image_column

    def __call__(self, ref):
        split, i = ref
        return open_rgb(self.tables[split][int(i)][self.image_column])


def from_hub(repo_id: str, *, image_column: str = "image", label_column: str | Sequence[str] = "label",
             splits: Mapping[str, str] | None = None, name: str | None = None, config: str | None = None,
             data_files=None, revision: str | None = None, class_names=None, classes: Sequence[str] | None = None,
             test_fraction: float = 0.3, split_seed: int = 0, cache_dir=None, **meta) -> Dataset:
    """A Hub dataset (parquet or image-folder repo) through ``datasets.load_dataset``.

    ``repo_id`` may also be a local folder with the same layout (parquet files or an image
    folder). ``label_column`` may be a list of columns whose values are joined with ``/`` into
    the class id (LC25000 on the Hub: ``[organ, label]`` → ``lung/adenocarcinomas``). ``splits`` maps our split names to the repo's, e.g.
    ``{"train": "train", "val": "validation", "test": "test"}``. Loading scripts are not
    supported by ``datasets`` >= 4; pick a parquet repo instead.
    """
    import datasets as hfds

    explicit = splits is not None
    splits = dict(splits or {"train": "train", "val": "validation", "test": "test"})
    try:
        dd = hfds.load_dataset(repo_id, config, data_files=data_files, revision=revision, cache_dir=cache_dir)
    except Exception as err:  # network, missing repo, script-based repo: say which and what to do
        msg = str(err).splitlines()[0][:300]
        hint = ("This repository uses a loading script, which `datasets` >= 4 cannot run; use a parquet or "
                "image-folder copy." if "script" in msg.lower() else
                "Check the id, your network (offline mode: HF_DATASETS_OFFLINE), or pass a local folder.")
        raise DataError(f"could not load Hub dataset {repo_id!r}: {type(err).__name__}: {msg}. {hint}") from None
    available = list(dd.keys())
    wanted = {ours: theirs for ours, theirs in splits.items() if theirs is not None}
    # Only 'train' is required. With the default mapping a missing 'validation'/'test' falls back to
    # the K-shot val drawn from train / a stratified hold-out; a split the user named must exist.
    tables = {}
    for ours, theirs in wanted.items():
        if theirs in dd:
            tables[ours] = dd[theirs]
        elif ours == "train" or explicit:
            raise DataError(f"Hub dataset {repo_id!r} has no split {theirs!r} (asked for as {ours!r}); it has "
                            f"{available}." + did_you_mean(theirs, available))
    first = next(iter(tables.values()))
    columns = list(first.column_names)
    label_columns = [label_column] if isinstance(label_column, str) else list(label_column)
    for col, what in [(image_column, "image_column")] + [(c, "label_column") for c in label_columns]:
        if col not in columns:
            raise DataError(f"Hub dataset {repo_id!r} has no column {col!r} (set by {what}); columns are "
                            f"{columns}." + did_you_mean(col, columns))
    if len(label_columns) > 1:
        def joined(table):
            parts = []
            for c in label_columns:
                feat, values = table.features[c], table[c]
                parts.append([feat.int2str(v) if isinstance(feat, hfds.ClassLabel) else str(v) for v in values])
            return ["/".join(p) for p in zip(*parts)]

        label_column = "__label__"
        tables = {k: t.add_column(label_column, joined(t)) for k, t in tables.items()}
        first = next(iter(tables.values()))
    feature = first.features[label_column]
    if isinstance(feature, hfds.ClassLabel):
        class_ids = list(feature.names)
        to_index = None
    else:
        values = sorted({str(v) for t in tables.values() for v in t[label_column]})
        class_ids = [str(c) for c in classes] if classes is not None else values
        unknown = sorted(set(values) - set(class_ids))
        if unknown:
            raise DataError(f"Hub dataset {repo_id!r}: label(s) {unknown[:5]} are not in the class list {class_ids}.")
        to_index = {c: i for i, c in enumerate(class_ids)}
    readable = resolve_class_names(class_ids, class_names, where=f"Hub dataset {repo_id!r}")
    # Keep images undecoded: the reader decodes one row at a time, in the encoding workers.
    if isinstance(first.features[image_column], hfds.Image):
        tables = {k: t.cast_column(image_column, hfds.Image(decode=False)) for k, t in tables.items()}
    samples: dict[str, list[Sample]] = {}
    for split, table in tables.items():
        raw = table[label_column]
        labs = [int(v) for v in raw] if to_index is None else [to_index[str(v)] for v in raw]
        samples[split] = [Sample(f"{split}/{i}", lab, (split, i)) for i, lab in enumerate(labs)]
    notes: list[str] = []
    samples = _finish_splits(name or repo_id, samples, test_fraction, split_seed, notes)
    return Dataset(name=name or repo_id.rstrip("/").split("/")[-1], class_ids=class_ids, class_names=readable,
                   splits=samples, reader=HubReader(tables, image_column),
                   source={"kind": "hub", "repo_id": repo_id, "config": config, "revision": revision,
                           "splits": splits, "image_column": image_column, "label_column": label_column},
                   notes=notes, **meta)


# -- an image-folder archive in a Hub dataset repo (BiomedCoOp: one zip per dataset) ----------

def _fetch_archive(repo_id: str, filename: str, cache_dir) -> Path:
    local = Path(repo_id).expanduser()
    if local.is_dir():  # a local copy of the repository
        path = local / filename
        if not path.is_file():
            raise DataError(f"{filename!r} not found in local folder {str(local)!r}.")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=cache_dir))
    except Exception as err:
        raise DataError(f"could not download {filename!r} from Hub dataset {repo_id!r}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}. Offline? Download it elsewhere and pass the folder "
                        "holding it as repo_id.") from None


def from_hub_archive(repo_id: str, filename: str, *, subdir: str = "", name: str | None = None,
                     cache_dir=None, **folder_kwargs) -> Dataset:
    """A zip of class folders stored in a Hub dataset repo, downloaded once, extracted once, read as a folder.

    BiomedCoOp ships each benchmark as ``<NAME>.zip`` holding ``<NAME>/<NAME>/<class>/*.jpg``
    in ``TahaKoleilat/BiomedCoOp``; loading the whole repo with ``datasets`` would merge all of
    them into one label space. Extraction goes to a temporary folder renamed into place, so an
    interrupted extraction is never mistaken for a complete one.
    """
    import hashlib
    import os
    import shutil
    import tempfile
    import zipfile

    archive = _fetch_archive(repo_id, filename, cache_dir)
    digest = hashlib.sha256(f"{archive.resolve()}:{archive.stat().st_size}:{archive.stat().st_mtime_ns}".encode())
    base = Path(cache_dir or Path.home() / ".cache" / "workbench") / "extracted"
    target = base / f"{Path(filename).stem}-{digest.hexdigest()[:12]}"
    if not target.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=base))
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            os.replace(tmp, target)
        except zipfile.BadZipFile:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{str(archive)!r} is not a valid zip file (truncated download?); delete it and retry.") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    root = target / subdir
    if not root.is_dir():
        found = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_dir())[:8]
        raise DataError(f"archive {filename!r} has no folder {subdir!r}; its folders include {found}. Set "
                        "source.subdir to the folder that holds the class folders.")
    ds = from_folder(root, name=name or Path(filename).stem, **folder_kwargs)
    ds.source = {"kind": "hub_archive", "repo_id": repo_id, "filename": filename, "subdir": subdir,
                 "extracted": str(root), **{k: v for k, v in ds.source.items() if k in ("test_fraction", "split_seed")}}
    return ds


def load_user_data(folder: str | None = None, csv: str | None = None, **kwargs) -> Dataset:
    """Your own images: an image folder (``root/<class>/*.jpg``) or a CSV manifest; exactly one of them.

    Relative paths are taken from the repository root. Extra keyword arguments go to
    :func:`from_folder` / :func:`from_csv` (``class_names``, ``path_column``, ``test_fraction``...).
    """
    from ..paths import resolve

    if bool(folder) == bool(csv):
        raise DataError("give either an image folder or a CSV manifest (exactly one of them).")
    if folder:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("path_column", "label_column")}
        return from_folder(resolve(folder), **kwargs)
    return from_csv(resolve(csv), **kwargs)
