"""Multi-label datasets: several findings per image (chest X-ray findings, land covers of a tile).

A :class:`MultiLabelDataset` is a :class:`~workbench.data.dataset.Dataset` whose samples are
:class:`MultiLabelSample` s: besides the id and image reference each carries ``targets``, one
value per finding — ``1`` (present), ``0`` (absent) or ``-1`` (uncertain, left out of losses
and metrics: CheXpert's U-Ignore). ``label`` is ``-1`` (there is no single class). The
``class_ids`` / ``class_names`` of the dataset are the findings, and :meth:`targets` gives the
``[N, L]`` matrix of a split. Single-label datasets and code paths are untouched.

Sources (each a function here; :func:`workbench.data.sources.from_csv` dispatches to the CSV one
when given ``findings=`` or ``label_separator=``):

* CSV with one column per finding (CheXpert style): cells ``1``/``0``/``-1``/blank (``1.0``,
  ``0.0``, ``-1.0`` accepted), with ``-1`` and blank *uncertain*, resolved by
  ``uncertain="ignore" | "zeros" | "ones"`` (Irvin et al. AAAI 2019, U-Ignore / U-Zeros / U-Ones);
  any other value is a :class:`~workbench.errors.DataError` naming the row, column and value;
* CSV with a separated list per row (ChestX-ray14 style, ``"Effusion|Infiltration"``), where
  ``no_finding="No Finding"`` (or an empty cell) is the empty set;
* ``.npz`` with ``{split}_images`` and an ``[N, L]`` 0/1 ``{split}_labels`` matrix (ChestMNIST).

Few-shot sampling (:func:`sample_multilabel_few_shot`) is the greedy pass of the multi-label
few-shot literature (reference note ``task_kinds.md`` §5; no canonical CLIP protocol exists, so
this is ours): the training images are shuffled with a seed; an image is taken when one of its
findings still has fewer than K positives, and then counts for *all* its findings. Co-occurring
findings can exceed K; the realised positives per finding are recorded in the split file. The
K-shot validation set is drawn the same way with ``min(K, 4)`` positives per finding from the
remaining images (or the dataset's own ``val`` split). K above a finding's positives is a
``DataError`` naming the finding.

Groups (``groups=[...]``): metadata columns kept per sample id in ``dataset.groups`` for the
subgroup audit (:mod:`workbench.audit`); they never enter fitting.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError, did_you_mean
from .csvfile import read_csv, require_columns
from .dataset import (Dataset, Reader, Sample, finish_splits, probe_image, resolve_class_names,
                      validate_class_names)

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
#: cell spellings accepted in a one-column-per-finding CSV
_POSITIVE, _NEGATIVE, _UNCERTAIN = {"1", "1.0"}, {"0", "0.0"}, {"-1", "-1.0", ""}


@dataclass(frozen=True)
class MultiLabelSample(Sample):
    #: one value per finding: 1 present, 0 absent, -1 uncertain (ignored by losses and metrics)
    targets: tuple = ()


@dataclass
class MultiLabelDataset(Dataset):
    """A dataset whose images carry a set of findings (see the module docstring)."""

    metric: str = "macro_auroc"
    task: str = "multi_label"

    def __post_init__(self):
        self.class_ids = [str(c) for c in self.class_ids]
        self.class_names = [str(c) for c in self.class_names]
        validate_class_names(self.class_ids, self.class_names, where=f"dataset {self.name!r}")
        n = len(self.class_ids)
        seen: dict[str, str] = {}
        for split, samples in self.splits.items():
            for s in samples:
                t = getattr(s, "targets", None)
                if t is None or len(t) != n:
                    raise DataError(f"dataset {self.name!r}, split {split!r}: sample {s.id!r} has "
                                    f"{'no' if t is None else len(t)} finding values; every sample needs one per "
                                    f"finding ({n}: {self.class_ids[:5]}...).")
                bad = [v for v in t if v not in (0, 1, -1)]
                if bad:
                    raise DataError(f"dataset {self.name!r}: sample {s.id!r} has finding value(s) {bad[:3]}; "
                                    "allowed are 1 (present), 0 (absent), -1 (uncertain).")
                if s.id in seen:
                    raise DataError(f"dataset {self.name!r}: sample id {s.id!r} appears in split {seen[s.id]!r} "
                                    f"and in {split!r}; ids must be unique across splits.")
                seen[s.id] = split
        if "train" in self.splits:
            pos = self.targets("train").__eq__(1).sum(axis=0)
            empty = [self.class_ids[j] for j in range(n) if pos[j] == 0]
            if empty:
                raise DataError(f"dataset {self.name!r}: finding(s) {empty} have no positive image in the 'train' "
                                "split, so no few-shot support can show them. Remove them from the finding list "
                                "(findings=...) or add images.")

    @property
    def n_findings(self) -> int:
        return len(self.class_ids)

    def targets(self, split: str) -> np.ndarray:
        """The ``[N, L]`` int8 matrix (1 / 0 / -1 uncertain) of a split, rows in split order."""
        return targets_of(self.split(split), self.n_findings)

    def counts(self):
        """Positive images per finding and split (uncertain entries not counted), as a pandas table."""
        import pandas as pd

        return pd.DataFrame({split: (targets_of(ss, self.n_findings) == 1).sum(axis=0)
                             for split, ss in self.splits.items()},
                            index=pd.Index(self.class_names, name="finding"))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(["multi_label", self.name, self.class_ids, self.class_names], ensure_ascii=False).encode())
        for split in sorted(self.splits):
            h.update(split.encode())
            for s in self.splits[split]:
                h.update(f"{s.id}\x00{','.join(map(str, s.targets))}\x01".encode())
        return h.hexdigest()[:20]

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        unc = sum(int((targets_of(ss, self.n_findings) == -1).sum()) for ss in self.splits.values())
        extra = f"; {unc} uncertain entries (ignored)" if unc else ""
        extra += f"; {len(self.skipped)} row(s)/file(s) skipped" if self.skipped else ""
        return f"{self.name}: multi-label, {self.n_findings} findings, {sizes}{extra}"


def targets_of(samples: Sequence[Sample], n_findings: int) -> np.ndarray:
    if not samples:
        return np.zeros((0, n_findings), dtype=np.int8)
    return np.array([s.targets for s in samples], dtype=np.int8).reshape(len(samples), n_findings)


def is_multi_label(dataset) -> bool:
    return getattr(dataset, "task", "single_label") == "multi_label"


def random_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held_out): a seeded random hold-out of ``fraction`` of the images (multi-label images
    cannot be stratified per class; the test split is the same for every few-shot seed)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {fraction}.")
    order = sorted(samples, key=lambda s: s.id)
    random.Random(f"ml-holdout-{seed}").shuffle(order)
    n_held = min(max(int(round(len(order) * fraction)), 1), len(order) - 1)
    key = lambda s: s.id  # noqa: E731
    return sorted(order[n_held:], key=key), sorted(order[:n_held], key=key)


# -- sources ------------------------------------------------------------------------------------

def _cell(value, policy: str, where: str, column: str) -> int:
    v = str(value if value is not None else "").strip()
    if v in _POSITIVE:
        return 1
    if v in _NEGATIVE:
        return 0
    if v in _UNCERTAIN:
        return {"ignore": -1, "zeros": 0, "ones": 1}[policy]
    raise DataError(f"{where}, column {column!r}: value {v!r} is not a finding label. Allowed: 1 (present), "
                    "0 (absent), -1 or blank (uncertain, resolved by uncertain='ignore'|'zeros'|'ones'). Fix the "
                    "cell, or drop the column from findings=[...].")


def from_csv_multilabel(path, *, name: str | None = None, path_column: str = "path",
                        findings: Sequence[str] | None = None, label_column: str | None = None,
                        label_separator: str | None = None, no_finding: str = "No Finding",
                        uncertain: str = "ignore", split_column: str | None = None, root=None,
                        class_names=None, groups: Sequence[str] = (), test_fraction: float = 0.3,
                        split_seed: int = 0, check_images: bool = True, max_bad_fraction: float = 0.05,
                        max_image_pixels: int | None = None, encoding: str = "utf-8-sig",
                        **meta) -> MultiLabelDataset:
    """A multi-label CSV manifest, one row per image (module docstring).

    Either ``findings=[...]`` names one column per finding (cells 1/0/-1/blank, ``uncertain``
    policy), or ``label_column`` + ``label_separator`` hold a list per row (the findings are then
    every name seen, sorted, unless ``findings`` fixes them). ``groups``: metadata columns kept for
    subgroup audits. Relative paths resolve against ``root`` (default: the CSV's folder); ids are
    the paths as written (normalised).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV manifest {str(path)!r} does not exist.")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"uncertain must be one of {list(UNCERTAIN_POLICIES)} (CheXpert U-Ignore/U-Zeros/U-Ones), "
                          f"got {uncertain!r}.")
    list_mode = label_separator is not None
    if not list_mode and not findings:
        raise ConfigError(f"CSV {str(path)!r}: a multi-label CSV needs findings=[column, ...] (one 0/1 column per "
                          "finding) or label_column=... with label_separator='|' (a list per row).")
    root = Path(root).expanduser() if root else path.parent
    name = name or path.stem
    columns, rows = read_csv(path, encoding)
    need = [(path_column, "path_column"), (split_column, "split_column")]
    need += [(label_column or "", "label_column")] if list_mode else [(f, "findings") for f in findings]
    need += [(g, "groups") for g in groups]
    require_columns(columns, need, f"CSV {str(path)!r}")
    if not rows:
        raise DataError(f"CSV {str(path)!r} has no rows.")
    where = lambda i: f"CSV {str(path)!r} row {i + 2}"  # noqa: E731
    if list_mode:
        lists = []
        for row in rows:
            cell = str(row[label_column] or "").strip()
            items = [x.strip() for x in cell.split(label_separator)] if cell else []
            items = [x for x in items if x and x != no_finding]
            lists.append(items)
        seen = sorted({x for items in lists for x in items})
        class_ids = [str(f) for f in findings] if findings else seen
        unknown = sorted(set(seen) - set(class_ids))
        if unknown:
            i = next(k for k, items in enumerate(lists) if unknown[0] in items)
            raise DataError(f"{where(i)}: finding {unknown[0]!r} is not in findings={class_ids}; add it or fix the "
                            "row." + did_you_mean(unknown[0], class_ids))
        index = {c: j for j, c in enumerate(class_ids)}
        values = []
        for items in lists:
            t = [0] * len(class_ids)
            for x in items:
                t[index[x]] = 1
            values.append(tuple(t))
    else:
        class_ids = [str(f) for f in findings]
        values = [tuple(_cell(row[f], uncertain, where(i), f) for f in class_ids) for i, row in enumerate(rows)]
    if not class_ids:
        raise DataError(f"CSV {str(path)!r}: no finding found in column {label_column!r}.")
    readable = resolve_class_names(class_ids, class_names, where=f"CSV {str(path)!r}")
    split_alias = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                   "test": "test", "testing": "test"}
    splits: dict[str, list] = {}
    skipped: list[dict] = []
    group_values: dict[str, dict] = {g: {} for g in groups}
    ids_seen: dict[str, int] = {}
    for i, (row, t) in enumerate(zip(rows, values)):
        raw = str(row[path_column] or "").strip()
        if not raw:
            raise DataError(f"{where(i)}: the {path_column!r} cell is empty; every row needs the path of its image.")
        file = os.path.normpath(os.path.join(str(root), raw))
        sid = Path(os.path.normpath(raw)).as_posix()
        if sid in ids_seen:
            raise DataError(f"{where(i)}: image {raw!r} is also listed on row {ids_seen[sid] + 2}; each image must "
                            "appear once (merge the rows' findings).")
        ids_seen[sid] = i
        split = "train"
        if split_column:
            value = str(row[split_column]).strip().lower()
            if value not in split_alias:
                raise DataError(f"{where(i)}: split {row[split_column]!r} is not one of train/val/test.")
            split = split_alias[value]
        reason = probe_image(file, max_image_pixels) if check_images else (
            None if os.path.isfile(file) else f"file not found: {file}")
        if reason:
            skipped.append({"id": raw, "reason": reason})
            continue
        for g in groups:
            group_values[g][sid] = str(row[g]).strip()
        splits.setdefault(split, []).append(MultiLabelSample(sid, -1, file, t))
    if rows and len(skipped) / len(rows) > max_bad_fraction:
        raise DataError(f"dataset {name!r}: {len(skipped)} of {len(rows)} images are unreadable (more than "
                        f"max_bad_fraction={max_bad_fraction}), e.g. {skipped[0]['id']}: {skipped[0]['reason']}.")
    if skipped:
        warnings.warn(f"dataset {name!r}: skipped {len(skipped)} unreadable or missing image(s), e.g. "
                      f"{skipped[0]['id']} ({skipped[0]['reason']}); see dataset.skipped.", stacklevel=2)
    notes: list[str] = [f"uncertain policy: {uncertain}"] if not list_mode else []
    splits = finish_splits(name, splits, test_fraction, split_seed, notes, holdout=random_holdout, how="at random")
    source = {"kind": "csv", "path": str(path), "root": str(root), "task": "multi_label",
              "uncertain": uncertain if not list_mode else None, "label_separator": label_separator}
    return MultiLabelDataset(name=name, class_ids=class_ids, class_names=readable, splits=splits,
                             reader=Reader(max_image_pixels), source=source, skipped=skipped, notes=notes,
                             groups=group_values, **meta)


def from_npz_multilabel(path, *, class_names: Sequence[str], name: str | None = None, class_ids=None,
                        test_fraction: float = 0.3, split_seed: int = 0, **meta) -> MultiLabelDataset:
    """A ChestMNIST-style ``.npz``: ``{split}_images`` and ``[N, L]`` 0/1 ``{split}_labels``."""
    import zipfile

    from .dataset import ArrayReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist (ChestMNIST: medmnist.com / the `medmnist` package).")
    try:
        with np.load(path) as z:
            keys = list(z.keys())
            images = {s: z[f"{s}_images"] for s in ("train", "val", "test") if f"{s}_images" in z}
            labels = {s: z[f"{s}_labels"] for s in ("train", "val", "test") if f"{s}_labels" in z}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise DataError(f"npz {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}); the file is "
                        "truncated or corrupt. Download it again.") from None
    if "train" not in images:
        raise DataError(f"npz {str(path)!r} has no 'train_images' key; keys are {keys}.")
    n_find = len(class_names)
    class_ids = [str(c) for c in (class_ids or class_names)]
    splits = {}
    for split, imgs in images.items():
        if split not in labels:
            raise DataError(f"npz {str(path)!r}: '{split}_images' has no '{split}_labels'.")
        lab = np.asarray(labels[split])
        if lab.ndim != 2 or lab.shape != (len(imgs), n_find):
            raise DataError(f"npz {str(path)!r}: '{split}_labels' has shape {lab.shape}; a multi-label set needs "
                            f"[{len(imgs)}, {n_find}] (one 0/1 column per finding of class_names).")
        if np.isnan(lab.astype(float)).any() or not np.isin(lab, (0, 1, -1)).all():
            bad = np.unique(lab[~np.isin(lab, (0, 1, -1))])[:5] if not np.isnan(lab.astype(float)).any() else ["nan"]
            raise DataError(f"npz {str(path)!r}: '{split}_labels' holds value(s) {list(bad)}; allowed 1/0/-1.")
        splits[split] = [MultiLabelSample(f"{split}/{i}", -1, (split, i), tuple(int(v) for v in lab[i]))
                         for i in range(len(imgs))]
    notes: list[str] = []
    splits = finish_splits(name or path.stem, splits, test_fraction, split_seed, notes, holdout=random_holdout,
                           how="at random")
    return MultiLabelDataset(name=name or path.stem, class_ids=class_ids,
                             class_names=resolve_class_names(class_ids, list(class_names), str(path)),
                             splits=splits, reader=ArrayReader(images), notes=notes,
                             source={"kind": "npz", "path": str(path), "task": "multi_label"}, **meta)


def from_hub_tables_multilabel(tables, *, reader, where: str, label_column: str, element, findings, no_finding: str,
                               class_names, groups: dict, name: str, test_fraction: float, split_seed: int,
                               source: dict, **meta) -> MultiLabelDataset:
    """The multi-label branch of :func:`workbench.data.sources.from_hub`: ``tables`` (split -> ``datasets``
    table) whose ``label_column`` holds a list per row, of names or of ``ClassLabel`` ids (``element``)."""
    names_of = getattr(element, "int2str", None) if type(element).__name__ == "ClassLabel" else None
    lists = {}
    for split, table in tables.items():
        rows = []
        for i, value in enumerate(table[label_column]):
            if value is None:
                value = []
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise DataError(f"{where}, split {split!r} row {i}: column {label_column!r} holds {value!r}, not a "
                                "list of findings; a multi-label Hub column needs a list per row ([] = no finding).")
            items = [str(names_of(int(v)) if names_of else v).strip() for v in value]
            rows.append([x for x in items if x and x != no_finding])
        lists[split] = rows
    seen = sorted({x for rows in lists.values() for items in rows for x in items})
    class_ids = [str(f) for f in findings] if findings is not None else seen
    unknown = sorted(set(seen) - set(class_ids))
    if unknown:
        split, i = next((sp, k) for sp, rows in lists.items() for k, items in enumerate(rows) if unknown[0] in items)
        raise DataError(f"{where}, split {split!r} row {i}: finding {unknown[0]!r} is not in findings={class_ids}; "
                        "add it to the findings (the YAML's classes) or fix the row." + did_you_mean(unknown[0], class_ids))
    if not class_ids:
        raise DataError(f"{where}: no finding found in column {label_column!r}.")
    index = {c: j for j, c in enumerate(class_ids)}
    splits = {}
    for split, rows in lists.items():
        samples = []
        for i, items in enumerate(rows):
            t = [0] * len(class_ids)
            for x in items:
                t[index[x]] = 1
            samples.append(MultiLabelSample(f"{split}/{i}", -1, (split, i), tuple(t)))
        splits[split] = samples
    notes: list[str] = []
    splits = finish_splits(name, splits, test_fraction, split_seed, notes, holdout=random_holdout, how="at random")
    return MultiLabelDataset(name=name, class_ids=class_ids,
                             class_names=resolve_class_names(class_ids, class_names, where=where), splits=splits,
                             reader=reader, source=source, notes=notes, groups=groups, **meta)


# -- few-shot sampling ------------------------------------------------------------------------

def _greedy(pool: list[Sample], k: int, rng: random.Random, n: int) -> list[Sample]:
    order = sorted(pool, key=lambda s: s.id)
    rng.shuffle(order)
    counts = np.zeros(n, dtype=int)
    chosen = []
    for s in order:
        t = np.asarray(s.targets)
        if ((t == 1) & (counts < k)).any():
            chosen.append(s)
            counts += t == 1
        if (counts >= k).all():
            break
    return chosen


def sample_multilabel_few_shot(dataset: MultiLabelDataset, shots: int, seed: int, *, val_shots: int | None = None,
                               split_dir=None):
    """The greedy K-positives-per-finding split (module docstring), a :class:`FewShotSplit` whose
    ``per_class`` holds the realised support positives per finding and ``shortfalls`` the
    validation positives of findings that got fewer than asked."""
    from .sampling import FewShotSplit, _as_int, check_split_is_leak_free

    seed = _as_int(seed, "seed")
    shots = _as_int(shots, "shots (positive images per finding)", minimum=1)
    n = dataset.n_findings
    train_pool = dataset.split("train")
    pos = (dataset.targets("train") == 1).sum(axis=0)
    short = [(int(pos[j]), dataset.class_ids[j]) for j in range(n) if pos[j] < shots]
    if short:
        got, fid = min(short)
        raise DataError(f"dataset {dataset.name!r}: shots={shots} positive images per finding, but finding {fid!r} "
                        f"has only {got} positive training image(s)"
                        + (f" ({len(short) - 1} other finding(s) also have fewer)" if len(short) > 1 else "")
                        + f". Use shots <= {got}, or drop the finding.")
    val_shots = min(shots, 4) if val_shots is None else _as_int(val_shots, "val_shots", minimum=0)
    path = None
    if split_dir is not None:
        path = Path(split_dir) / dataset.name.replace("/", "__") / f"multilabel_shots{shots}_seed{seed}_val{val_shots}.json"
        if path.exists():
            split = FewShotSplit.load(path)
            if split.fingerprint != dataset.fingerprint():
                raise DataError(f"split file {str(path)!r} was made from another version of dataset "
                                f"{dataset.name!r}. Delete the file to resample.")
            check_split_is_leak_free(split, dataset, where=f"split file {str(path)!r}")
            return split
    rng = random.Random(f"ml-fewshot/{seed}/{shots}")
    support = _greedy(train_pool, shots, rng, n)
    taken = {s.id for s in support}
    val_from_split = dataset.has_split("val") and len(dataset.split("val")) > 0
    vpool = dataset.split("val") if val_from_split else [s for s in train_pool if s.id not in taken]
    val = _greedy(vpool, val_shots, rng, n) if val_shots else []
    realised = (targets_of(support, n) == 1).sum(axis=0)
    vreal = (targets_of(val, n) == 1).sum(axis=0)
    shortfalls = {dataset.class_ids[j]: {"train": int(realised[j]), "val": int(vreal[j])}
                  for j in range(n) if vreal[j] < val_shots}
    if shortfalls:
        warnings.warn(f"dataset {dataset.name!r}, {shots}-shot seed {seed}: {len(shortfalls)} finding(s) have fewer "
                      f"than {val_shots} validation positives: {dict(list(shortfalls.items())[:5])}. Recorded in the "
                      "split file.", stacklevel=2)
    split = FewShotSplit(dataset=dataset.name, fingerprint=dataset.fingerprint(), shots=shots, seed=seed,
                         val_shots=val_shots, train_ids=[s.id for s in support], val_ids=[s.id for s in val],
                         val_source="val" if val_from_split else "train", shortfalls=shortfalls,
                         allocation="greedy_multilabel",
                         per_class={c: int(v) for c, v in zip(dataset.class_ids, realised)})
    if path is not None:
        split.save(path)
    return split


# -- offline mosaics of WHU-RS19 ----------------------------------------------------------------

class MosaicReader(Reader):
    """Builds a 2x2 mosaic from four tile files (picklable; deterministic)."""

    def __init__(self, tile_size: int = 112, files: Sequence[str] = ()):
        super().__init__()
        self.tile_size = tile_size
        # the feature cache keys a reader's content by content_fingerprint(): every source file's name, size, mtime
        h = hashlib.sha256(str(tile_size).encode())
        for f in sorted(files):
            st = os.stat(f)
            h.update(f"{f}\x00{st.st_size}\x00{st.st_mtime_ns}\x01".encode())
        self._content = h.hexdigest()[:20]

    def content_fingerprint(self) -> str:
        return self._content

    def __call__(self, ref):
        from PIL import Image

        from .images import open_rgb

        t = self.tile_size
        out = Image.new("RGB", (2 * t, 2 * t))
        for k, file in enumerate(ref):
            tile = open_rgb(file).resize((t, t))
            out.paste(tile, ((k % 2) * t, (k // 2) * t))
        return out


def mosaic_dataset(folder, *, n_images: int = 200, seed: int = 0, name: str = "whu_rs19_mosaic",
                   classes: Sequence[str] | None = None, class_names=None, test_fraction: float = 0.3,
                   tile_size: int = 112, **meta) -> MultiLabelDataset:
    """2x2 mosaics of scene images from a class-per-folder set (the bundled WHU-RS19 mini).

    Each mosaic picks 1–3 distinct scene classes (how many: uniform; which: those with the fewest
    positives so far in its split, ties in seeded random order, so every finding gets about the same
    number of positives — with 19 classes, 200 mosaics give 15–16 training positives each: K ≤ 8),
    fills the four tiles with images of them (each chosen class at least once), and its findings are the classes present — the shape
    of MLRSNet's labels (several land covers per tile; MLRSNet has 1–13, here 1–3). Tiles of one
    source image never appear in two splits: the source images are split first (by image, seeded)
    and each split's mosaics draw only from its own images. A synthetic metadata column ``site``
    (A/B/C, seeded, independent of the content) exercises the subgroup report. Deterministic for
    (folder content, n_images, seed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"mosaic source folder {str(folder)!r} does not exist.")
    class_ids = [str(c) for c in classes] if classes else sorted(d.name for d in folder.iterdir() if d.is_dir()
                                                                  and not d.name.startswith("."))
    files = {c: sorted(str(p) for p in (folder / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
             for c in class_ids}
    empty = [c for c, f in files.items() if len(f) < 2]
    if empty:
        raise DataError(f"mosaic source {str(folder)!r}: class folder(s) {empty} hold fewer than 2 images.")
    rng = random.Random(f"mosaic/{seed}")
    source_split = {}
    for c in class_ids:
        fs = list(files[c])
        rng.shuffle(fs)
        n_test = max(1, int(round(len(fs) * test_fraction)))
        source_split[c] = {"test": fs[:n_test], "train": fs[n_test:]}
    splits: dict[str, list] = {"train": [], "test": []}
    groups = {"site": {}}
    n_test_img = int(round(n_images * test_fraction))
    used = {"train": [0] * len(class_ids), "test": [0] * len(class_ids)}   # positives so far, per split
    for i in range(n_images):
        split = "test" if i < n_test_img else "train"
        k = rng.randint(1, 3)
        # balanced: the k classes with the fewest positives in this split so far (ties in seeded random order),
        # so every finding gets about the same number of positives in each split
        order = rng.sample(range(len(class_ids)), len(class_ids))
        present = sorted(order, key=lambda c: used[split][c])[:k]
        for c in present:
            used[split][c] += 1
        tiles = present + [rng.choice(present) for _ in range(4 - k)]
        rng.shuffle(tiles)
        ref = tuple(rng.choice(source_split[class_ids[c]][split]) for c in tiles)
        t = tuple(1 if j in present else 0 for j in range(len(class_ids)))
        sid = f"{split}/mosaic_{i:04d}"
        splits[split].append(MultiLabelSample(sid, -1, ref, t))
        groups["site"][sid] = rng.choice("ABC")
    readable = resolve_class_names(class_ids, class_names, where=f"mosaics of {str(folder)!r}")
    notes = [f"{n_images} 2x2 mosaics of {str(folder)!r} (seed {seed}); source images split by image before "
             "mosaicking; 'site' is synthetic metadata, independent of the images"]
    return MultiLabelDataset(name=name, class_ids=class_ids, class_names=readable, splits=splits,
                             reader=MosaicReader(tile_size, [f for fs in files.values() for f in fs]), source={"kind": "mosaic", "path": str(folder),
                                                                     "n_images": n_images, "seed": seed,
                                                                     "task": "multi_label"},
                             notes=notes, groups=groups, **meta)
