"""Image–text pairs: datasets whose images carry captions or reports instead of class labels.

A :class:`PairDataset` holds, per split (``train`` / ``val`` / ``test``), images each with one or
more captions (RSICD and UCM-captions have five per image; ROCO one figure caption). It is the
data of the ``retrieval`` task kind (:mod:`workbench.task_kinds`): retrieval evaluation
(:mod:`workbench.retrieval`) and contrastive fine-tuning (``methods/pairs``).

Sources:

* :func:`pairs_from_csv` — a CSV with an image column and one or more caption columns
  (several captions per image: ``caption_1 … caption_5``; or one caption per row with the same
  image on several rows: rows are grouped by image);
* :func:`pairs_from_karpathy_json` — the Karpathy-style JSON the remote-sensing caption sets
  ship (``dataset_rsicd.json``, RSITMD, UCM-captions: ``images[].filename / sentences[].raw /
  split``), read as RemoteCLIP's ``retrieval.py`` reads it;
* :func:`pairs_from_hub` — a Hub dataset (parquet) with an image column and a caption column
  holding a string or a list of strings, through ``datasets.load_dataset``;
* :func:`offline_pairs` — the bundled WHU-RS19 images with captions *templated* from their class
  names and simple attributes: retrieval on it measures the plumbing, not language understanding.

Bad input is refused with the file, the column and the rows: an image with no caption (or,
with ``drop_uncaptioned=True``, skipped and counted in ``dataset.skipped``), a caption column
that is empty or numeric, the same image in two splits. Captions longer than a backbone's text
context are truncated by its tokenizer; :func:`workbench.retrieval.caption_truncation` counts them for the report.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError, DataError, did_you_mean
from .csvfile import read_csv, require_columns
from .dataset import Dataset, Reader, Sample

PAIR_SPLITS = ("train", "val", "test")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_MISSING = {"", "nan", "none", "null", "na", "n/a", "<na>", "#n/a"}


@dataclass(frozen=True)
class PairSample:
    id: str                     # stable: relative image path, "split/index", hub image id
    ref: Any                    # what the reader needs to produce the image
    captions: tuple[str, ...]   # at least one


@dataclass
class PairDataset:
    name: str
    splits: dict[str, list[PairSample]]
    reader: Callable[[Any], Any] = field(default_factory=Reader)
    source: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    domain: str | None = None
    #: what a reader of a results table should know about the data (e.g. "captions are templated")
    card: str = ""
    task: str = "retrieval"

    def __post_init__(self):
        seen: dict[str, str] = {}
        for split, samples in self.splits.items():
            for s in samples:
                if not s.captions:
                    raise DataError(f"pair dataset {self.name!r}, split {split!r}: image {s.id!r} has no caption.")
                if s.id in seen:
                    raise DataError(f"pair dataset {self.name!r}: image id {s.id!r} is in split {seen[s.id]!r} "
                                    f"and in {split!r}; a test image must never be a training image.")
                seen[s.id] = split

    def split(self, name: str) -> list[PairSample]:
        if name not in self.splits:
            raise DataError(f"pair dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}."
                            + did_you_mean(name, self.splits))
        return self.splits[name]

    def has_split(self, name: str) -> bool:
        return name in self.splits and bool(self.splits[name])

    def texts(self, split: str) -> tuple[list[str], list[int]]:
        """Every caption of ``split`` and the index (in the split) of the image it describes."""
        texts, owner = [], []
        for i, s in enumerate(self.split(split)):
            texts.extend(s.captions)
            owner.extend([i] * len(s.captions))
        return texts, owner

    def image_view(self) -> Dataset:
        """The images as a one-class :class:`Dataset`, so the one feature cache encodes them."""
        splits = {k: [Sample(s.id, 0, s.ref) for s in v] for k, v in self.splits.items()}
        return Dataset(name=f"{self.name}/images", class_ids=["image"], class_names=["image"], splits=splits,
                       reader=self.reader, source=dict(self.source, pairs=True), domain=self.domain)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for split in sorted(self.splits):
            h.update(split.encode())
            for s in self.splits[split]:
                h.update(json.dumps([s.id, list(s.captions)], ensure_ascii=False).encode())
        return h.hexdigest()[:20]

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={len(v)} images/{sum(len(s.captions) for s in v)} captions"
                          for k, v in self.splits.items())
        extra = f"; {len(self.skipped)} row(s) skipped" if self.skipped else ""
        return f"{self.name} (image–text pairs): {sizes}{extra}"

    def __repr__(self) -> str:
        return f"PairDataset({self.describe()})"


# -- checks shared by the sources --------------------------------------------------------------

def _clean(text) -> str | None:
    if text is None:
        return None
    t = " ".join(str(text).split())
    return None if t.lower() in _MISSING else t


def check_caption_column(values: Sequence, column: str, where: str) -> None:
    """Refuse a caption column that holds no text (all blank) or only numbers (a label / id column)."""
    present = [v for v in (_clean(x) for x in values) if v is not None]
    if not present:
        raise DataError(f"{where}: caption column {column!r} is empty (no row has text in it). Name the column "
                        "that holds the captions (caption_columns=...).")
    numeric = sum(1 for v in present if _NUMBER.match(v))
    if numeric == len(present):
        raise DataError(f"{where}: caption column {column!r} holds only numbers (e.g. {present[0]!r}): it looks "
                        "like a label or id column, not captions. Name the column with the text "
                        "(caption_columns=...).")


def _file_identity(ref) -> Any:
    if not isinstance(ref, str):
        return None
    try:
        st = os.stat(ref)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(ref))


def _content_hash(ref) -> str | None:
    if not isinstance(ref, str) or not os.path.isfile(ref):
        return None
    h = hashlib.blake2b(digest_size=16)
    with open(ref, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refuse_cross_split_duplicates(splits: Mapping[str, list[PairSample]], where: str,
                                  rows: Mapping[str, Any] | None = None, content_of: Callable | None = None) -> None:
    """The same image (same file, a link to it, or a byte-identical copy) in two splits is refused,
    naming both entries (their CSV rows when ``rows`` maps ids to row numbers)."""
    content_of = content_of or _content_hash
    by_file, by_bytes, clashes = {}, {}, []
    for split, samples in splits.items():
        for s in samples:
            for table, key in ((by_file, _file_identity(s.ref)), (by_bytes, content_of(s.ref))):
                if key is None:
                    continue
                first = table.setdefault(key, (split, s.id))
                if first[0] != split:
                    clashes.append((first, (split, s.id)))
                    break
    if clashes:
        def name(entry):
            split, sid = entry
            row = f", row {rows[sid]}" if rows and sid in rows else ""
            return f"{sid!r} ({split}{row})"
        listed = "; ".join(f"{name(a)} = {name(b)}" for a, b in clashes[:5])
        raise DataError(f"{where}: {len(clashes)} image(s) appear in two splits (same file or identical bytes): "
                        f"{listed}{' ...' if len(clashes) > 5 else ''}. Retrieval on a test image that was "
                        "trained on measures memory: remove the duplicates from one split.")


def _holdout(samples: list[PairSample], val_fraction: float, test_fraction: float, seed: int):
    order = list(samples)
    random.Random(seed).shuffle(order)
    n_test = int(round(len(order) * test_fraction))
    n_val = int(round(len(order) * val_fraction))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _finish(name: str, splits: dict[str, list[PairSample]], val_fraction: float, test_fraction: float,
            seed: int, notes: list[str]) -> dict[str, list[PairSample]]:
    """Named splits as given; without a test (or val) split, a seeded hold-out of the training images."""
    unknown = sorted(set(splits) - set(PAIR_SPLITS))
    if unknown:
        raise DataError(f"pair dataset {name!r}: unknown split name(s) {unknown}; use {list(PAIR_SPLITS)}.")
    if not splits.get("train"):
        raise DataError(f"pair dataset {name!r}: no 'train' split (splits found: {sorted(splits)}).")
    train = splits["train"]
    if "test" not in splits:
        train, _, test = _holdout(train, 0.0, test_fraction, seed)
        splits = dict(splits, train=train, test=test)
        notes.append(f"no test split in the source: held out {len(test)} images ({test_fraction:.0%}, "
                     f"split_seed={seed}) as 'test'")
    if "val" not in splits and val_fraction > 0:
        train, val, _ = _holdout(splits["train"], val_fraction, 0.0, seed + 1)
        splits = dict(splits, train=train, val=val)
        notes.append(f"no val split in the source: held out {len(val)} training images ({val_fraction:.0%}) as 'val' (WiSE-FT α "
                     "and checkpoint selection use it, never test)")
    return {k: splits[k] for k in PAIR_SPLITS if k in splits}


def _split_name(value: str, where: str) -> str:
    aliases = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
    key = str(value).strip().lower()
    if key not in aliases:
        raise DataError(f"{where}: split value {value!r} is not one of {sorted(set(aliases))}.")
    return aliases[key]


def _group(entries: list[tuple[str, Any, str, list[str], Any]], where: str, drop_uncaptioned: bool,
           skipped: list[dict]) -> tuple[dict[str, list[PairSample]], dict[str, Any]]:
    """(id, ref, split, captions, row) entries -> samples per split; rows of one image are merged."""
    order: dict[str, dict] = {}
    for sid, ref, split, captions, row in entries:
        item = order.setdefault(sid, {"ref": ref, "split": split, "captions": [], "rows": []})
        if item["split"] != split:
            raise DataError(f"{where}: image {sid!r} is listed in split {item['split']!r} (row {item['rows'][0]}) "
                            f"and in split {split!r} (row {row}). A test image must never be a training image: "
                            "give each image one split.")
        item["captions"].extend(captions)
        item["rows"].append(row)
    missing = [(sid, item["rows"]) for sid, item in order.items() if not item["captions"]]
    if missing and not drop_uncaptioned:
        listed = ", ".join(f"{sid!r} (row {rows[0]})" for sid, rows in missing[:5])
        raise DataError(f"{where}: {len(missing)} image(s) have no caption: {listed}"
                        f"{' ...' if len(missing) > 5 else ''}. Add their captions, remove them, or pass "
                        "drop_uncaptioned=True to skip them (they are then counted in dataset.skipped).")
    for sid, rows in missing:
        skipped.append({"id": sid, "row": rows[0], "reason": "no caption", "kind": "caption"})
    if missing:
        warnings.warn(f"{where}: skipped {len(missing)} image(s) without a caption (see dataset.skipped).",
                      stacklevel=3)
    splits: dict[str, list[PairSample]] = {}
    rows = {}
    for sid, item in order.items():
        if item["captions"]:
            splits.setdefault(item["split"], []).append(PairSample(sid, item["ref"], tuple(item["captions"])))
            rows[sid] = item["rows"][0]
    return splits, rows


# -- sources ----------------------------------------------------------------------------------

def pairs_from_csv(path, *, image_column: str = "image", caption_columns: str | Sequence[str] = ("caption",),
                   split_column: str | None = None, root=None, name: str | None = None, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, split_seed: int = 0, drop_uncaptioned: bool = False,
                   encoding: str = "utf-8-sig", domain: str | None = None) -> PairDataset:
    """A CSV with one row per image (or per caption): image path, caption column(s), optional split.

    ``caption_columns`` lists every column that holds a caption of the row's image (RSICD-style
    ``sent1 … sent5``); rows naming the same image are merged, so one caption per row works too.
    Relative image paths are resolved against ``root`` (default: the CSV's folder). Without a split
    column, ``test_fraction`` / ``val_fraction`` of the images are held out with ``split_seed``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"pair CSV {str(path)!r} does not exist.")
    root = Path(root).expanduser() if root else path.parent
    name = name or path.stem
    caption_columns = [caption_columns] if isinstance(caption_columns, str) else list(caption_columns)
    if not caption_columns:
        raise ConfigError("pairs_from_csv: caption_columns is empty; name at least one column with captions.")
    columns, rows = read_csv(path, encoding, what="pair CSV")
    where = f"pair CSV {str(path)!r}"
    require_columns(columns, [(image_column, "image_column"), (split_column, "split_column")]
                    + [(c, "caption_columns") for c in caption_columns], where)
    if not rows:
        raise DataError(f"{where} has no rows.")
    for col in caption_columns:
        check_caption_column([r[col] for r in rows], col, where)
    entries = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        rel = _clean(r[image_column])
        if rel is None:
            raise DataError(f"{where}, row {i}: empty image path in column {image_column!r}.")
        p = Path(rel).expanduser()
        full = p if p.is_absolute() else root / p
        if not full.is_file():
            raise DataError(f"{where}, row {i}: image {rel!r} does not exist (looked at {str(full)!r}).")
        sid = os.path.relpath(full, root) if not p.is_absolute() else str(p)
        caps = [c for c in (_clean(r[col]) for col in caption_columns) if c is not None]
        split = _split_name(r[split_column], f"{where}, row {i}") if split_column else "train"
        entries.append((sid, str(full), split, caps, i))
    skipped: list[dict] = []
    splits, row_of = _group(entries, where, drop_uncaptioned, skipped)
    notes: list[str] = []
    splits = _finish(name, splits, val_fraction, test_fraction, split_seed, notes)
    refuse_cross_split_duplicates(splits, where, row_of)
    return PairDataset(name=name, splits=splits, reader=Reader(), skipped=skipped, notes=notes, domain=domain,
                       source={"kind": "csv_pairs", "path": str(path), "image_column": image_column,
                               "caption_columns": caption_columns, "split_column": split_column,
                               "val_fraction": val_fraction, "test_fraction": test_fraction,
                               "split_seed": split_seed})


def pairs_from_karpathy_json(path, *, image_root, name: str | None = None, val_fraction: float = 0.1,
                             split_seed: int = 0, drop_uncaptioned: bool = False,
                             domain: str | None = None) -> PairDataset:
    """Karpathy-style caption JSON (RSICD, RSITMD, UCM-captions): ``{"images": [{"filename",
    "split", "sentences": [{"raw": ...}, ...]}, ...]}``; images under ``image_root``.

    Repeated filenames are merged into one image with all its captions (as RemoteCLIP's
    ``retrieval.py`` ``JsonDataset`` does). ``split`` values train / val / test are kept; RSITMD
    has no val split, so ``val_fraction`` of its training images become ``val``.
    """
    path, image_root = Path(path).expanduser(), Path(image_root).expanduser()
    where = f"caption JSON {str(path)!r}"
    if not path.is_file():
        raise DataError(f"{where} does not exist.")
    if not image_root.is_dir():
        raise DataError(f"{where}: image_root {str(image_root)!r} is not a folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where} is not valid JSON: {err}.") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise DataError(f"{where}: expected a top-level 'images' list (Karpathy format).")
    entries = []
    for i, item in enumerate(images):
        if not isinstance(item, dict) or "filename" not in item:
            raise DataError(f"{where}: images[{i}] has no 'filename'.")
        fname = str(item["filename"])
        full = (image_root / item.get("filepath", "") / fname).resolve()
        if image_root.resolve() not in full.parents:
            raise DataError(f"{where}: images[{i}] filename {fname!r} points outside image_root.")
        if not full.is_file():
            raise DataError(f"{where}: images[{i}]: image {fname!r} not found under {str(image_root)!r}.")
        sentences = item.get("sentences") or []
        caps = [c for c in (_clean(s.get("raw") if isinstance(s, dict) else s) for s in sentences) if c]
        split = _split_name(item.get("split", "train"), f"{where}: images[{i}]")
        entries.append((os.path.relpath(full, image_root.resolve()), str(full), split, caps, f"images[{i}]"))
    skipped: list[dict] = []
    splits, row_of = _group(entries, where, drop_uncaptioned, skipped)
    notes: list[str] = []
    splits = _finish(path.stem if name is None else name, splits, val_fraction, 0.2, split_seed, notes)
    refuse_cross_split_duplicates(splits, where, row_of)
    return PairDataset(name=name or path.stem, splits=splits, reader=Reader(), skipped=skipped, notes=notes,
                       domain=domain, source={"kind": "karpathy_json", "path": str(path),
                                              "image_root": str(image_root)})


class HubPairReader(Reader):
    """Reads row ``i`` of a split's Arrow table (memory-mapped, picklable)."""

    def __init__(self, tables: Mapping[str, Any], image_column: str):
        super().__init__()
        self.tables, self.image_column = dict(tables), image_column

    def __call__(self, ref):
        from .images import open_rgb

        split, i = ref
        return open_rgb(self.tables[split][int(i)][self.image_column])


def _load_hub(repo_id: str, config, revision, cache_dir):
    """The network boundary of :func:`pairs_from_hub`: the classification sources' Hub loader, with the
    offline advice for pairs."""
    from .sources import _load_hub as load_hub

    return load_hub(repo_id, config, None, revision, cache_dir,
                    offline_fix="Load it once with network (same cache_dir), or bring the pairs as a CSV "
                                "(pairs_from_csv).")


def pairs_from_hub(repo_id: str, *, image_column: str = "image", caption_column: str = "caption",
                   id_column: str | None = None, splits: Mapping[str, str] | None = None, name: str | None = None,
                   config: str | None = None, revision: str | None = None, cache_dir=None,
                   val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0,
                   drop_uncaptioned: bool = False, domain: str | None = None) -> PairDataset:
    """A Hub dataset with an image column and a caption column (a string, or a list of strings per
    image as ``danielz01/rsicd``'s ``captions``). ``splits`` maps ours to the repo's
    (default ``train/validation/test``); missing val/test are held out with ``split_seed``.

    With ``id_column`` (ROCO's ``image_id``, RSICD's ``path``) an image listed in two splits is
    refused naming both rows; byte-level duplicates under different ids are not searched in Hub
    tables (that would decode every image; the file sources check them)."""
    explicit = splits is not None
    wanted = dict(splits or {"train": "train", "val": "validation", "test": "test"})
    dd = _load_hub(repo_id, config, revision, cache_dir)
    where = f"Hub dataset {repo_id!r}"
    tables = {}
    for ours, theirs in wanted.items():
        if theirs in dd:
            tables[ours] = dd[theirs]
        elif ours == "train" or explicit:
            raise DataError(f"{where} has no split {theirs!r} (asked for as {ours!r}); it has {list(dd.keys())}."
                            + did_you_mean(theirs, list(dd.keys())))
    entries = []
    for split, table in tables.items():
        columns = list(table.column_names)
        for col, what in ((image_column, "image_column"), (caption_column, "caption_column"),
                          (id_column, "id_column")):
            if col is not None and col not in columns:
                raise DataError(f"{where} has no column {col!r} (set by {what}); columns are {columns}."
                                + did_you_mean(col, columns))
        raw = table[caption_column]
        flat = [c for v in raw for c in (v if isinstance(v, (list, tuple)) else [v])]
        check_caption_column(flat, caption_column, f"{where}, split {split!r}")
        ids = table[id_column] if id_column else None
        for i, v in enumerate(raw):
            caps = [c for c in (_clean(x) for x in (v if isinstance(v, (list, tuple)) else [v])) if c]
            sid = str(ids[i]) if ids is not None else f"{split}/{i}"
            entries.append((sid, (split, i), split, caps, f"{split}[{i}]"))
    skipped: list[dict] = []
    grouped, _ = _group(entries, where, drop_uncaptioned, skipped)
    notes: list[str] = []
    grouped = _finish(name or repo_id, grouped, val_fraction, test_fraction, split_seed, notes)
    return PairDataset(name=name or repo_id.rstrip("/").split("/")[-1], splits=grouped,
                       reader=HubPairReader(tables, image_column), skipped=skipped, notes=notes, domain=domain,
                       source={"kind": "hub_pairs", "repo_id": repo_id, "image_column": image_column,
                               "caption_column": caption_column, "splits": wanted, "config": config,
                               "revision": revision})


# -- the offline paired set --------------------------------------------------------------------

#: caption templates of the offline set: {name} is the readable class name, {tone}/{size} simple attributes
OFFLINE_TEMPLATES = ("a satellite image of {name}.", "an aerial photo showing {name}, {tone}.",
                     "{size} view of {name} seen from above.", "remote sensing scene: {name}.",
                     "a {tone} overhead picture of {name}.")
OFFLINE_CARD = ("Offline paired set: the bundled WHU-RS19 mini images (19 scene classes x 10) with captions "
                "TEMPLATED from their class names and simple image attributes (brightness, a size word). "
                "Retrieval on it measures the plumbing (encoding, chunked recall, training loop), not "
                "language understanding: every caption of a class differs only in its template and attributes.")


def _tone(image) -> str:
    from PIL import ImageStat

    mean = sum(ImageStat.Stat(image.convert("L")).mean) / 1.0
    return "bright" if mean > 140 else "dark" if mean < 90 else "mid-toned"


def offline_pairs(root=None, *, captions_per_image: int = 5, val_fraction: float = 0.2, test_fraction: float = 0.3,
                  split_seed: int = 0) -> PairDataset:
    """The bundled WHU-RS19 mini images (``data/whu_rs19_mini``) with templated captions.

    Each image gets ``captions_per_image`` captions from :data:`OFFLINE_TEMPLATES` filled with its
    readable class name (from ``domains/remote_sensing/whu_rs19_mini.yaml``), its brightness word
    and a size word drawn with a fixed seed. See :data:`OFFLINE_CARD`.
    """
    from ..paths import repo_root
    from ..safe_yaml import load_yaml
    from .images import open_rgb

    root = Path(root) if root else repo_root() / "data" / "whu_rs19_mini"
    spec = load_yaml(repo_root() / "domains" / "remote_sensing" / "whu_rs19_mini.yaml", "dataset YAML")
    names = {str(k): str(v) for k, v in spec["classes"].items()}
    if not 1 <= captions_per_image <= len(OFFLINE_TEMPLATES):
        raise ConfigError(f"offline_pairs: captions_per_image must be 1..{len(OFFLINE_TEMPLATES)}, "
                          f"got {captions_per_image!r}.")
    rng = random.Random(split_seed)
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(folder.glob("*.jpg")):
            tone = _tone(open_rgb(str(img)))
            size = rng.choice(["a wide", "a close", "a large", "a small"])
            caps = tuple(t.format(name=names.get(folder.name, folder.name), tone=tone, size=size)
                         for t in OFFLINE_TEMPLATES[:captions_per_image])
            samples.append(PairSample(f"{folder.name}/{img.name}", str(img), caps))
    notes: list[str] = []
    splits = _finish("whu_rs19_pairs", {"train": samples}, val_fraction, test_fraction, split_seed, notes)
    return PairDataset(name="whu_rs19_pairs", splits=splits, reader=Reader(), notes=notes, domain="remote_sensing",
                       card=OFFLINE_CARD, source={"kind": "offline_pairs", "path": str(root),
                                                  "templates": list(OFFLINE_TEMPLATES[:captions_per_image])})


# -- YAMLs -------------------------------------------------------------------------------------

PAIR_SOURCE_KEYS = {
    "csv_pairs": {"path", "image_column", "caption_columns", "split_column", "root", "val_fraction",
                  "test_fraction", "split_seed"},
    "karpathy_json": {"path", "image_root", "val_fraction", "split_seed"},
    "hub_pairs": {"repo_id", "image_column", "caption_column", "id_column", "splits", "config", "revision",
                  "val_fraction", "test_fraction", "split_seed"},
    "offline_pairs": {"captions_per_image", "val_fraction", "test_fraction", "split_seed"},
}
PAIR_TOP_KEYS = {"name": str, "domain": str, "task": str, "source": dict, "sources": list, "licence": str,
                 "citation": str, "description": str, "splits": dict, "offline": bool, "card": str,
                 "recommended_backbones": list, "notes": str}


def pair_specs_dir() -> list[Path]:
    from ..paths import repo_root

    return sorted((repo_root() / "domains").glob("*/pairs/*.yaml"))


def validate_pair_spec(spec, file: str) -> dict:
    """A pair-dataset YAML (``domains/<domain>/pairs/<name>.yaml``): errors name the file and key."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level.")
    unknown = sorted(set(spec) - set(PAIR_TOP_KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown key {unknown[0]!r}; allowed: {sorted(PAIR_TOP_KEYS)}."
                          + did_you_mean(unknown[0], PAIR_TOP_KEYS))
    for key in ("name", "domain", "task", "licence", "citation"):
        if key not in spec:
            raise ConfigError(f"{file}: missing required key {key!r}.")
    for key, typ in PAIR_TOP_KEYS.items():
        if key in spec and not isinstance(spec[key], typ):
            raise ConfigError(f"{file}: key {key!r}: expected {typ.__name__}, got {spec[key]!r}.")
    from ..task_kinds import task_kind

    if task_kind(spec["task"]).name != "retrieval":
        raise ConfigError(f"{file}: a pair-dataset YAML has task: retrieval, got {spec['task']!r}.")
    sources = list(spec.get("sources") or []) + ([spec["source"]] if "source" in spec else [])
    if not sources:
        raise ConfigError(f"{file}: needs 'source' (or a list 'sources', tried in order).")
    for i, src in enumerate(sources):
        kind = src.get("kind") if isinstance(src, dict) else None
        if kind not in PAIR_SOURCE_KEYS:
            raise ConfigError(f"{file}: sources[{i}].kind: expected one of {sorted(PAIR_SOURCE_KEYS)}, got {kind!r}.")
        extra = sorted(set(src) - PAIR_SOURCE_KEYS[kind] - {"kind"})
        if extra:
            raise ConfigError(f"{file}: unknown key {extra[0]!r} in a {kind!r} source; allowed "
                              f"{sorted(PAIR_SOURCE_KEYS[kind])}." + did_you_mean(extra[0], PAIR_SOURCE_KEYS[kind]))
    return spec


def load_pair_spec(name_or_path) -> dict:
    from ..safe_yaml import load_yaml

    p = Path(str(name_or_path))
    if p.suffix not in (".yaml", ".yml"):
        found = [q for q in pair_specs_dir() if q.stem == str(name_or_path)]
        if not found:
            known = [q.stem for q in pair_specs_dir()]
            raise ConfigError(f"no pair dataset named {str(name_or_path)!r}; known: {known}."
                              + did_you_mean(str(name_or_path), known))
        p = found[0]
    elif not p.is_absolute() and not p.exists():
        from ..paths import repo_root

        p = repo_root() / p   # a notebook's kernel runs in notebooks/: paths from the repository root too
    if not p.is_file():
        raise ConfigError(f"pair-dataset YAML {str(name_or_path)!r} does not exist.")
    spec = validate_pair_spec(load_yaml(p, "pair-dataset YAML"), str(p))   # size/alias caps, no python tags
    spec["_file"] = str(p)
    return spec


def load_pairs(name_or_path, **overrides) -> PairDataset:
    """A :class:`PairDataset` from a pair YAML name (``rsicd``, ``whu_rs19_pairs``) or path.

    Sources are tried in order (e.g. the Karpathy JSON you downloaded, then the Hub copy); the
    last error is raised with every source's reason when none loads.
    """
    from ..paths import repo_root

    spec = load_pair_spec(name_or_path)
    sources = list(spec.get("sources") or []) + ([spec["source"]] if "source" in spec else [])
    reasons = []
    for src in sources:
        src = dict(src, **overrides)
        kind = src.pop("kind")
        for key in ("path", "image_root", "root"):
            if key in src and not Path(src[key]).expanduser().is_absolute():
                src[key] = str(repo_root() / src[key])
        try:
            if kind == "csv_pairs":
                ds = pairs_from_csv(src.pop("path"), name=spec["name"], domain=spec["domain"], **src)
            elif kind == "karpathy_json":
                ds = pairs_from_karpathy_json(src.pop("path"), name=spec["name"], domain=spec["domain"], **src)
            elif kind == "hub_pairs":
                ds = pairs_from_hub(src.pop("repo_id"), name=spec["name"], domain=spec["domain"], **src)
            else:
                ds = offline_pairs(**src)
        except DataError as err:
            reasons.append(f"{kind}: {err}")
            continue
        ds.card = spec.get("card", ds.card)
        ds.source["spec"] = spec["_file"]
        return ds
    raise DataError(f"{spec['_file']}: no source could be loaded:\n  " + "\n  ".join(reasons))
