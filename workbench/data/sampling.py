"""Few-shot splits: K support images per class plus a small validation set, written to a file.

Protocol (CoOp's, which the adaptation papers share): K training images per class and a
validation set of ``min(K, 4)`` images per class. The validation images come from the
dataset's own ``val`` split when it has one, otherwise from the training pool, disjoint from
the support images. The test split is never sampled from, and never read by fitting or
selection.

The sampled ids are saved as ``<split_dir>/<dataset>/shots{K}_seed{S}_val{V}.json`` and reused,
so every method sees the same images for the same (dataset, K, seed). K larger than a class's
training images is refused (:class:`~workbench.errors.DataError` naming the smallest class and
its count) and points to the budget mode; a class short of *validation* images gives what it
has, with a warning, and the shortfall is recorded in the file.

**Budget mode** (imbalanced sets, e.g. medical): ``budget=N`` draws N support images in total
instead of K per class, written to ``budget{N}_{allocation}_seed{S}_val{V}.json``:

* ``allocation="proportional"``: class c gets ``N·n_c/Σn`` images (n_c its training images),
  at least 1, rounded by largest remainder, so the support set keeps the data's class balance;
* ``allocation="uniform"``: equal shares, each capped at the class's size, the images a small
  class cannot take going to the others in equal shares (water-filling); a remainder that does
  not divide goes to the classes with the most images left (ties: class order).

The split's ``shots`` is then the mean per class, ``max(1, round(N / C))`` (what K-dependent
defaults such as CoOp's epochs use), ``per_class`` the count drawn per class, and the
validation set ``min(max(1, N // C), 4)`` images per class unless ``val_shots`` says otherwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..paths import safe_name
from .dataset import Dataset, Sample

SPLIT_FORMAT = 1


@dataclass
class FewShotSplit:
    dataset: str
    fingerprint: str
    shots: int
    seed: int
    val_shots: int
    train_ids: list[str]
    val_ids: list[str]
    val_source: str                                   # "val" split or "train" pool
    shortfalls: dict = field(default_factory=dict)    # class id -> {"train": got, "val": got}
    format: int = SPLIT_FORMAT
    budget: int | None = None                         # budget mode: support images in total
    allocation: str | None = None                     # budget mode: "proportional" or "uniform"
    per_class: dict = field(default_factory=dict)     # budget mode: class id -> support images drawn

    @property
    def sha(self) -> str:
        """Hash of the sampled ids: goes into every result's provenance."""
        return hashlib.sha256(json.dumps([self.train_ids, self.val_ids]).encode()).hexdigest()[:16]

    def train(self, dataset: Dataset) -> list[Sample]:
        check_split_is_leak_free(self, dataset)
        return dataset.samples(self.train_ids)

    def val(self, dataset: Dataset) -> list[Sample]:
        check_split_is_leak_free(self, dataset)
        return dataset.samples(self.val_ids)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".split.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self), f, indent=1)
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise ConfigError(f"cannot write split file {str(path)!r}: {err.strerror or err} (full disk or read-only "
                              "split_dir?). An older file there is intact; free space, fix the permissions or "
                              "pass another split_dir.") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FewShotSplit":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"split file {str(path)!r} is unreadable ({type(err).__name__}: {err}); delete it to "
                            "resample.") from None


def check_split_is_leak_free(split: FewShotSplit, dataset: Dataset, where: str | None = None) -> None:
    """Refuse a split whose support or validation ids reach the test split, or overlap each other.

    A split file is plain JSON: an edited (or foreign) file could put a test image into
    ``train_ids`` and every number computed from it would be inflated without a word. Ids that
    name the same file under another spelling cannot pass either: the sources make one id per
    file and refuse one file in two splits.
    """
    where = where or f"few-shot split of dataset {dataset.name!r} ({split.shots}-shot, seed {split.seed})"
    test = {s.id for s in dataset.splits.get("test", [])}
    problems = []
    for field_name, ids in (("train_ids", split.train_ids), ("val_ids", split.val_ids)):
        leaked = [i for i in ids if i in test]
        if leaked:
            problems.append(f"{len(leaked)} id(s) in {field_name} are test images: {leaked[:5]}")
    both = sorted(set(split.train_ids) & set(split.val_ids))
    if both:
        problems.append(f"{len(both)} id(s) are both support and validation images: {both[:5]}")
    for field_name, ids in (("train_ids", split.train_ids), ("val_ids", split.val_ids)):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            problems.append(f"{len(repeated)} id(s) repeated in {field_name}: {repeated[:5]}")
    if problems:
        raise DataError(f"{where}: refused, it would leak or double-count images — " + "; ".join(problems)
                        + ". Delete the split file to resample it.")


def _as_int(value, parameter: str, minimum: int | None = None):
    """``value`` as a Python int (numpy integers accepted); bools, floats, None and strings refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{parameter} must be an integer, got {value!r} ({type(value).__name__})."
                          + (" A seed is required: pass e.g. seed=1." if value is None and parameter == "seed" else ""))
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{parameter} must be an integer >= {minimum}, got {value}.")
    return value


def _draw(pool: list[Sample], k: int, rng: random.Random) -> list[Sample]:
    pool = sorted(pool, key=lambda s: s.id)
    return rng.sample(pool, min(k, len(pool)))


ALLOCATIONS = ("proportional", "uniform")


def allocate_budget(budget: int, available: list[int], allocation: str) -> list[int]:
    """Support images per class for a total ``budget`` over classes with ``available`` training images."""
    c = len(available)
    if allocation == "proportional":
        total = sum(available)
        quotas = [budget * n / total for n in available]
        counts = [max(1, math.floor(q)) for q in quotas]
        # largest remainders first (ties: class order); a class never exceeds its images
        order = sorted(range(c), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
        while sum(counts) < budget:
            for i in order:
                if sum(counts) < budget and counts[i] < available[i]:
                    counts[i] += 1
        while sum(counts) > budget:   # the at-least-1 floor overshot: take from the largest shares
            i = max(range(c), key=lambda j: (counts[j], -j))
            counts[i] -= 1
        return counts
    counts = [0] * c
    left = budget
    while left:
        room = [i for i in range(c) if counts[i] < available[i]]
        share = left // len(room)
        if share == 0:   # the remainder: to the classes with the most images left, then class order
            for i in sorted(room, key=lambda j: (-(available[j] - counts[j]), j))[:left]:
                counts[i] += 1
            break
        for i in room:
            take = min(share, available[i] - counts[i])
            counts[i] += take
            left -= take
    return counts


def sample_few_shot(dataset: Dataset, shots: int | None, seed: int, *, val_shots: int | None = None,
                    split_dir: str | os.PathLike | None = None, budget: int | None = None,
                    allocation: str = "proportional") -> FewShotSplit:
    """Sample (or reload) the K-shot split of ``dataset`` for ``seed``; or, with ``budget=N``
    (``shots=None``), N support images in total shared out by ``allocation`` (module docstring).

    With ``split_dir`` the split is read from / written to a JSON file there. An existing file
    made from a different version of the dataset (other fingerprint) is an error rather than a
    silent resample, so published results stay reproducible.
    """
    seed = _as_int(seed, "seed")
    train_pool = dataset.split("train")
    class_sizes = [sum(1 for s in train_pool if s.label == label) for label in range(dataset.n_classes)]
    if budget is not None:
        if shots is not None:
            raise ConfigError("pass either shots (images per class) or budget (images in total), not both.")
        budget = _as_int(budget, "budget (support images in total)", minimum=1)
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
        empty = [cid for cid, n in zip(dataset.class_ids, class_sizes) if n == 0]
        if empty:
            raise DataError(f"dataset {dataset.name!r}: class {empty[0]!r} has no training images to sample from.")
        if budget < dataset.n_classes or budget > sum(class_sizes):
            raise ConfigError(f"budget={budget} for dataset {dataset.name!r}: it must be between the number of "
                              f"classes ({dataset.n_classes}, one image each) and the training images "
                              f"({sum(class_sizes)}).")
        per_class = allocate_budget(budget, class_sizes, allocation)
        shots = max(1, round(budget / dataset.n_classes))
        default_val = min(max(1, budget // dataset.n_classes), 4)
        name = f"budget{budget}_{allocation}"
    else:
        shots = _as_int(shots, "shots (images per class)", minimum=1)
        _check_classes_hold(dataset, shots, class_sizes)
        per_class = [shots] * dataset.n_classes
        default_val = min(shots, 4)
        name = f"shots{shots}"
    val_shots = default_val if val_shots is None else _as_int(val_shots, "val_shots", minimum=0)
    path = None
    if split_dir is not None:
        path = Path(split_dir) / safe_name(dataset.name, "dataset name") / f"{name}_seed{seed}_val{val_shots}.json"
        if path.exists():
            split = FewShotSplit.load(path)
            if split.fingerprint != dataset.fingerprint():
                raise DataError(f"split file {str(path)!r} was made from another version of dataset "
                                f"{dataset.name!r} (fingerprint {split.fingerprint} vs {dataset.fingerprint()}). "
                                "Delete the file to resample, or point split_dir elsewhere.")
            check_split_is_leak_free(split, dataset, where=f"split file {str(path)!r}")
            _warn_shortfalls(dataset.name, split)
            return split

    val_from_split = dataset.has_split("val") and len(dataset.split("val")) > 0
    val_pool = dataset.split("val") if val_from_split else []
    train_ids, val_ids, shortfalls = [], [], {}
    for label, cid in enumerate(dataset.class_ids):
        # Seeded per class by a string: reproducible across Python runs and platforms.
        rng = random.Random(f"fewshot/{seed}/{shots if budget is None else name}/{cid}")
        own = [s for s in train_pool if s.label == label]
        if not own:
            raise DataError(f"dataset {dataset.name!r}: class {cid!r} has no training images to sample from.")
        chosen = _draw(own, per_class[label], rng)
        if val_from_split:
            vpool = [s for s in val_pool if s.label == label]
        else:
            taken = {s.id for s in chosen}
            vpool = [s for s in own if s.id not in taken]
        vchosen = _draw(vpool, val_shots, rng)
        if len(chosen) < per_class[label] or len(vchosen) < val_shots:
            shortfalls[cid] = {"train": len(chosen), "val": len(vchosen)}
        train_ids += [s.id for s in chosen]
        val_ids += [s.id for s in vchosen]
    split = FewShotSplit(dataset=dataset.name, fingerprint=dataset.fingerprint(), shots=shots, seed=seed,
                         val_shots=val_shots, train_ids=train_ids, val_ids=val_ids,
                         val_source="val" if val_from_split else "train", shortfalls=shortfalls,
                         budget=budget, allocation=allocation if budget is not None else None,
                         per_class=dict(zip(dataset.class_ids, per_class)) if budget is not None else {})
    _warn_shortfalls(dataset.name, split)
    if path is not None:
        split.save(path)
    return split


def check_shots_fit(dataset: Dataset, shots: int) -> None:
    """Refuse, before any work, a K larger than some class's training images (the DataError of sampling)."""
    train_pool = dataset.split("train")
    if train_pool and getattr(train_pool[0], "targets", None) is not None:   # multi-label: positives per finding
        class_sizes = [sum(1 for s in train_pool if s.targets[label] == 1) for label in range(dataset.n_classes)]
    else:
        class_sizes = [sum(1 for s in train_pool if s.label == label) for label in range(dataset.n_classes)]
    _check_classes_hold(dataset, shots, class_sizes)


def _check_classes_hold(dataset: Dataset, shots: int, class_sizes: list[int]) -> None:
    """K support images per class must exist in every class: else a DataError naming the smallest class."""
    short = [(n, cid) for cid, n in zip(dataset.class_ids, class_sizes) if n < shots]
    if not short:
        return
    n, cid = min(short)
    if n == 0:
        raise DataError(f"dataset {dataset.name!r}: class {cid!r} has no training images to sample from.")
    others = f" ({len(short) - 1} other class(es) also have fewer than {shots})" if len(short) > 1 else ""
    raise DataError(
        f"dataset {dataset.name!r}: shots={shots} images per class, but class {cid!r} has only {n} training "
        f"image(s){others}. Use shots <= {n}, or draw a total budget instead of K per class: "
        f"sample_few_shot(dataset, None, seed, budget=N, allocation='proportional' or 'uniform'), "
        f"or budgets=[N] in compare / run_experiment(..., budget=N); N between {dataset.n_classes} and "
        f"{sum(class_sizes)}.")


_WARNED: set = set()


def _warn_shortfalls(name: str, split: FewShotSplit) -> None:
    """Warn once per split and process (every method reuses the split; the record keeps the details)."""
    key = (split.fingerprint, split.shots, split.seed, split.val_shots, split.budget, split.allocation)
    if split.shortfalls and key not in _WARNED:
        _WARNED.add(key)
        asked = split.per_class or {}   # budget mode: each class's own share
        items = ", ".join(f"{c}: {v['train']}/{asked.get(c, split.shots)} train, {v['val']}/{split.val_shots} val"
                          for c, v in list(split.shortfalls.items())[:5])
        more = f" (+{len(split.shortfalls) - 5} more)" if len(split.shortfalls) > 5 else ""
        what = f"budget {split.budget} ({split.allocation})" if split.budget else f"{split.shots}-shot"
        warnings.warn(f"dataset {name!r}, {what} seed {split.seed}: {len(split.shortfalls)} class(es) "
                      f"have fewer images than asked, using what there is — {items}{more}. Recorded in the split "
                      "file and in each run's provenance.", stacklevel=3)
