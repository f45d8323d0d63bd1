"""Dataset sources: image folders, CSV manifests, arrays / MedMNIST ``.npz``, Hugging Face Hub.

Every function returns a :class:`~workbench.data.dataset.Dataset` with splits named
``train`` / ``val`` / ``test``. Where the source has no test split, a stratified hold-out is
carved from the training images with a fixed seed (recorded in ``dataset.notes``), so the
test images are the same for every few-shot seed and every method.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError, did_you_mean
from .csvfile import read_csv, require_columns
from .dataset import (ArrayReader, Dataset, Reader, Sample, check_bad_fraction, finish_splits, probe_image,
                      readable_name, resolve_class_names)
from .hub import cache_only, offline_message, offline_reason
from .images import array_to_image, effective_pixel_limit, open_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


# -- checks shared by the file sources ---------------------------------------------------------

SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                      "test": "test", "testing": "test"}   # compared in lower case: "Training" is a split too
LAYOUTS = ("auto", "classes", "splits")


def _refuse_same_file_in_two_splits(splits: dict[str, list[Sample]], where: str) -> None:
    """One file reached under two names (``imgs/x.jpg`` and a symlink or hard link to it) must not sit
    in two splits. Files are identified by device + inode, which sees through both kinds of link.

    Runs after the hold-out is made, so a duplicate that the hold-out separated is caught too.
    """
    owner: dict = {}
    clashes = []
    for split, samples in splits.items():
        for s in samples:
            if not isinstance(s.ref, str):
                continue
            try:
                st = os.stat(s.ref)
                identity = (st.st_dev, st.st_ino)
            except OSError:
                identity = os.path.realpath(s.ref)
            first = owner.setdefault(identity, (split, s.id))
            if first[0] != split:
                pair = sorted([first, (split, s.id)], key=lambda x: x[0] == "test")  # name the test image last
                clashes.append((pair[0], pair[1], os.path.realpath(s.ref)))
    if clashes:
        (s1, id1), (s2, id2), real = clashes[0]
        raise DataError(f"{where}: {len(clashes)} image file(s) are in two splits under different names, e.g. "
                        f"{id1!r} ({s1}) and {id2!r} ({s2}) are the same file {real!r}. A test image must never be a "
                        "training or validation image: remove the duplicate (second spelling, symlink or copy "
                        "listed twice).")


def _check_two_classes(class_ids, where: str) -> None:
    from .dataset import require_two_classes

    require_two_classes(class_ids, where)


# -- image folders ----------------------------------------------------------------------------

def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _decide_layout(root: Path, layout: str) -> tuple[str, dict[str, Path]]:
    """(layout used, split name -> folder holding the class folders)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not one of {LAYOUTS}." + did_you_mean(layout, LAYOUTS))
    tops = _visible_dirs(root)
    if not tops:
        data_files = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".csv", ".npz"))[:3]
        hint = f" It holds {data_files}: pass one of those files instead." if data_files else ""
        raise DataError(f"image folder {str(root)!r} has no sub-folders; expected root/<class>/<image> "
                        f"(or root/train/<class>/<image>).{hint}")
    split_of = {p: SPLIT_FOLDER_NAMES.get(p.name.lower()) for p in tops}
    if layout == "auto":
        # Splits only when every top folder is a split name and the train folder holds (class)
        # folders: a class folder called "test" next to "cat" and "dog" stays a class, and so do
        # classes called "train" and "test" that hold images directly.
        train = [p for p in tops if split_of[p] == "train"]
        all_splits = all(split_of.values()) and len(train) == 1 and bool(_visible_dirs(train[0]))
        if all(split_of.values()) and not train and any(_visible_dirs(p) for p in tops):
            raise DataError(f"image folder {str(root)!r}: the top folders {[p.name for p in tops]} are split names "
                            "but none is 'train'. Add root/train/<class>/..., or pass layout='classes' if they "
                            "are classes.")
        layout = "splits" if all_splits else "classes"
        split_named = [p.name for p in tops if split_of[p]]
        if layout == "classes" and split_named and len(split_named) < len(tops):
            import warnings

            warnings.warn(f"image folder {str(root)!r}: folder(s) {split_named} are named like splits but sit beside "
                          f"class folders, so they are read as classes (layout='classes'). If they hold the "
                          "test/val images, move the class folders into root/train/ (layout='splits'); pass "
                          "layout='classes' to confirm they are classes and silence this.", stacklevel=3)
    if layout == "classes":
        return "classes", {"train": root}
    others = [p.name for p in tops if split_of[p] is None]
    if others:
        raise DataError(f"image folder {str(root)!r}, layout='splits': top folder(s) {others} are not split names "
                        f"({sorted(SPLIT_FOLDER_NAMES)}). Move them, or use layout='classes' if the top folders "
                        "are classes.")
    dirs: dict[str, Path] = {}
    for p in tops:
        if split_of[p] in dirs:
            raise DataError(f"image folder {str(root)!r}: folders {dirs[split_of[p]].name!r} and {p.name!r} both "
                            f"name the {split_of[p]!r} split; keep one.")
        dirs[split_of[p]] = p
    if "train" not in dirs:
        raise DataError(f"image folder {str(root)!r}: the top folders {[p.name for p in tops]} are split names but "
                        "none is 'train'. Add root/train/<class>/..., or pass layout='classes' if they are classes.")
    return "splits", dirs


def from_folder(root, *, name: str | None = None, class_names=None, layout: str = "auto",
                test_fraction: float = 0.3, split_seed: int = 0, check_images: bool = True,
                max_bad_fraction: float = 0.05, max_image_pixels: int | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS, **meta) -> Dataset:
    """Images in ``root/<class>/*.jpg`` (layout ``"classes"``) or ``root/{train,val,test}/<class>/*.jpg``
    (layout ``"splits"``).

    ``layout="auto"`` (default) reads the top folders as splits only when *all* of them are split
    names (train/training, val/valid/validation, test/testing, any case) and hold sub-folders;
    otherwise they are classes, so a class called ``test`` stays a class. ``describe()`` and
    ``source["layout"]`` say which layout was used. ``class_names`` maps folder names to
    readable names (dict) or lists them in sorted-folder order. Unreadable images, and images
    above ``max_image_pixels`` (default: PIL's limit, ~89 Mpx), are skipped and recorded in
    ``dataset.skipped``; more than ``max_bad_fraction`` of them is an error. Sample ids are
    paths relative to ``root``. A single class, or one file reached by two names in two splits,
    is refused.
    """
    effective_pixel_limit(max_image_pixels)  # a bad value is named now, not at encoding time
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory.")
    name = name or root.name
    used_layout, folders = _decide_layout(root, layout)
    class_ids = sorted({p.name for d in folders.values() for p in _visible_dirs(d)})
    if not class_ids:
        raise DataError(f"image folder {str(root)!r} ({used_layout} layout) has no class sub-folders; expected "
                        "root/<class>/<image> (or root/train/<class>/<image>).")
    _check_two_classes(class_ids, f"image folder {str(root)!r} ({used_layout} layout)")
    readable = resolve_class_names(class_ids, class_names, where=f"image folder {str(root)!r}")
    exts = {e.lower() for e in extensions}
    splits: dict[str, list[Sample]] = {}
    skipped: list[dict] = []
    ignored = 0
    total = 0
    for split, d in folders.items():
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
                    reason = probe_image(p, max_image_pixels)
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
    notes: list[str] = []
    manifests = sorted(p.relative_to(root).as_posix() for d in {root, *folders.values()}
                       for p in d.glob("*.csv") if p.is_file())
    if manifests:  # a labels file next to the class folders is not read: say so instead of ignoring it silently
        msg = (f"image folder {str(root)!r}: found CSV file(s) {manifests} but the folder was read by its "
               "class sub-folders; to use a CSV's labels instead, load it with from_csv / "
               "load_dataset('<folder>/<file>.csv')")
        notes.append(msg)
        warnings.warn(f"dataset {name!r}: {msg}.", stacklevel=2)
    if ignored:
        notes.append(f"ignored {ignored} file(s) whose extension is not an image extension {sorted(exts)}")
    if skipped:
        warnings.warn(f"dataset {name!r}: skipped {len(skipped)} unreadable image(s), e.g. "
                      f"{skipped[0]['id']} ({skipped[0]['reason']}); see dataset.skipped.", stacklevel=2)
    splits = finish_splits(name, splits, test_fraction, split_seed, notes)
    _refuse_same_file_in_two_splits(splits, f"image folder {str(root)!r}")
    source = {"kind": "folder", "root": str(root), "layout": used_layout, "test_fraction": test_fraction,
              "split_seed": split_seed}
    if max_image_pixels is not None:
        source["max_image_pixels"] = max_image_pixels
    return Dataset(name=name, class_ids=class_ids, class_names=readable, splits=splits,
                   reader=Reader(max_image_pixels), source=source, skipped=skipped, notes=notes, **meta)


# -- CSV manifests ----------------------------------------------------------------------------

# Spellings a spreadsheet or pandas writes for "no value": never a class (unless `classes` names one).
MISSING_LABELS = {"", "nan", "none", "null", "na", "n/a", "<na>", "#n/a"}


def from_csv(path, *, name: str | None = None, path_column: str = "path", label_column: str = "label",
             split_column: str | None = None, root=None, classes: Sequence[str] | None = None,
             class_names=None, test_fraction: float = 0.3, split_seed: int = 0, check_images: bool = True,
             max_bad_fraction: float = 0.05, max_image_pixels: int | None = None, encoding: str = "utf-8-sig",
             **meta) -> Dataset:
    """A CSV manifest with one row per image: ``path,label[,split]``.

    Relative paths are resolved against ``root`` (default: the CSV's folder); absolute paths
    are accepted. Sample ids are the paths relative to the deepest folder holding all listed
    images (the data root), so ``imgs/a/1.jpg``, ``./imgs/a/1.jpg`` and ``/abs/imgs/a/1.jpg``
    give the id ``a/1.jpg`` — the id :func:`from_folder` gives on ``imgs/`` — and the same
    few-shot draws. ``classes`` fixes the class list and order; a label outside it is an error
    naming the row. Rows whose label is empty or ``nan``/``None``/``null``/``NA`` are skipped and
    recorded in ``dataset.skipped`` (with a warning). ``encoding``: the file's text encoding
    (``"latin-1"`` for files saved by older Excel versions).

    Multi-label: ``findings=[column, ...]`` (one 1/0/-1/blank column per finding, with
    ``uncertain=``) or ``label_separator="|"`` (a list per row in ``label_column``) load a
    :class:`~workbench.data.multilabel.MultiLabelDataset` (see :func:`~workbench.data.multilabel.from_csv_multilabel`).
    """
    if "findings" in meta or "label_separator" in meta:
        from .multilabel import from_csv_multilabel

        return from_csv_multilabel(path, name=name, path_column=path_column, split_column=split_column, root=root,
                                   class_names=class_names, test_fraction=test_fraction, split_seed=split_seed,
                                   check_images=check_images, max_bad_fraction=max_bad_fraction,
                                   max_image_pixels=max_image_pixels, encoding=encoding,
                                   label_column=label_column if "label_separator" in meta else None, **meta)
    effective_pixel_limit(max_image_pixels)
    group_columns = list(meta.pop("groups", None) or [])   # metadata for subgroup audits (workbench.audit)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV manifest {str(path)!r} does not exist.")
    root = Path(root).expanduser() if root else path.parent
    name = name or path.stem
    columns, rows = read_csv(path, encoding)
    require_columns(columns, ((path_column, "path_column"), (label_column, "label_column"),
                              (split_column, "split_column"), *((g, "groups") for g in group_columns)), f"CSV {str(path)!r}")
    if not rows:
        raise DataError(f"CSV {str(path)!r} has no rows.")
    explicit = {str(c) for c in classes} if classes is not None else set()
    skipped: list[dict] = []
    kept: list[tuple[int, dict, str]] = []   # (row number in the file, row, label)
    for i, row in enumerate(rows):
        lab = str(row[label_column] if row[label_column] is not None else "").strip()
        if lab.lower() in MISSING_LABELS and lab not in explicit:
            skipped.append({"id": str(row[path_column] or "").strip(), "kind": "label",
                            "reason": f"row {i + 2}: label {lab!r} is missing (empty/NaN/None), not a class"})
            continue
        if not str(row[path_column] or "").strip():
            raise DataError(f"CSV {str(path)!r} row {i + 2}: the {path_column!r} cell is empty; every row needs "
                            "the path of its image.")
        kept.append((i + 2, row, lab))
    n_unlabelled = len(skipped)
    if not kept:
        raise DataError(f"CSV {str(path)!r}: none of its {len(rows)} rows has a label in column {label_column!r} "
                        "(all empty or NaN/None).")
    labels = [lab for _, _, lab in kept]
    if classes is None:
        class_ids = sorted(set(labels))
    else:
        class_ids = [str(c) for c in classes]
        unknown = sorted(set(labels) - set(class_ids))
        if unknown:
            first = next(n for n, _, lab in kept if lab in unknown)
            raise DataError(f"CSV {str(path)!r}: label {unknown[0]!r} (row {first}) is not in the class list "
                            f"{class_ids}; {len(unknown)} unknown label(s): {unknown[:5]}. Add them to `classes` "
                            "or fix the rows." + did_you_mean(unknown[0], class_ids))
    _check_two_classes(class_ids, f"CSV {str(path)!r} (label column {label_column!r})")
    readable = resolve_class_names(class_ids, class_names, where=f"CSV {str(path)!r}")
    index = {c: i for i, c in enumerate(class_ids)}
    split_alias = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                   "test": "test", "testing": "test"}
    # Ids relative to the data root: the deepest folder holding every listed file, whatever the
    # spelling of the paths (prefix, "./", "..", absolute), so a CSV and a folder agree.
    # Missing files do not move the root (a stray "../old/x.png" row would rename every sample).
    files = [os.path.normpath(os.path.abspath(root / str(row[path_column]).strip())) for _, row, _ in kept]
    present = [f for f in files if os.path.isfile(f)] or files
    try:
        data_root = os.path.commonpath([os.path.dirname(f) for f in present])
    except ValueError:  # paths on different drives (Windows): keep them relative to `root`
        data_root = str(root.resolve())
    splits: dict[str, list[Sample]] = {}
    first_row: dict[str, tuple[int, str, str]] = {}
    groups: dict[str, dict] = {g: {} for g in group_columns}
    for (n, row, lab), file in zip(kept, files):
        raw = str(row[path_column] or "").strip()
        split = "train"
        if split_column:
            value = str(row[split_column]).strip().lower()
            if value not in split_alias:
                raise DataError(f"CSV {str(path)!r} row {n}: split {row[split_column]!r} is not one of "
                                f"train/val/test (also accepted: {sorted(split_alias)}).")
            split = split_alias[value]
        sid = Path(os.path.relpath(file, data_root)).as_posix()
        if sid in first_row:
            n0, raw0, split0 = first_row[sid]
            raise DataError(f"CSV {str(path)!r}: rows {n0} ({raw0!r}, {split0}) and {n} ({raw!r}, {split}) list the "
                            f"same file (sample id {sid!r}). Each image must appear once"
                            + (" — here a test image would also be a training image." if split0 != split else ".")
                            + " Remove one of the rows.")
        first_row[sid] = (n, raw, split)
        reason = (probe_image(file, max_image_pixels) if check_images
                  else (None if os.path.isfile(file) else f"file not found: {file}"))
        if reason:
            skipped.append({"id": raw, "reason": reason})
            continue
        splits.setdefault(split, []).append(Sample(sid, index[lab], file))
        for g in group_columns:
            groups[g][sid] = str(row[g] if row[g] is not None else "").strip()
    unreadable = skipped[n_unlabelled:]
    check_bad_fraction(name, len(kept), unreadable, max_bad_fraction)
    if n_unlabelled:
        warnings.warn(f"dataset {name!r}: skipped {n_unlabelled} row(s) of CSV {str(path)!r} without a label "
                      f"(empty/NaN/None in column {label_column!r}), e.g. {skipped[0]['reason']}; see "
                      "dataset.skipped.", stacklevel=2)
    if unreadable:
        warnings.warn(f"dataset {name!r}: skipped {len(unreadable)} unreadable or missing image(s), e.g. "
                      f"{unreadable[0]['id']} ({unreadable[0]['reason']}); see dataset.skipped.", stacklevel=2)
    if "train" not in splits:
        raise DataError(f"CSV {str(path)!r}: no readable training image (splits found: {sorted(splits)}).")
    for label, cid in enumerate(class_ids):
        if not any(s.label == label for s in splits["train"]):
            raise DataError(f"CSV {str(path)!r}: class {cid!r} has no readable images in the training split. "
                            "Add rows, fix the files, or leave the class out of `classes`.")
    notes: list[str] = []
    splits = finish_splits(name, splits, test_fraction, split_seed, notes)
    _refuse_same_file_in_two_splits(splits, f"CSV {str(path)!r}")
    source = {"kind": "csv", "path": str(path), "root": str(root), "data_root": data_root}
    if max_image_pixels is not None:
        source["max_image_pixels"] = max_image_pixels
    return Dataset(name=name, class_ids=class_ids, class_names=readable, splits=splits,
                   reader=Reader(max_image_pixels), source=source, skipped=skipped, notes=notes, groups=groups,
                   **meta)


# -- in-memory arrays (MedMNIST .npz) ---------------------------------------------------------

def _integer_labels(lab: np.ndarray, split: str, where: str) -> np.ndarray:
    """Class indices must be integers: a float label would be truncated (1.7 -> class 1) without a word."""
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        whole = np.issubdtype(lab.dtype, np.floating) and lab.size and bool(np.all(np.isfinite(lab))) \
            and bool(np.all(lab == np.round(lab)))
        hint = ("They are whole numbers: convert them with labels.astype(np.int64) and save again."
                if whole else "Class labels must be integer class indices 0..C-1 (one per image).")
        raise DataError(f"{where}, split {split!r}: labels have dtype {lab.dtype}, not an integer type; refused "
                        f"rather than truncated. {hint}")
    return lab


def from_arrays(images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], *, name: str,
                class_names: Sequence[str] | Mapping | None = None, class_ids: Sequence[str] | None = None,
                test_fraction: float = 0.3, split_seed: int = 0, **meta) -> Dataset:
    """Images as arrays per split (``{"train": (N,H,W[,C]) uint8, ...}``) with integer labels.

    Labels must have an integer dtype (float labels are refused, not truncated). Without
    ``class_names`` the classes are named ``class 0``, ``class 1``, … up to the largest label;
    a mapping ``{0: "normal", 1: "pneumonia"}`` names some or all of them.
    """
    where = f"dataset {name!r}"
    if meta.get("source", {}).get("path"):
        where = f"npz {meta['source']['path']!r}"
    splits: dict[str, list[Sample]] = {}
    arrays: dict[str, np.ndarray] = {}
    checked: dict[str, np.ndarray] = {}
    for split, arr in images.items():
        if split not in labels:
            raise DataError(f"{where}: images for split {split!r} but no labels.")
        arr = np.asarray(arr)
        lab = np.asarray(labels[split])
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1:
            raise DataError(f"{where}, split {split!r}: labels have shape {lab.shape}; only single-label "
                            "classification (one integer per image) is supported yet.")
        if len(lab) != len(arr):
            raise DataError(f"{where}, split {split!r}: {len(arr)} images but {len(lab)} labels.")
        checked[split] = _integer_labels(lab, split, where)
        arrays[split] = arr
    default_names = class_names is None
    if class_names is None or isinstance(class_names, Mapping):
        # Defaults ("class 0", … or the readable ids), then a mapping {label or id: name} on top.
        if class_ids is not None:
            defaults = [readable_name(c) for c in class_ids]
        else:
            top = max((int(lab.max()) for lab in checked.values() if lab.size), default=-1)
            defaults = [f"class {i}" for i in range(top + 1)]
        ids = [str(c) for c in (class_ids if class_ids is not None else range(len(defaults)))]
        mapping = {str(k): str(v) for k, v in (class_names or {}).items()}
        unknown = sorted(set(mapping) - set(ids))
        if unknown:
            raise DataError(f"{where}: class_names maps {unknown} which are not class labels of the data "
                            f"({ids}).")
        class_names = [mapping.get(c, d) for c, d in zip(ids, defaults)]
    class_ids = [str(c) for c in (class_ids if class_ids is not None else range(len(class_names)))]
    for split, lab in checked.items():
        bad = np.flatnonzero((lab < 0) | (lab >= len(class_names)))
        if bad.size:
            raise DataError(f"{where}, split {split!r}: label {int(lab[bad[0]])} at index {int(bad[0])} is "
                            f"not a class index 0..{len(class_names) - 1}; {bad.size} such label(s). Check the "
                            "class_names list.")
        splits[split] = [Sample(f"{split}/{i}", int(lab[i]), (split, i)) for i in range(len(lab))]
    _check_two_classes(class_ids, where)
    notes: list[str] = []
    if default_names:
        notes.append(f"no class_names given: classes named {class_names[:3]}{'…' if len(class_names) > 3 else ''}; "
                     "pass class_names for prompts that mean something")
    splits = finish_splits(name, splits, test_fraction, split_seed, notes)
    return Dataset(name=name, class_ids=class_ids, class_names=list(class_names), splits=splits,
                   reader=ArrayReader(arrays), source=meta.pop("source", {"kind": "arrays"}), notes=notes, **meta)


def from_npz(path, *, class_names: Sequence[str] | None = None, name: str | None = None, class_ids=None,
             **meta) -> Dataset:
    """A MedMNIST-style ``.npz`` with keys ``{train,val,test}_images`` and ``{...}_labels``.

    Without ``class_names`` the classes get the readable defaults ``class 0``, ``class 1``, …
    (zero-shot prompts then carry no meaning: pass the real names, e.g. from the MedMNIST INFO).
    A truncated or corrupt file is refused naming the file.
    """
    import zipfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist. MedMNIST files can be downloaded from "
                        "medmnist.com (Zenodo) or with the `medmnist` package.")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            images = {s: z[f"{s}_images"] for s in ("train", "val", "test") if f"{s}_images" in z}
            labels = {s: z[f"{s}_labels"] for s in ("train", "val", "test") if f"{s}_labels" in z}
    except ValueError as err:
        if "pickle" not in str(err):
            raise DataError(f"npz {str(path)!r} cannot be read (ValueError: {str(err)[:200]}): the file is "
                            "truncated or corrupt (an interrupted download?). Delete it and download it "
                            "again.") from None
        raise DataError(f"npz {str(path)!r} holds object arrays or pickled data: object arrays are not loaded, for "
                        "safety (unpickling can run code). Save the images and labels as numeric arrays "
                        "(np.savez with uint8/float images and integer labels).") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as err:
        raise DataError(f"npz {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}): the file is "
                        "truncated or corrupt (an interrupted download?). Delete it and download it again.") from None
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


def _load_hub(repo_id: str, config, data_files, revision, cache_dir, offline_fix: str | None = None):
    """``datasets.load_dataset`` of a Hub id or local copy, with the offline and script errors said plainly
    (``offline_fix``: what to do offline instead, when the caller has a better answer than images)."""
    import datasets as hfds

    # Offline (flag or no connection): read the cache only instead of retrying for a minute.
    offline = None if Path(repo_id).expanduser().exists() else offline_reason()
    try:
        with (cache_only() if offline else contextlib.nullcontext()):
            return hfds.load_dataset(repo_id, config, data_files=data_files, revision=revision, cache_dir=cache_dir)
    except Exception as err:  # network, missing repo, script-based repo: say which and what to do
        if offline:
            raise DataError(offline_message(
                f"Hub dataset {repo_id!r}", offline, offline_fix or
                "Load it once on a machine with network (same cache_dir), or bring the images as a local "
                "folder / CSV / .npz (wb.load_dataset('path/to/data')), or pass a local copy of the repository "
                "as repo_id.", err)) from None
        msg = str(err).splitlines()[0][:300]
        hint = ("This repository uses a loading script, which `datasets` >= 4 cannot run; use a parquet or "
                "image-folder copy." if "script" in msg.lower() else
                "Check the id, your network (offline mode: HF_DATASETS_OFFLINE), or pass a local folder.")
        raise DataError(f"could not load Hub dataset {repo_id!r}: {type(err).__name__}: {msg}. {hint}") from None


def list_feature(feature):
    """The element feature of a list-valued ``datasets`` column (``List``/``Sequence``/``[feature]``), else None."""
    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    if type(feature).__name__ in ("List", "LargeList", "Sequence") and hasattr(feature, "feature"):
        return feature.feature
    return None


def from_hub(repo_id, *, image_column: str = "image", label_column: str | Sequence[str] = "label",
             splits: Mapping[str, str] | None = None, name: str | None = None, config: str | None = None,
             data_files=None, revision: str | None = None, class_names=None, classes: Sequence[str] | None = None,
             test_fraction: float = 0.3, split_seed: int = 0, cache_dir=None, groups: Sequence[str] = (),
             findings: Sequence[str] | None = None, no_finding: str = "No Finding", **meta) -> Dataset:
    """A Hub dataset (parquet or image-folder repo) through ``datasets.load_dataset``.

    ``repo_id`` may also be a local folder with the same layout (parquet files or an image
    folder), or a ``datasets.Dataset`` / ``DatasetDict`` already in memory (a lone ``Dataset`` is
    the ``train`` split; give ``name``). ``label_column`` may be a list of columns whose values are joined with ``/`` into
    the class id (LC25000 on the Hub: ``[organ, label]`` → ``lung/adenocarcinomas``). ``splits`` maps our split names to the repo's, e.g.
    ``{"train": "train", "val": "validation", "test": "test"}``. Loading scripts are not
    supported by ``datasets`` >= 4; pick a parquet repo instead.

    Multi-label: a label column holding a *list* per row (class names or ``ClassLabel`` ids;
    ``no_finding`` and empty lists = no finding) gives a
    :class:`~workbench.data.multilabel.MultiLabelDataset`; ``findings`` (or ``classes``) fixes the
    findings and their order, else they are every name seen, sorted. ``groups``: metadata columns
    kept per image in ``dataset.groups`` for subgroup audits (never used for fitting).
    """
    import datasets as hfds

    explicit = splits is not None
    splits = dict(splits or {"train": "train", "val": "validation", "test": "test"})
    if isinstance(repo_id, (hfds.Dataset, hfds.DatasetDict)):
        dd = repo_id if isinstance(repo_id, hfds.DatasetDict) else hfds.DatasetDict({"train": repo_id})
        repo_id = name or "in-memory dataset"
    else:
        dd = _load_hub(repo_id, config, data_files, revision, cache_dir)
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
    group_columns = [str(g) for g in (groups or ())]
    require_columns(columns, [(image_column, "image_column")] + [(c, "label_column") for c in label_columns]
                    + [(g, "groups") for g in group_columns], f"Hub dataset {repo_id!r}")
    # metadata for subgroup audits, per sample id (f"{split}/{row}")
    group_values = {g: {f"{split}/{i}": "" if v is None else str(v) for split, t in tables.items()
                        for i, v in enumerate(t[g])} for g in group_columns}
    if len(label_columns) == 1 and list_feature(first.features[label_columns[0]]) is not None:
        from .multilabel import from_hub_tables_multilabel

        if isinstance(first.features[image_column], hfds.Image):
            tables = {k: t.cast_column(image_column, hfds.Image(decode=False)) for k, t in tables.items()}
        return from_hub_tables_multilabel(
            tables, reader=HubReader(tables, image_column), where=f"Hub dataset {repo_id!r}",
            label_column=label_columns[0], element=list_feature(first.features[label_columns[0]]),
            findings=findings if findings is not None else classes, no_finding=no_finding, class_names=class_names,
            groups=group_values, name=name or str(repo_id).rstrip("/").split("/")[-1], test_fraction=test_fraction,
            split_seed=split_seed, source={"kind": "hub", "repo_id": str(repo_id), "config": config,
                                           "revision": revision, "splits": splits, "image_column": image_column,
                                           "label_column": label_columns[0], "task": "multi_label"}, **meta)
    if findings is not None:
        raise DataError(f"Hub dataset {repo_id!r}: findings= is for a multi-label set, but label column "
                        f"{label_columns} holds one value per row, not a list.")
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
    _check_two_classes(class_ids, f"Hub dataset {repo_id!r} (label column(s) {label_columns})")
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
    samples = finish_splits(name or repo_id, samples, test_fraction, split_seed, notes)
    return Dataset(name=name or repo_id.rstrip("/").split("/")[-1], class_ids=class_ids, class_names=readable,
                   splits=samples, reader=HubReader(tables, image_column),
                   source={"kind": "hub", "repo_id": repo_id, "config": config, "revision": revision,
                           "splits": splits, "image_column": image_column, "label_column": label_column},
                   notes=notes, groups=group_values, **meta)


# -- an image-folder archive in a Hub dataset repo (BiomedCoOp: one zip per dataset) ----------

def _fetch_archive(repo_id: str, filename: str, cache_dir) -> Path:
    local = Path(repo_id).expanduser()
    if local.is_dir():  # a local copy of the repository
        path = local / filename
        if not path.is_file():
            raise DataError(f"{filename!r} not found in local folder {str(local)!r}.")
        return path
    from huggingface_hub import hf_hub_download

    offline = offline_reason()
    try:
        with (cache_only() if offline else contextlib.nullcontext()):
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=cache_dir))
    except Exception as err:
        if offline:
            raise DataError(offline_message(
                f"{filename!r} of Hub dataset {repo_id!r}", offline,
                "Download it on a machine with network and pass the folder holding it as repo_id.", err)) from None
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
    kept = {k: v for k, v in ds.source.items() if k in ("layout", "test_fraction", "split_seed", "max_image_pixels")}
    ds.source = {"kind": "hub_archive", "repo_id": repo_id, "filename": filename, "subdir": subdir,
                 "extracted": str(root), **kept}
    return ds


DATA_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".npz": "npz"}


def data_kind(path: Path) -> str:
    """``folder``, ``csv`` or ``npz`` for an existing path, else a DataError saying what is accepted."""
    if path.is_dir():
        return "folder"
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{str(path)!r} is neither an image folder, a CSV manifest (.csv) nor an .npz file "
                        "(a dataset YAML ends in .yaml).")
    return kind


def load_user_data(folder: str | None = None, csv: str | None = None, *, npz: str | None = None,
                   path: str | None = None, **kwargs) -> Dataset:
    """Your own images: an image folder (``root/<class>/*.jpg``), a CSV manifest or an ``.npz``; exactly one.

    ``path`` takes any of the three and picks by what it is (folder, ``.csv``, ``.npz``).
    Relative paths are tried from the working directory, then from the repository root; a path
    that exists in neither is an error saying so. Extra keyword arguments go to
    :func:`from_folder` / :func:`from_csv` / :func:`from_npz` (``class_names``, ``path_column``,
    ``layout``, ``test_fraction``...).
    """
    from ..paths import find_existing

    given = {k: v for k, v in (("folder", folder), ("csv", csv), ("npz", npz), ("path", path)) if v}
    if len(given) != 1:
        raise DataError("give either an image folder, a CSV manifest or an .npz file (exactly one of them).")
    (kind, raw), = given.items()
    found = find_existing(raw)
    if found is None:
        raise DataError(f"path {str(raw)!r} does not exist (looked in the working directory {str(Path.cwd())!r} "
                        "and the repository root).")
    if kind == "path":
        kind = data_kind(found)
    if kind == "folder":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("path_column", "label_column")}
        return from_folder(found, **kwargs)
    if kind == "npz":
        return from_npz(found, **kwargs)
    return from_csv(found, **kwargs)
