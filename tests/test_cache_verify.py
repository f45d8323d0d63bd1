"""How the feature cache knows an image file is unchanged (issue 20): ``verify="stat"`` (the default:
size + modification time) and ``verify="hash"`` (the bytes, hashed while decoding)."""
import builtins
import os

import pytest
import torch
from PIL import Image

from workbench.data.dataset import Dataset, Sample
from workbench.errors import ConfigError
from workbench.features import FeatureCache

RED, GREEN, BLUE, GREY = (200, 20, 20), (20, 200, 20), (20, 20, 200), (128, 128, 128)


def _folder(root, colours):
    """Two classes x 3 BMPs of 24x24 (uncompressed: every file has the same size), flat colours."""
    samples = []
    for label, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            path = root / cls / f"{i}.bmp"
            Image.new("RGB", (24, 24), colours[label]).save(path)
            samples.append(Sample(f"{cls}/{i}.bmp", label, str(path)))
    return Dataset("folder", ["a", "b"], ["a", "b"], {"train": samples})


def _replace_keeping_size_and_mtime(path, colour):
    """Another image in the same file: same size, the old modification time restored."""
    before = os.stat(path)
    Image.new("RGB", (24, 24), colour).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture
def opened(monkeypatch, tmp_path):
    """Paths under ``tmp_path/imgs`` opened from now on (PIL opens files through builtins.open too)."""
    paths = []
    real_open = builtins.open
    root = str(tmp_path / "imgs")

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(root):
            paths.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return paths


def _cache(backbone, root, **kw):
    return FeatureCache(backbone, root, num_workers=0, show_progress=False, **kw)


def test_default_mode_is_stat_and_trusts_size_and_modification_time(backbone, tmp_path, opened):
    ds = _folder(tmp_path / "imgs", [RED, GREEN])
    opened.clear()
    first = _cache(backbone, tmp_path / "cache").get(ds, ds.split("train"))
    assert len(opened) == 6                                       # each file read once, to decode it
    _replace_keeping_size_and_mtime(ds.split("train")[0].ref, BLUE)
    opened.clear()
    again = _cache(backbone, tmp_path / "cache")
    assert again.verify == "stat"
    stale = again.get(ds, ds.split("train"))
    # the documented limit of the default: a replacement that keeps size and mtime is not seen ...
    assert again.stats["images_encoded"] == 0 and torch.equal(stale.raw, first.raw)
    assert opened == []                                           # ... because no file is read on a hit
    os.utime(ds.split("train")[0].ref)                            # a plain replacement (new mtime) is seen
    fresh = _cache(backbone, tmp_path / "cache")
    fresh.get(ds, ds.split("train"))
    assert fresh.stats["images_encoded"] == 6


def test_hash_mode_re_encodes_a_same_size_replacement_with_its_mtime_restored(backbone, tmp_path, opened):
    ds = _folder(tmp_path / "imgs", [RED, GREEN])
    train = ds.split("train")
    opened.clear()
    first = _cache(backbone, tmp_path / "cache", verify="hash").get(ds, train)
    assert sorted(opened) == sorted(s.ref for s in train)       # hashed while decoding: one read per file
    opened.clear()

    again = _cache(backbone, tmp_path / "cache", verify="hash")
    assert torch.equal(again.get(ds, train).raw, first.raw)
    assert again.stats["images_encoded"] == 0 and again.stats["hits"] == 1
    assert sorted(opened) == sorted(s.ref for s in train)       # a hit: each file read once, none decoded
    opened.clear()

    _replace_keeping_size_and_mtime(train[0].ref, BLUE)
    _replace_keeping_size_and_mtime(train[4].ref, GREY)
    opened.clear()
    expected = _cache(backbone, None).get(ds, train)              # the new content, encoded from scratch
    assert not torch.allclose(expected.raw, first.raw, atol=1e-3)
    opened.clear()
    checked = _cache(backbone, tmp_path / "cache", verify="hash")
    got = checked.get(ds, train)                                  # from disk: the entry is refused
    assert checked.changed == 1 and checked.stats["images_encoded"] == 6
    assert len(opened) == 12                                      # checked (6 reads), then re-encoded (6)
    assert torch.allclose(got.raw, expected.raw, atol=1e-5)
    opened.clear()

    _replace_keeping_size_and_mtime(train[0].ref, RED)            # the same cache object's memory checks too
    _replace_keeping_size_and_mtime(train[4].ref, GREEN)
    back = checked.get(ds, train)
    assert checked.changed == 2 and checked.stats["images_encoded"] == 12
    assert torch.allclose(back.raw, first.raw, atol=1e-5)
    assert checked.get(ds, train) is back and checked.changed == 2  # unchanged: served from memory


def test_hash_mode_checks_pool_slices_and_unreadable_files(backbone, tmp_path):
    ds = _folder(tmp_path / "imgs", [RED, GREEN])
    train = ds.split("train")
    broken = tmp_path / "imgs" / "b" / "3.bmp"
    broken.write_bytes(b"BM" + bytes(1726))                       # not an image: skipped, but hashed
    ds.splits["train"].append(Sample("b/3.bmp", 1, str(broken)))
    cache = _cache(backbone, None, verify="hash")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        pooled = cache.pool(ds)
    assert len(pooled) == 6 and cache.get(ds, train[:3]) is not None and cache.stats["sliced"] == 1
    _replace_keeping_size_and_mtime(train[1].ref, BLUE)
    sliced = cache.get(ds, train[1:3])                            # changed since the pool: encoded afresh
    assert cache.stats["sliced"] == 1 and cache.stats["misses"] == 2
    assert torch.allclose(sliced.raw, _cache(backbone, None).get(ds, train[1:3]).raw, atol=1e-5)


def test_verify_takes_stat_or_hash():
    with pytest.raises(ConfigError, match="verify must be 'stat'.*or 'hash'"):
        FeatureCache(None, None, verify="content")
