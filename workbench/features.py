"""Encode a set of images once and keep the features on disk.

A cache entry is keyed by everything that changes the numbers: the backbone's provenance id
(name, pretrained tag, weights hash), its preprocessing, the dataset fingerprint, the exact
sample ids, the *content* of the images (:func:`content_signature`), the number of augmented
views, the augmentation and its seed. A second identical request encodes zero images.

Content is checked cheaply on every request: an image file by its size and modification time
(nanoseconds) — one ``stat`` per file, no reading, so a 10k-image test split costs ~10 ms per
request — and in-memory sources by a hash of their bytes (arrays of a ``.npz``, computed once per
array object) or by their own fingerprint (a Hub ``datasets`` table). Replacing an image by another
of the same name therefore re-encodes it — unless the new file has the same size and its
modification time was set back to the old one: ``FeatureCache(..., verify="hash")`` checks image
files by a SHA-256 of their bytes instead, hashed while each file is read for decoding (one read on
a miss), and serves an entry only after re-reading and hashing every file (one read per file and
request, no decode). ``"stat"`` stays the default: it costs no reading at all, and the files it
cannot tell apart are ones someone deliberately disguised.

A cache write that fails (full disk, read-only folder) loses nothing: the features are kept in
memory for this process and a warning names the path.

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

Input pipeline. Decoding and preprocessing run in DataLoader worker processes
(``num_workers="auto"``: on a GPU up to 8, one core left to the main process; none when the
encoder itself runs on the CPU, for encodes of fewer than two batches, or inside a daemonic sweep
worker, which may not start children), with pinned
memory and non-blocking copies on CUDA, so the encoder is not left waiting on the JPEG decoder.
On CUDA the pixels go in ``channels_last`` (``channels_last="auto"``; reordered on the device,
after the pinned, non-blocking copy) and ``compile=True`` encodes through ``torch.compile``.
A CUDA out-of-memory error halves the encode batch and
retries (down to one image; then a clear error): ``encode_batch_size`` records what ran.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from .data.dataset import Dataset, Reader, Sample
from .data.images import UnreadableImage
from .distributed import decoder_budget
from .errors import BackboneError, ConfigError
from .progress import progress

CACHE_FORMAT = 3
#: encodes shorter than this (seconds) show no progress bar at all
PROGRESS_DELAY_S = 2.0


# -- content of the images, for the cache key ------------------------------------------------

_ARRAY_HASHES: dict[int, tuple[weakref.ref, str]] = {}


def _array_hash(arr: np.ndarray) -> str:
    """SHA-256 of an in-memory array, computed once per array object (arrays are not mutated in place)."""
    memo = _ARRAY_HASHES.get(id(arr))
    if memo is not None and memo[0]() is arr:
        return memo[1]
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).data)
    digest = h.hexdigest()[:20]
    try:
        _ARRAY_HASHES[id(arr)] = (weakref.ref(arr), digest)
    except TypeError:  # an array type without weak references: just do not memoise
        pass
    return digest


def reader_token(reader) -> str:
    """What the reader contributes to the images' content: a reader's own ``content_fingerprint()``,
    the hashes of in-memory arrays (``.npz``), the fingerprints of Hub tables, or its settings."""
    name = f"{type(reader).__module__}.{type(reader).__qualname__}"
    own = getattr(reader, "content_fingerprint", None)
    if callable(own):
        return f"{name}:{own()}"
    arrays = getattr(reader, "arrays", None)
    if isinstance(arrays, dict) and all(isinstance(a, np.ndarray) for a in arrays.values()):
        return f"{name}:" + ",".join(f"{k}={_array_hash(a)}" for k, a in sorted(arrays.items()))
    tables = getattr(reader, "tables", None)
    if isinstance(tables, dict):
        return f"{name}:" + ",".join(f"{k}={getattr(t, '_fingerprint', None)}" for k, t in sorted(tables.items()))
    try:
        return f"{name}:{json.dumps(vars(reader), sort_keys=True)}"
    except TypeError:  # settings that are not plain values: the reader's class is all we can key on
        return name


def ref_token(ref) -> str:
    """A file by size + mtime (ns), in-memory images/arrays/bytes by a hash, anything else by nothing
    (row indices of arrays or Hub tables: their content is in :func:`reader_token`)."""
    if isinstance(ref, (str, os.PathLike)):
        try:
            st = os.stat(ref)
        except OSError:
            return "missing"
        return f"{st.st_size}:{st.st_mtime_ns}"
    if isinstance(ref, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(ref).data).hexdigest()[:16]
    if isinstance(ref, (bytes, bytearray)):
        return hashlib.sha256(ref).hexdigest()[:16]
    if hasattr(ref, "tobytes") and hasattr(ref, "size") and hasattr(ref, "mode"):  # a PIL image
        return hashlib.sha256(f"{ref.mode}{ref.size}".encode() + ref.tobytes()).hexdigest()[:16]
    return ""


#: ``verify=`` modes of :class:`FeatureCache`: how an image file's content is checked
VERIFY_MODES = ("stat", "hash")
#: the token of a file in a ``verify="hash"`` entry's key: its bytes are checked against the entry instead
_HASHED_FILE = "file:hash-verified"


def _is_file_ref(ref) -> bool:
    return isinstance(ref, (str, os.PathLike))


def file_digest(data: bytes) -> str:
    """The content token of a file's bytes in ``verify="hash"`` mode."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:24]


def read_digest(ref) -> str:
    """:func:`file_digest` of the file at ``ref`` (one read), or ``"missing"``."""
    try:
        with open(ref, "rb") as f:
            return file_digest(f.read())
    except OSError:
        return "missing"


def content_signature(dataset, samples: Sequence[Sample]) -> str:
    """Hash of the content of ``samples`` as they would be read now (see the module docstring)."""
    return _content_hash(reader_token(dataset.reader), [ref_token(s.ref) for s in samples])


def _content_hash(reader: str, tokens: Sequence[str]) -> str:
    return hashlib.sha256((reader + "\n" + "\n".join(tokens)).encode()).hexdigest()[:32]


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
    """Yields (view, position, pixels, digest) or (view, position, reason, digest) for unreadable images.

    ``hash_files``: the first view of each image file also yields :func:`file_digest` of its bytes,
    read once: a plain :class:`~workbench.data.dataset.Reader` then decodes those same bytes (a
    custom reader opens the file itself, a second read). ``digest`` is None otherwise.
    """

    def __init__(self, dataset: Dataset, samples: Sequence[Sample], transform, n_views: int,
                 aug_seed: int | str | None, hash_files: bool = False):
        self.reader = dataset.reader
        self.samples = list(samples)
        self.transform = transform
        self.n_views = n_views
        self.aug_seed = aug_seed
        self.hash_files = hash_files
        self._decodes_bytes = type(self.reader).__call__ is Reader.__call__

    def __len__(self):
        return len(self.samples) * self.n_views

    def __getitem__(self, index):
        view, pos = divmod(index, len(self.samples))
        sample = self.samples[pos]
        ref, digest = sample.ref, None
        if self.hash_files and view == 0 and _is_file_ref(ref):
            try:
                with open(ref, "rb") as f:
                    data = f.read()
            except OSError:
                digest = "missing"  # the reader says why, below
            else:
                digest = file_digest(data)
                if self._decodes_bytes:
                    ref = data
        try:
            image = self.reader(ref)
        except UnreadableImage as err:
            return view, pos, str(err), digest
        except Exception as err:  # a reader of a third-party source failing in an unexpected way
            return view, pos, f"{type(err).__name__}: {err}", digest
        if self.aug_seed is None:
            return view, pos, self.transform(image), digest
        # One seed per (view, image): identical crops whatever the batch size or worker count.
        seed = int(hashlib.sha256(f"{self.aug_seed}/{view}/{sample.id}".encode()).hexdigest()[:15], 16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return view, pos, self.transform(image), digest


def _collate(batch):
    """``(views, positions, pixels, bad, digests)``: ``bad`` as (view, position, reason), ``digests``
    as (position, digest) for the items that carry one."""
    good = [(v, p, x) for v, p, x, _ in batch if isinstance(x, torch.Tensor)]
    bad = [(v, p, x) for v, p, x, _ in batch if not isinstance(x, torch.Tensor)]
    digests = [(p, d) for _, p, _, d in batch if d is not None]
    if good:
        views = torch.tensor([v for v, _, _ in good])
        pos = torch.tensor([p for _, p, _ in good])
        pixels = torch.stack([x for _, _, x in good])
    else:
        views = pos = torch.zeros(0, dtype=torch.long)
        pixels = None
    return views, pos, pixels, bad, digests


#: most DataLoader workers ``num_workers="auto"`` starts (decoding rarely needs more to feed one GPU)
MAX_AUTO_WORKERS = 8


def resolve_num_workers(num_workers: int | str, n_items: int, batch_size: int, device_type: str = "cuda") -> int:
    """DataLoader workers for an encode (or augmentation) of ``n_items`` images (see the module docstring).

    ``"auto"`` starts workers only when the model runs on an accelerator: on a CPU the encoder's
    threads already use the cores, and a decoding worker competes with them (measured on 2 cores:
    the whole pipeline ran at 0.64 of the encode rate with no worker and 0.40 with one).
    """
    if num_workers == "auto":
        if device_type == "cpu" or n_items < 2 * batch_size or multiprocessing.current_process().daemon:
            return 0  # the CPU is the encoder's; a batch or two is not worth starting workers; daemons may not fork
        # this process's share of the cores it may run on (affinity, torchrun ranks), not os.cpu_count()
        return min(MAX_AUTO_WORKERS, max(1, decoder_budget()))
    return int(num_workers)


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def to_encoder_input(pixels: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Pixels as the encoder takes them: first copied to ``device`` (from the DataLoader's pinned
    buffer, asynchronously), then reordered to channels-last *on the device*.

    The other order makes the reorder an unpinned CPU copy in the main thread, which also turns the
    non-blocking host-to-device copy into a synchronous one (issue 27: ~33 ms per 64 images of
    224 px, by the issue's reading; not measured here, no GPU).
    """
    pixels = pixels.to(device, non_blocking=True)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return pixels


def encoder_function(backbone, channels_last: bool = False, compile: bool = False):
    """``pixels -> raw (unnormalised) float32 features`` on the backbone's device: the backbone's
    encode, in channels-last and/or through ``torch.compile`` as asked. Holds the backbone only."""
    if channels_last:
        backbone.model.to(memory_format=torch.channels_last)  # the patch convolution's weights
    device = backbone.device
    if not compile:
        def encode(pixels):
            return backbone.encode_images(to_encoder_input(pixels, device, channels_last), normalize=False)
    else:
        compiled = torch.compile(backbone.model.encode_image)

        def encode(pixels):
            pixels = to_encoder_input(pixels, device, channels_last)
            with torch.inference_mode(), backbone.autocast():
                return compiled(pixels).float()
    return encode


def out_of_memory_fixes(precision: str) -> str:
    """What to try after an out-of-memory error at one image, with the names ``load_backbone`` accepts."""
    fixes = ["free GPU memory (other processes, a trained model still held)"]
    if precision == "fp32":
        fixes.append("load the backbone with precision='amp_fp16' or precision='amp_bf16' (mixed precision)")
    fixes.append("load the backbone on another device (device='cuda:1', 'cpu')")
    return "; ".join(fixes).capitalize() + "."


class ChunkedEncoder:
    """Encode a stack of pixels of any length in chunks of at most ``batch_size`` images, with the
    features gathered on the CPU; a CUDA out-of-memory error halves the chunk and retries (down to
    one image, then a :class:`BackboneError` naming the fixes), and the halved size is kept for
    later calls. ``encode_batch_size`` is the chunk size that last ran, ``halvings`` the count.

    :class:`FeatureCache` encodes through one; methods that encode images with their own adapted
    model (CLIP-LoRA's validation for ``wise_alpha="val"``) use one too.
    """

    def __init__(self, encode, batch_size: int, device: torch.device, *, name: str = "encoder",
                 precision: str = "fp32"):
        self.encode, self.batch_size, self.device = encode, int(batch_size), torch.device(device)
        self.name, self.precision = name, precision
        self.chunk_limit: int | None = None
        self.halvings = 0
        self.encode_batch_size: int | None = None

    def __call__(self, pixels: torch.Tensor, stacklevel: int = 2) -> torch.Tensor:
        while True:
            chunk = min(self.chunk_limit or self.batch_size, max(1, len(pixels)))
            try:
                out = torch.cat([self.encode(pixels[i:i + chunk]).cpu() for i in range(0, len(pixels), chunk)])
                self.encode_batch_size = self.chunk_limit or self.batch_size
                return out
            except Exception as err:
                if not _is_out_of_memory(err):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if chunk == 1:
                    raise BackboneError(
                        f"{self.name}: out of memory encoding a single image on {self.device} ({err}). "
                        f"{out_of_memory_fixes(self.precision)}") from None
                self.chunk_limit = max(1, chunk // 2)
                self.halvings += 1
                warnings.warn(f"{self.name}: out of memory at an encode batch of {chunk}; retrying at "
                              f"{self.chunk_limit}, kept for the later batches (a FeatureCache records it in "
                              "encode_batch_size).", stacklevel=stacklevel)


class FeatureCache:
    """Encode-once feature store for one backbone (see the module docstring).

    ``stats`` counts images encoded and cache hits/misses, which tests and the sweep
    benchmark read to prove that nothing is encoded twice; ``encode_batch_size`` is the batch
    size the encoder last ran at (smaller than ``batch_size`` after an out-of-memory halving).

    ``num_workers``: DataLoader worker processes that decode and preprocess, or ``"auto"``.
    ``channels_last``: pixels (and the patch convolution) in channels-last memory format;
    ``"auto"`` = on CUDA only. ``compile``: encode through ``torch.compile(model.encode_image)``.

    ``verify``: how an image *file* is known to be unchanged since its features were computed.
    ``"stat"`` (the default): by its size and modification time, one ``stat`` per file and request,
    no reading. ``"hash"``: by a SHA-256 of its bytes, taken while the file is read for decoding (no
    second read on a miss); a cached entry is served only after every file is read again and its
    hash matches (a read, no decode, per file and request), so an image replaced by another of the
    same size with its modification time restored is re-encoded. In-memory sources (arrays, Hub
    tables, bytes) are keyed by their content in both modes.
    """

    def __init__(self, backbone, root: str | os.PathLike | None = None, batch_size: int = 64,
                 num_workers: int | str = "auto", show_progress: bool = True, *,
                 channels_last: bool | str = "auto", compile: bool = False, verify: str = "stat"):
        if verify not in VERIFY_MODES:
            raise ConfigError(f"FeatureCache: verify must be 'stat' (size + modification time, the default) or 'hash' "
                              f"(a hash of each file's bytes), got {verify!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"FeatureCache: batch_size must be a positive integer, got {batch_size!r}.")
        if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                      or num_workers < 0):
            raise ConfigError(f"FeatureCache: num_workers must be 'auto' or an integer >= 0 (0 decodes in the "
                              f"main process), got {num_workers!r}.")
        if channels_last not in ("auto", True, False):
            raise ConfigError(f"FeatureCache: channels_last must be 'auto', True or False, got {channels_last!r}.")
        self.backbone = backbone
        self.root = Path(root) if root is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.show_progress = show_progress
        device = getattr(backbone, "device", torch.device("cpu"))
        self.channels_last = device.type == "cuda" if channels_last == "auto" else bool(channels_last)
        self.compile = bool(compile)
        self.verify = verify
        self._encode_fn: ChunkedEncoder | None = None  # built at the first encode; keeps a halved size
        self.stats = {"images_encoded": 0, "hits": 0, "misses": 0, "rebuilt": 0, "sliced": 0}
        #: verify="hash": entries found but refused (re-encoded) because a file's bytes had changed
        self.changed = 0
        #: the batch size the encoder last ran at (below ``batch_size`` after out-of-memory halvings)
        self.encode_batch_size: int | None = None
        self.oom_halvings = 0
        #: cache files that could not be written (full disk, read-only folder); their features stay in memory
        self.write_failures: list[str] = []
        self._memory: dict[str, Features] = {}
        self._view_keys: set[str] = set()  # the in-memory entries that hold augmented views (clear_views)
        self._pools: dict[str, tuple[Features, dict, dict, dict]] = {}
        self._tokens: dict[str, list[str]] = {}  # verify="hash": each in-memory entry's per-sample content

    # -- keys -------------------------------------------------------------------------------
    def key(self, dataset: Dataset, ids: Sequence[str], views: int, aug_seed: int | None,
            aug: dict | None, content: str | None = None) -> str:
        """The entry's key; ``content`` is :func:`content_signature` of the samples (computed if not given)."""
        ids = [i if isinstance(i, str) else i.id for i in ids]
        if content is None:
            samples = dataset.samples(ids)
            content = (_content_hash(reader_token(dataset.reader), self._address_tokens(samples))
                       if self.verify == "hash" and any(_is_file_ref(s.ref) for s in samples)
                       else content_signature(dataset, samples))
        payload = {
            "format": CACHE_FORMAT,
            "backbone": self.backbone.provenance_id,
            "preprocess": self.backbone.preprocess_id,
            "dataset": dataset.fingerprint(),
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "content": content,
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
        reader = reader_token(dataset.reader)
        # "stat": one stat per file (cheap, catches replaced images); "hash": files are read only when
        # an entry exists to check them against (on a miss they are hashed while being decoded).
        # In-memory sources are keyed by their content in both modes: nothing to verify.
        hashed = self.verify == "hash" and any(_is_file_ref(s.ref) for s in samples)
        tokens = None if hashed else [ref_token(s.ref) for s in samples]
        content = _content_hash(reader, self._address_tokens(samples) if hashed else tokens)
        key = self.key(dataset, ids, views, aug_seed if views else None, aug, content=content)

        def current():  # verify="hash": the files' content now (one read each, no decode)
            nonlocal tokens
            if tokens is None:
                tokens = [read_digest(s.ref) if _is_file_ref(s.ref) else ref_token(s.ref) for s in samples]
            return tokens

        changed = False  # verify="hash": an entry was found but a file's bytes differ from it
        if key in self._memory:
            if not hashed or self._tokens.get(key) == current():
                self.stats["hits"] += 1
                return self._memory[key]
            changed = True
            self._forget(key)
        if views == 0 and dataset.fingerprint() in self._pools:
            sliced = self._slice(dataset.fingerprint(), ids, key, reader, current() if hashed else tokens)
            if sliced is not None:
                self.stats["sliced"] += 1
                return sliced
        path = self._path(key)
        if path is not None and path.exists():
            feats, written = self._load(path, key)
            if feats is not None and hashed and written != _content_hash(reader, current()):
                changed = True
                feats = None  # a file's bytes changed since the entry was written: encode afresh (overwrites it)
            if feats is not None:
                self.stats["hits"] += 1
                self._remember(key, feats, views, tokens)
                return feats
        self.stats["misses"] += 1
        self.changed += changed
        if views == 0:
            transform, n_views, seed = self.backbone.preprocess, 1, None
        else:
            transform, n_views, seed = self.backbone.augment_transform(aug_scale, flip), views, aug_seed
        feats, digests = self._encode(dataset, samples, transform, n_views, seed,
                                      desc or f"encode {dataset.name}", hash_files=hashed)
        feats.key = key
        if hashed:  # what was decoded, hashed from the same bytes
            tokens = [digests.get(n, "missing") if _is_file_ref(smp.ref) else ref_token(smp.ref)
                      for n, smp in enumerate(samples)]
        if path is not None:
            try:
                self._save(path, key, feats, content=_content_hash(reader, tokens) if hashed else None)
            except OSError as err:  # full disk, read-only folder: keep the computed features, say where
                self.write_failures.append(str(path))
                if len(self.write_failures) == 1:
                    warnings.warn(f"could not write feature cache file {str(path)!r} ({type(err).__name__}: {err}); "
                                  "keeping the features in memory for this session only (later failures of this "
                                  "cache are listed in cache.write_failures). Free disk space or choose another "
                                  "cache folder to keep them across sessions.", stacklevel=2)
        self._remember(key, feats, views, tokens)
        return feats

    def _address_tokens(self, samples: Sequence[Sample]) -> list[str]:
        """verify="hash": the key leaves the files' content out (it is checked against the entry)."""
        return [_HASHED_FILE if _is_file_ref(s.ref) else ref_token(s.ref) for s in samples]

    def _forget(self, key: str) -> None:
        self._memory.pop(key, None)
        self._view_keys.discard(key)
        self._tokens.pop(key, None)

    def _remember(self, key: str, feats: Features, views: int, tokens: list[str] | None = None) -> None:
        self._memory[key] = feats
        if views:
            self._view_keys.add(key)
        if self.verify == "hash":
            self._tokens[key] = list(tokens)

    def clear_memory(self) -> None:
        """Forget every in-memory entry and pool (files on disk stay)."""
        self._memory.clear()
        self._pools.clear()
        self._view_keys.clear()
        self._tokens.clear()

    def clear_views(self) -> int:
        """Forget the in-memory augmented views (``views > 0``), keeping eval features and pools; returns
        how many entries were dropped. Views are per support set, so a sweep's next cell (another K,
        seed or method) rarely reuses them, and held across cells they add up (CoOp's 200 views of a
        16-shot ImageNet support set are ~6.5 GB); a later request loads them from disk or re-encodes.
        The sweep calls it between cells."""
        keys = [k for k in self._memory if k in self._view_keys]
        for k in keys:
            self._forget(k)
        return len(keys)

    def pool(self, dataset: Dataset, samples: Sequence[Sample] | None = None) -> Features:
        """Encode (or load) every image of every split once; later eval-transform requests on this
        dataset are served as slices of it, whatever their split, K or seed (sweeps: one pass).

        ``samples``: pool only these (a sweep passes its cells' K-shot images plus test); a
        request outside them is encoded on its own, as without a pool."""
        fp = dataset.fingerprint()
        if fp in self._pools and (samples is None or all(s.id in self._pools[fp][3]["refs"] for s in samples)):
            return self._pools[fp][0]
        samples = [s for split in sorted(dataset.splits) for s in dataset.splits[split]] if samples is None \
            else list(samples)
        feats = self.get(dataset, samples, desc=f"encode {dataset.name} (pool)")
        tokens = self._tokens.get(feats.key) if self.verify == "hash" else None
        refs = dict(zip((s.id for s in samples), tokens)) if tokens is not None else \
            {s.id: ref_token(s.ref) for s in samples}
        content = {"reader": reader_token(dataset.reader), "refs": refs}
        self._pools[fp] = (feats, {i: n for n, i in enumerate(feats.ids)}, {d["id"]: d for d in feats.skipped},
                           content)
        return feats

    def _slice(self, fingerprint: str, ids: Sequence[str], key: str, reader: str,
               tokens: Sequence[str]) -> Features | None:
        feats, index, skipped, content = self._pools[fingerprint]
        if not all(i in index or i in skipped for i in ids):
            return None
        if reader != content["reader"] or any(content["refs"].get(i) != t for i, t in zip(ids, tokens)):
            return None  # an image changed since the pool was encoded: encode afresh
        rows = [index[i] for i in ids if i in index]
        out = Features(raw=feats.raw[:, rows], labels=feats.labels[rows], ids=[i for i in ids if i in index],
                       skipped=[skipped[i] for i in ids if i in skipped], key=key)
        self._remember(key, out, 0, tokens)
        return out

    # -- encoding ---------------------------------------------------------------------------
    def _encoder(self) -> "ChunkedEncoder":
        """The backbone's encode (channels-last and/or compiled as asked) behind the OOM halving.

        Built by a module-level function, so nothing it holds refers back to this cache: dropping
        the cache and the backbone frees the model at once, without waiting for a garbage
        collection (a sweep's parent releases its GPU this way before the workers start).
        """
        if self._encode_fn is None:
            self._encode_fn = ChunkedEncoder(
                encoder_function(self.backbone, self.channels_last, self.compile), self.batch_size,
                self.backbone.device, name=self.backbone.name, precision=self.backbone.precision)
        return self._encode_fn

    def _encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode ``pixels``, halving the chunk size on an out-of-memory error (kept for later batches)."""
        encoder = self._encoder()
        try:
            return encoder(pixels, stacklevel=5)
        finally:
            self.encode_batch_size = encoder.encode_batch_size
            self.oom_halvings = encoder.halvings

    def _encode(self, dataset, samples, transform, n_views, aug_seed, desc,
                hash_files: bool = False) -> tuple[Features, dict[int, str]]:
        """The features of ``samples`` and, with ``hash_files``, each image file's digest by position."""
        n = len(samples)
        digests: dict[int, str] = {}
        dim = None
        out = None
        ok = np.zeros((n_views, n), dtype=bool)
        reasons: dict[int, str] = {}
        workers = resolve_num_workers(self.num_workers, n * n_views, self.batch_size, self.backbone.device.type)
        loader = DataLoader(_ImageSet(dataset, samples, transform, n_views, aug_seed, hash_files),
                            batch_size=self.batch_size,
                            shuffle=False, num_workers=workers, collate_fn=_collate,
                            pin_memory=self.backbone.device.type == "cuda",
                            persistent_workers=False,
                            generator=torch.Generator().manual_seed(0))  # leave the global RNG untouched
        # Only shown when encoding takes long (tqdm's delay): small encodes and cache hits print nothing.
        bar = progress(total=n * n_views, desc=desc, unit="img", disable=not self.show_progress, leave=False,
                       delay=PROGRESS_DELAY_S)
        for view_idx, pos, pixels, bad, batch_digests in loader:
            digests.update(batch_digests)
            for _, p, reason in bad:
                reasons[p] = reason
            if pixels is not None:
                feats = self._encode_batch(pixels)
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
                        skipped=skipped), digests

    # -- disk -------------------------------------------------------------------------------
    @staticmethod
    def _checksum(views: np.ndarray, labels: np.ndarray, ids: list[str]) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(views).tobytes())
        h.update(np.ascontiguousarray(labels).tobytes())
        h.update("\n".join(ids).encode())
        return h.hexdigest()

    def _save(self, path: Path, key: str, feats: Features, content: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        views = feats.raw.numpy().astype(np.float32)
        labels = feats.labels.numpy()
        meta = {"key": key, "format": CACHE_FORMAT, "checksum": self._checksum(views, labels, feats.ids),
                "skipped": feats.skipped, "backbone": self.backbone.provenance_id, "content": content}
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

    def _load(self, path: Path, key: str) -> tuple[Features | None, str | None]:
        """The entry and the content hash it was written with (``verify="hash"``; else None)."""
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
            return None, None
        return (Features(raw=torch.from_numpy(views), labels=torch.from_numpy(labels), ids=ids,
                         skipped=meta.get("skipped", []), key=key), meta.get("content"))
