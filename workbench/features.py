"""Encode a set of images once and keep the features on disk.

A cache entry is keyed by everything that changes the numbers: the backbone's provenance id
(name, pretrained tag, weights hash), its preprocessing, the dataset fingerprint, the exact
sample ids, the number of augmented views, the augmentation and its seed. A second identical
request encodes zero images.

Writes are atomic (temporary file + ``os.replace``), so a run killed mid-write never leaves an
entry that later loads as valid; each entry also stores a checksum of its arrays, so a
truncated or corrupted entry is detected on load and rebuilt.

Augmented views (Tip-Adapter, GDA: 10 passes of RandomResizedCrop + flip over the support set)
are stored per view, ``[views, N, D]``, *before* L2 normalisation (Tip-Adapter averages the raw
view features and normalises the mean); callers choose to keep them as separate normalised
samples (GDA) or average them per image (Tip-Adapter) with :meth:`Features.flat` /
:meth:`Features.mean_views`.
Each view of each image gets its own RNG seed, so results do not depend on batch size or on
the number of DataLoader workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from .data.dataset import Dataset, Sample
from .data.images import UnreadableImage
from .progress import progress

CACHE_FORMAT = 2


@dataclass
class Features:
    """Encoded images: ``raw`` is ``[V, N, D]`` unnormalised (V=1 for the plain eval transform)."""

    raw: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    skipped: list[dict] = field(default_factory=list)
    key: str = ""

    @property
    def views(self) -> torch.Tensor:
        """``[V, N, D]``, each view L2-normalised."""
        return torch.nn.functional.normalize(self.raw, dim=-1)

    @property
    def x(self) -> torch.Tensor:
        """``[N, D]`` normalised: the single eval view, or the view average re-normalised."""
        return self.views[0] if self.raw.shape[0] == 1 else self.mean_views()

    def mean_views(self) -> torch.Tensor:
        """Average the raw view features per image, then L2-normalise (Tip-Adapter's ``build_cache_model``)."""
        return torch.nn.functional.normalize(self.raw.mean(0), dim=-1)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every view as its own sample (GDA): ``([V*N, D], [V*N])``."""
        v, n, d = self.views.shape
        return self.views.reshape(v * n, d), self.labels.repeat(v)

    def __len__(self) -> int:
        return len(self.ids)


class _ImageSet(TorchDataset):
    """Yields (view, position, pixels) or (view, position, reason) for unreadable images."""

    def __init__(self, dataset: Dataset, samples: Sequence[Sample], transform, n_views: int,
                 aug_seed: int | str | None):
        self.reader = dataset.reader
        self.samples = list(samples)
        self.transform = transform
        self.n_views = n_views
        self.aug_seed = aug_seed

    def __len__(self):
        return len(self.samples) * self.n_views

    def __getitem__(self, index):
        view, pos = divmod(index, len(self.samples))
        sample = self.samples[pos]
        try:
            image = self.reader(sample.ref)
        except UnreadableImage as err:
            return view, pos, str(err)
        except Exception as err:  # a reader of a third-party source failing in an unexpected way
            return view, pos, f"{type(err).__name__}: {err}"
        if self.aug_seed is None:
            return view, pos, self.transform(image)
        # One seed per (view, image): identical crops whatever the batch size or worker count.
        seed = int(hashlib.sha256(f"{self.aug_seed}/{view}/{sample.id}".encode()).hexdigest()[:15], 16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return view, pos, self.transform(image)


def _collate(batch):
    good = [(v, p, x) for v, p, x in batch if isinstance(x, torch.Tensor)]
    bad = [(v, p, x) for v, p, x in batch if not isinstance(x, torch.Tensor)]
    if good:
        views = torch.tensor([v for v, _, _ in good])
        pos = torch.tensor([p for _, p, _ in good])
        pixels = torch.stack([x for _, _, x in good])
    else:
        views = pos = torch.zeros(0, dtype=torch.long)
        pixels = None
    return views, pos, pixels, bad


class FeatureCache:
    """Encode-once feature store for one backbone (see the module docstring).

    ``stats`` counts images encoded and cache hits/misses, which tests and the sweep
    benchmark read to prove that nothing is encoded twice.
    """

    def __init__(self, backbone, root: str | os.PathLike | None = None, batch_size: int = 64,
                 num_workers: int = 0, show_progress: bool = True):
        self.backbone = backbone
        self.root = Path(root) if root is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.show_progress = show_progress
        self.stats = {"images_encoded": 0, "hits": 0, "misses": 0, "rebuilt": 0, "sliced": 0}
        self._memory: dict[str, Features] = {}
        self._pools: dict[str, tuple[Features, dict, dict]] = {}

    # -- keys -------------------------------------------------------------------------------
    def key(self, dataset: Dataset, ids: Sequence[str], views: int, aug_seed: int | None,
            aug: dict | None) -> str:
        payload = {
            "format": CACHE_FORMAT,
            "backbone": self.backbone.provenance_id,
            "preprocess": self.backbone.preprocess_id,
            "dataset": dataset.fingerprint(),
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "views": views,
            "aug_seed": aug_seed,
            "aug": aug,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.npz"

    # -- public API -------------------------------------------------------------------------
    def get(self, dataset: Dataset, samples: Sequence[Sample] | Sequence[str], *, views: int = 0,
            aug_seed: int | str = 0, aug_scale: tuple[float, float] = (0.5, 1.0), flip: bool = True,
            desc: str | None = None) -> Features:
        """Features for ``samples``: ``views=0`` is the eval transform; ``views=10`` is 10 augmented passes."""
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        samples = dataset.samples(samples) if samples and isinstance(samples[0], str) else list(samples)
        ids = [s.id for s in samples]
        aug = None if views == 0 else {"scale": list(aug_scale), "flip": flip}
        key = self.key(dataset, ids, views, aug_seed if views else None, aug)
        if key in self._memory:
            self.stats["hits"] += 1
            return self._memory[key]
        if views == 0 and dataset.fingerprint() in self._pools:
            sliced = self._slice(dataset.fingerprint(), ids, key)
            if sliced is not None:
                self.stats["sliced"] += 1
                return sliced
        path = self._path(key)
        if path is not None and path.exists():
            feats = self._load(path, key)
            if feats is not None:
                self.stats["hits"] += 1
                self._memory[key] = feats
                return feats
        self.stats["misses"] += 1
        if views == 0:
            transform, n_views, seed = self.backbone.preprocess, 1, None
        else:
            transform, n_views, seed = self.backbone.augment_transform(aug_scale, flip), views, aug_seed
        feats = self._encode(dataset, samples, transform, n_views, seed, desc or f"encode {dataset.name}")
        feats.key = key
        if path is not None:
            self._save(path, key, feats)
        self._memory[key] = feats
        return feats

    def clear_memory(self) -> None:
        self._memory.clear()
        self._pools.clear()

    def pool(self, dataset: Dataset) -> Features:
        """Encode (or load) every image of every split once; later eval-transform requests on this
        dataset are served as slices of it, whatever their split, K or seed (sweeps: one pass)."""
        fp = dataset.fingerprint()
        if fp in self._pools:
            return self._pools[fp][0]
        samples = [s for split in sorted(dataset.splits) for s in dataset.splits[split]]
        feats = self.get(dataset, samples, desc=f"encode {dataset.name} (all splits)")
        self._pools[fp] = (feats, {i: n for n, i in enumerate(feats.ids)}, {d["id"]: d for d in feats.skipped})
        return feats

    def _slice(self, fingerprint: str, ids: Sequence[str], key: str) -> Features | None:
        feats, index, skipped = self._pools[fingerprint]
        if not all(i in index or i in skipped for i in ids):
            return None
        rows = [index[i] for i in ids if i in index]
        out = Features(raw=feats.raw[:, rows], labels=feats.labels[rows], ids=[i for i in ids if i in index],
                       skipped=[skipped[i] for i in ids if i in skipped], key=key)
        self._memory[key] = out
        return out

    # -- encoding ---------------------------------------------------------------------------
    def _encode(self, dataset, samples, transform, n_views, aug_seed, desc) -> Features:
        n = len(samples)
        dim = None
        out = None
        ok = np.zeros((n_views, n), dtype=bool)
        reasons: dict[int, str] = {}
        loader = DataLoader(_ImageSet(dataset, samples, transform, n_views, aug_seed), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=self.backbone.device.type == "cuda",
                            persistent_workers=False)
        bar = progress(total=n * n_views, desc=desc, unit="img", disable=not self.show_progress)
        for view_idx, pos, pixels, bad in loader:
            for _, p, reason in bad:
                reasons[p] = reason
            if pixels is not None:
                feats = self.backbone.encode_images(pixels, normalize=False).cpu()
                if out is None:
                    dim = feats.shape[-1]
                    out = torch.zeros(n_views, n, dim)
                out[view_idx, pos] = feats
                ok[view_idx.numpy(), pos.numpy()] = True
                self.stats["images_encoded"] += len(pos)
            bar.update(len(pos) + len(bad))
        bar.close()
        keep = ok.all(axis=0)
        skipped = [{"id": samples[p].id, "reason": r} for p, r in sorted(reasons.items())]
        if skipped:
            warnings.warn(f"{desc}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['id']} "
                          f"({skipped[0]['reason']}).", stacklevel=3)
        if out is None:
            raise UnreadableImage(f"{desc}: none of the {n} images could be read; first error: "
                                  f"{skipped[0]['reason'] if skipped else 'no images'}")
        idx = np.flatnonzero(keep)
        labels = torch.tensor([samples[i].label for i in idx], dtype=torch.long)
        return Features(raw=out[:, idx].contiguous(), labels=labels, ids=[samples[i].id for i in idx],
                        skipped=skipped)

    # -- disk -------------------------------------------------------------------------------
    @staticmethod
    def _checksum(views: np.ndarray, labels: np.ndarray, ids: list[str]) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(views).tobytes())
        h.update(np.ascontiguousarray(labels).tobytes())
        h.update("\n".join(ids).encode())
        return h.hexdigest()

    def _save(self, path: Path, key: str, feats: Features) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        views = feats.raw.numpy().astype(np.float32)
        labels = feats.labels.numpy()
        meta = {"key": key, "format": CACHE_FORMAT, "checksum": self._checksum(views, labels, feats.ids),
                "skipped": feats.skipped, "backbone": self.backbone.provenance_id}
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, views=views, labels=labels, ids=np.array(feats.ids, dtype=str),
                         meta=np.array(json.dumps(meta)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _load(self, path: Path, key: str) -> Features | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                views, labels, ids = z["views"], z["labels"], [str(i) for i in z["ids"]]
            if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
                raise ValueError("key or format mismatch")
            if self._checksum(views, labels, ids) != meta["checksum"]:
                raise ValueError("checksum mismatch")
        except Exception as err:
            warnings.warn(f"feature cache entry {path.name} is unreadable or corrupt ({type(err).__name__}: {err}); "
                          "rebuilding it.", stacklevel=3)
            self.stats["rebuilt"] += 1
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return Features(raw=torch.from_numpy(views), labels=torch.from_numpy(labels), ids=ids,
                        skipped=meta.get("skipped", []), key=key)
