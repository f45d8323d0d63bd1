"""The encode input pipeline: DataLoader workers, out-of-memory halving, channels-last, compile."""
import dataclasses
import multiprocessing
import os

import pytest
import torch

import workbench as wb
import workbench.features as features_module
from workbench.errors import BackboneError, ConfigError
from workbench.features import resolve_num_workers


def test_auto_workers_only_on_an_accelerator_for_encodes_of_several_batches_and_never_in_a_daemon(monkeypatch):
    import workbench.distributed as distributed

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 64)   # the machine's count is not what we may use
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_num_workers("auto", 100, 64) == 0           # under two batches: not worth starting workers
    assert resolve_num_workers("auto", 1000, 64) == 8           # capped, one core left to the main process
    assert resolve_num_workers("auto", 1000, 64, "cpu") == 0    # a CPU encoder needs the cores itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                 # four torchrun ranks share the 16 cores
    assert resolve_num_workers("auto", 1000, 64) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_num_workers("auto", 1000, 64) == 1
    assert resolve_num_workers(3, 10, 64, "cpu") == 3            # an explicit number is obeyed
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert resolve_num_workers("auto", 1000, 64) == 0           # a sweep's pool worker may not have children


@pytest.mark.parametrize("kwargs, match", [({"num_workers": -1}, "num_workers"), ({"num_workers": "many"}, "num_workers"),
                                           ({"batch_size": 0}, "batch_size"), ({"channels_last": "yes"}, "channels_last")])
def test_bad_pipeline_settings_name_the_parameter(backbone, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        wb.FeatureCache(backbone, None, **kwargs)


def test_workers_decode_in_worker_processes_with_the_same_features(backbone, shapes, monkeypatch):
    ids = shapes.split("test")[:40]
    started = []
    real_loader = features_module.DataLoader

    def spy(*args, **kwargs):
        started.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(features_module, "DataLoader", spy)
    two = wb.FeatureCache(backbone, None, batch_size=8, num_workers=2, show_progress=False).get(shapes, ids)
    auto = wb.FeatureCache(backbone, None, batch_size=8, show_progress=False).get(shapes, ids)
    assert started == [2, 0 if backbone.device.type == "cpu" else min(8, max(1, os.cpu_count() - 1))]
    assert torch.equal(auto.raw, two.raw) and auto.ids == two.ids


class _SmallGPU:
    """A backbone whose encoder runs out of memory above ``limit`` images per call."""

    def __init__(self, backbone, limit):
        self._backbone, self.limit, self.calls = backbone, limit, []

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def encode_images(self, pixels, normalize=True):
        self.calls.append(len(pixels))
        if len(pixels) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._backbone.encode_images(pixels, normalize=normalize)


def test_out_of_memory_halves_the_encode_batch_keeps_it_and_loses_nothing(backbone, shapes):
    ids = shapes.split("test")[:20]
    small = _SmallGPU(backbone, limit=3)
    cache = wb.FeatureCache(small, None, batch_size=16, num_workers=0, show_progress=False)
    with pytest.warns(UserWarning, match="out of memory at an encode batch of 16; retrying at 8"):
        feats = cache.get(shapes, ids)
    reference = wb.FeatureCache(backbone, None, batch_size=16, num_workers=0, show_progress=False).get(shapes, ids)
    assert torch.allclose(feats.raw, reference.raw, atol=1e-5) and feats.ids == reference.ids
    assert cache.encode_batch_size == 2 and cache.oom_halvings == 3
    assert small.calls[:4] == [16, 8, 4, 2]
    assert max(small.calls[4:]) == 2        # later batches go straight to the size that fits


def test_out_of_memory_on_a_single_image_is_a_clear_error(backbone, shapes):
    cache = wb.FeatureCache(_SmallGPU(backbone, limit=0), None, batch_size=4, num_workers=0, show_progress=False)
    with pytest.warns(UserWarning), pytest.raises(BackboneError, match="out of memory encoding a single image.*"
                                                  "precision='amp_fp16' or precision='amp_bf16'"):
        cache.get(shapes, shapes.split("test")[:4])


def test_channels_last_and_compile_encode_the_same_features(backbone, shapes, monkeypatch):
    ids = shapes.split("test")[:8]
    compiled = []

    def fake_compile(fn, **kwargs):  # torch.compile's own cost is minutes on a CPU; check the wiring
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = wb.FeatureCache(backbone, None, num_workers=0, show_progress=False).get(shapes, ids)
    own = dataclasses.replace(backbone, model=__import__("copy").deepcopy(backbone.model), _text_cache={})
    fast = wb.FeatureCache(own, None, num_workers=0, show_progress=False, channels_last=True, compile=True)
    feats = fast.get(shapes, ids)
    assert len(compiled) == 1 and compiled[0].__name__ == "encode_image"
    assert torch.allclose(feats.raw, plain.raw, atol=1e-5)
    assert wb.FeatureCache(backbone, None).channels_last is (backbone.device.type == "cuda")


def test_training_augmentation_in_worker_processes_gives_the_main_process_pixels(backbone):
    from PIL import Image

    from workbench.training import ImageBatches

    rng = __import__("numpy").random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype="uint8")) for _ in range(10)]
    labels = list(range(10))
    transform = backbone.augment_transform((0.3, 1.0), True)

    def epochs(batches, shard=None):
        out = []
        for epoch in range(2):
            gen = torch.Generator().manual_seed(epoch)
            it = batches(epoch, gen) if shard is None else batches.shard(epoch, gen, *shard)
            out.append([b[0] if shard is None else b[0][0] for b in it])
        return out

    serial = ImageBatches(images, labels, transform, 4, seed=3, device=torch.device("cpu"), num_workers=0)
    parallel = ImageBatches(images, labels, transform, 4, seed=3, device=torch.device("cpu"), num_workers=2)
    for a, b in zip(epochs(serial), epochs(parallel)):
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert parallel._loader is not None and parallel._loader.num_workers == 2   # the workers did the work
    for a, b in zip(epochs(serial, (1, 2)), epochs(parallel, (1, 2))):          # a torchrun rank's slices too
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    auto = ImageBatches(images, labels, transform, 8, seed=3, device=torch.device("cpu"))
    list(auto(0, torch.Generator().manual_seed(0)))
    assert auto._loader is None     # under two batches of images: no worker processes started


def test_encoding_and_worker_augmentation_leave_the_global_rng_alone(backbone, shapes):
    from PIL import Image

    from workbench.training import ImageBatches

    torch.manual_seed(123)
    before = torch.get_rng_state()
    wb.FeatureCache(backbone, None, batch_size=4, num_workers=2, show_progress=False).get(shapes, shapes.split("test")[:12])
    images = [Image.new("RGB", (40, 40), (i * 20, 0, 0)) for i in range(8)]
    batches = ImageBatches(images, list(range(8)), backbone.augment_transform((0.5, 1.0), True), 2, seed=1,
                           device=torch.device("cpu"), num_workers=2)
    for epoch in range(2):
        list(batches(epoch, torch.Generator().manual_seed(epoch)))
    # dropout draws from this state: a resumed run must draw what the uninterrupted one drew
    assert torch.equal(torch.get_rng_state(), before)
