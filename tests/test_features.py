import numpy as np
import pytest
import torch

import workbench as wb
from workbench.data.dataset import Dataset, Sample


def test_second_identical_request_encodes_nothing(cache, shapes):
    ids = shapes.split("train")[:12]
    first = cache.get(shapes, ids)
    assert cache.stats["images_encoded"] == 12
    fresh = wb.FeatureCache(cache.backbone, cache.root, show_progress=False)  # new process, same disk
    second = fresh.get(shapes, ids)
    assert fresh.stats == {"images_encoded": 0, "hits": 1, "misses": 0, "rebuilt": 0, "sliced": 0}
    assert torch.equal(first.views, second.views) and first.ids == second.ids
    assert torch.allclose(first.x.norm(dim=-1), torch.ones(12), atol=1e-5)


def test_key_changes_with_views_seed_ids_and_backbone(cache, shapes):
    ids = [s.id for s in shapes.split("train")[:4]]
    keys = {cache.key(shapes, ids, 0, None, None), cache.key(shapes, ids, 10, 0, {"scale": [0.5, 1]}),
            cache.key(shapes, ids, 10, 1, {"scale": [0.5, 1]}), cache.key(shapes, ids[:3], 0, None, None)}
    other = wb.FeatureCache(wb.load_backbone(seed=1), cache.root)
    keys.add(other.key(shapes, ids, 0, None, None))
    assert len(keys) == 5


def test_views_are_deterministic_whatever_the_batching(backbone, shapes, tmp_path):
    ids = shapes.split("train")[:6]
    a = wb.FeatureCache(backbone, None, batch_size=64, show_progress=False).get(shapes, ids, views=3, aug_seed=5)
    b = wb.FeatureCache(backbone, None, batch_size=4, num_workers=2, show_progress=False).get(shapes, ids, views=3,
                                                                                             aug_seed=5)
    assert a.views.shape == (3, 6, 128)
    assert torch.allclose(a.views, b.views, atol=1e-6)
    assert not torch.allclose(a.views[0], a.views[1])  # the views really differ
    x, y = a.flat()
    assert x.shape == (18, 128) and y.tolist() == a.labels.tolist() * 3
    assert torch.allclose(a.mean_views().norm(dim=-1), torch.ones(6), atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage"])
def test_corrupt_entry_is_detected_and_rebuilt(cache, shapes, damage):
    ids = shapes.split("train")[:5]
    good = cache.get(shapes, ids)
    path = next(cache.root.glob("*.npz"))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_bytes":
        start = raw.find(b"views.npy") + 200  # inside the stored features
        raw[start:start + 8] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    else:
        raw = b"junk"
    path.write_bytes(bytes(raw))
    fresh = wb.FeatureCache(cache.backbone, cache.root, show_progress=False)
    with pytest.warns(UserWarning, match="corrupt"):
        again = fresh.get(shapes, ids)
    assert fresh.stats["rebuilt"] == 1 and fresh.stats["images_encoded"] == 5
    assert torch.allclose(good.views, again.views)


def test_interrupted_write_leaves_no_entry(cache, shapes, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.get(shapes, shapes.split("train")[:3])
    assert list(cache.root.iterdir()) == []  # neither an entry nor a temp file
    monkeypatch.undo()
    fresh = wb.FeatureCache(cache.backbone, cache.root, show_progress=False)
    fresh.get(shapes, shapes.split("train")[:3])
    assert fresh.stats["misses"] == 1 and len(list(cache.root.glob("*.npz"))) == 1


def test_unreadable_images_at_encode_time_are_skipped(backbone, tmp_path):
    from PIL import Image

    good = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"nope")
    ds = Dataset("d", ["x"], ["x"], {"train": [Sample("a", 0, str(good)), Sample("b", 0, str(bad))]})
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        feats = wb.FeatureCache(backbone, None, show_progress=False).get(ds, ds.split("train"))
    assert feats.ids == ["a"] and feats.skipped[0]["id"] == "b"


def test_pool_serves_every_split_request_as_a_slice(backbone, shapes, tmp_path):
    cache = wb.FeatureCache(backbone, tmp_path, show_progress=False)
    pool = cache.pool(shapes)
    n = sum(len(v) for v in shapes.splits.values())
    assert cache.stats["images_encoded"] == n and len(pool) == n
    direct = wb.FeatureCache(backbone, None, show_progress=False).get(shapes, shapes.split("test")[:7])
    sliced = cache.get(shapes, shapes.split("test")[:7])
    assert cache.stats == {"images_encoded": n, "hits": 0, "misses": 1, "rebuilt": 0, "sliced": 1}
    assert sliced.ids == direct.ids and torch.allclose(sliced.views, direct.views, atol=1e-5)
    cache.get(shapes, shapes.split("train")[:4], views=2)  # augmented views are not in the pool
    assert cache.stats["images_encoded"] == n + 8
