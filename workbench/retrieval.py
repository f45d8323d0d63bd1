"""Image–text retrieval: R@1/5/10 both ways and mean recall, from cached embeddings, in chunks.

The protocol is RemoteCLIP's (Liu, Chen et al., IEEE TGRS 2024; ChenDelong1999/RemoteCLIP
``retrieval.py::retrieval_evaluation``), which calls ``recall_at_k`` of LAION's CLIP_benchmark
(``clip_benchmark/metrics/zeroshot_retrieval.py``):

* every caption is a text query; an image with five captions contributes five queries;
* **text→image R@k**: a caption scores 1 when *its* image is among the k images most similar to
  it; averaged over all captions;
* **image→text R@k**: an image scores 1 when *at least one* of its captions is among the k
  captions most similar to it (the reference's ``recall > 0``); averaged over images;
* both ×100; **mean recall** = the arithmetic mean of the six numbers.

Deliberate difference: the reference materialises the full texts × images score matrix (and a
one-hot of the top-k, ``texts × k × images``); here the scores are computed in row chunks sized
by a memory budget and each query's hit is decided by the *rank* of its best positive (the count
of candidates ranked before it), so 50,000 images × 250,000 captions never sit in memory at once.
Exact score ties (duplicate captions are common in RSICD) are broken by index, as a stable
descending sort does; ``torch.topk`` leaves their order unspecified, so on tied scores the
reference itself is not deterministic. Tested against a float64 brute force with a stable argsort.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

KS = (1, 5, 10)
#: memory for one chunk of scores (float32) by default
CHUNK_MEMORY_MB = 256
RETRIEVAL_COLUMNS = ["mean_recall", *(f"i2t_R@{k}" for k in KS), *(f"t2i_R@{k}" for k in KS), "n_captions",
                     "captions_truncated"]


def _rows_per_chunk(n_cols: int, memory_mb: float) -> int:
    # per cell: the scores (4 bytes) and the top-k selection's work space
    return max(1, int(memory_mb * 2**20 // (8 * max(n_cols, 1))))


def retrieval_recalls(image_features: torch.Tensor, text_features: torch.Tensor, text_image: Sequence[int],
                      ks: Sequence[int] = KS, memory_mb: float = CHUNK_MEMORY_MB,
                      device: torch.device | str | None = None) -> dict:
    """Recall@k both ways and mean recall (×100) from L2-normalised features.

    ``text_image[t]`` is the index (row of ``image_features``) of the image caption ``t``
    describes. Work is done in chunks of rows whose score block fits ``memory_mb``.
    """
    img = F.normalize(torch.as_tensor(image_features).float(), dim=-1)
    txt = F.normalize(torch.as_tensor(text_features).float(), dim=-1)
    owner = torch.as_tensor(list(text_image) if not torch.is_tensor(text_image) else text_image, dtype=torch.long)
    n_img, n_txt = len(img), len(txt)
    if len(owner) != n_txt:
        raise ConfigError(f"retrieval: {n_txt} text features but {len(owner)} caption owners.")
    if n_img == 0 or n_txt == 0:
        raise DataError("retrieval: no images or no captions to evaluate.")
    if owner.min() < 0 or owner.max() >= n_img:
        raise DataError(f"retrieval: a caption names image {int(owner.max())}, outside 0..{n_img - 1}.")
    captions_per_image = torch.bincount(owner, minlength=n_img)
    if (captions_per_image == 0).any():
        bad = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise DataError(f"retrieval: image(s) {bad} have no caption; every image needs at least one.")
    ks = sorted({int(k) for k in ks})
    device = torch.device(device) if device is not None else img.device
    img_d, txt_d, owner_d = img.to(device), txt.to(device), owner.to(device)

    # One pass over chunks of images: each score block (images x all captions) serves both directions,
    # so every score is computed once, as in the reference's single matrix. Only ranks below max(ks)
    # matter: a query's rank is counted among the top scores of its row (exact below max(ks)); rows
    # with a score tie in that range (rare, except for duplicate captions) are recounted exactly with
    # the lower-index-first rule.
    n_caps = int(captions_per_image.max())
    order = torch.argsort(owner, stable=True)
    slot = torch.arange(n_txt) - torch.repeat_interleave(torch.cumsum(captions_per_image, 0) - captions_per_image,
                                                         captions_per_image)
    caption_table = torch.full((n_img, n_caps), -1, dtype=torch.long)
    caption_table[owner[order], slot] = order                   # image -> its caption indices (-1: none)
    caption_table = caption_table.to(device)
    top_t, top_i = min(ks[-1], n_txt), min(ks[-1], n_img)
    i2t_rank = torch.empty(n_img, dtype=torch.long)
    t2i_top = torch.full((top_i, n_txt), float("-inf"), device=device)   # per caption: its best image scores
    t2i_own = torch.empty(n_txt, device=device)                           # per caption: its own image's score
    text_index = torch.arange(n_txt, device=device)
    step = _rows_per_chunk(n_txt, memory_mb)
    for start in range(0, n_img, step):
        scores = img_d[start:start + step] @ txt_d.T
        stop = start + len(scores)
        caps = caption_table[start:stop]
        own = scores.gather(1, caps.clamp(min=0)).masked_fill(caps < 0, float("-inf"))
        # image -> text: rank of the image's first caption in a stable order (best score, lowest index)
        best = own.amax(1, keepdim=True)
        top = torch.topk(scores, top_t, dim=1).values
        rank = (top > best).sum(1)
        tied = torch.nonzero((top == best).sum(1) > 1).flatten()
        if len(tied):
            first = torch.where(own[tied] == best[tied], caps[tied], n_txt).amin(1, keepdim=True)
            row = scores[tied]
            rank[tied] = ((row > best[tied]) | ((row == best[tied]) & (text_index[None, :] < first))).sum(1)
        i2t_rank[start:stop] = rank.cpu()
        # text -> image: keep each caption's top scores over the images seen so far, and its own score
        inside = (owner_d >= start) & (owner_d < stop)
        t2i_own[inside] = scores[owner_d[inside] - start, text_index[inside]]
        block = torch.topk(scores, min(top_i, len(scores)), dim=0).values
        t2i_top = torch.topk(torch.cat([t2i_top, block]), top_i, dim=0).values
    own = t2i_own[None, :]
    t2i_rank = (t2i_top > own).sum(0)
    tied = torch.nonzero((t2i_top == own).sum(0) > 1).flatten()
    if len(tied):
        image_index = torch.arange(n_img, device=device)
        for part in tied.split(_rows_per_chunk(n_img, memory_mb)):
            row = txt_d[part] @ img_d.T
            mine = owner_d[part, None]
            own_part = row.gather(1, mine)   # from this same product, so ties compare equal bits
            t2i_rank[part] = ((row > own_part) | ((row == own_part) & (image_index[None, :] < mine))).sum(1)
    t2i_rank = t2i_rank.cpu()

    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank < k).double().mean()) * 100
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i_rank < k).double().mean()) * 100
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _text_cache_path(cache, backbone, texts: Sequence[str]) -> Path | None:
    root = getattr(cache, "root", None)
    if root is None:
        return None
    h = hashlib.sha256(json.dumps([backbone.provenance_id, list(texts)], ensure_ascii=False).encode()).hexdigest()
    return Path(root) / "text" / f"{h[:32]}.safetensors"


def text_embeddings(backbone, texts: Sequence[str], cache=None, batch_size: int = 256) -> torch.Tensor:
    """Normalised caption embeddings, cached on disk next to the image features (keyed by the
    backbone's weights and the exact texts; safetensors, never a pickle)."""
    from safetensors.torch import load_file, save_file

    path = _text_cache_path(cache, backbone, texts)
    if path is not None and path.exists():
        feats = load_file(str(path)).get("text")
        if feats is not None and len(feats) == len(texts):
            return feats
    chunks = []
    tokens_all = list(texts)
    for start in range(0, len(tokens_all), batch_size):
        tokens = backbone.tokenize(tokens_all[start:start + batch_size]).to(backbone.device)
        with torch.inference_mode(), backbone.autocast():
            chunks.append(F.normalize(backbone.model.encode_text(tokens).float(), dim=-1).cpu())
    feats = torch.cat(chunks) if chunks else torch.zeros(0, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"text": feats.contiguous()}, str(tmp))
        tmp.replace(path)
    return feats


def pair_embeddings(pairs, backbone, split: str = "test", cache=None) -> dict:
    """``{"image", "text", "owner", "truncation"}`` for one split: image features through the one
    :class:`~workbench.features.FeatureCache`, caption features cached beside them."""
    from .features import FeatureCache

    cache = cache if cache is not None else FeatureCache(backbone, None, show_progress=False)
    view = pairs.image_view()
    samples = view.split(split)
    if not samples:
        raise DataError(f"pair dataset {pairs.name!r}: split {split!r} is empty.")
    image = F.normalize(cache.get(view, samples, desc=f"encode {pairs.name}/{split}").x.float(), dim=-1)
    texts, owner = pairs.texts(split)
    return {"image": image, "text": text_embeddings(backbone, texts, cache), "owner": owner,
            "truncation": caption_truncation(texts, backbone.tokenizer)}


def evaluate_retrieval(pairs, backbone, split: str = "test", cache=None, memory_mb: float = CHUNK_MEMORY_MB) -> dict:
    """Recalls of ``backbone`` on ``split`` of a pair dataset, with counts (see :func:`retrieval_recalls`)."""
    emb = pair_embeddings(pairs, backbone, split, cache)
    scores = retrieval_recalls(emb["image"], emb["text"], emb["owner"], memory_mb=memory_mb,
                               device=backbone.device)
    return {**scores, "n_images": len(emb["image"]), "n_captions": len(emb["text"]),
            "captions_truncated": emb["truncation"]["truncated"], "truncation": emb["truncation"]}


# -- caption length ----------------------------------------------------------------------------

def caption_truncation(captions: Sequence[str], tokenizer) -> dict:
    """How many captions exceed the tokenizer's text context (its tokenizer truncates them).

    ``{"context_length", "truncated", "longest_tokens", "total"}``: the count goes into the
    report and the result row (``captions_truncated``), never silently lost.
    """
    from .towers.prompts import _word_count, context_length

    limit = context_length(tokenizer)
    lengths = [_word_count(tokenizer, c) + 2 for c in captions]   # + start and end tokens
    over = [n for n in lengths if n > limit]
    return {"context_length": limit, "truncated": len(over), "longest_tokens": max(lengths, default=0),
            "total": len(lengths)}
