"""The CUDA paths of issue 27, provoked on a CPU: a released model is freed at once, pixels reach the
device before their layout changes, the out-of-memory hint names accepted precisions, a bare
``cuda`` under torchrun is the process's own GPU, augmented views stay on the CPU, CLIP-LoRA's
validation encode is chunked and out-of-memory safe."""
import copy
import dataclasses
import gc
import re
import weakref

import pytest
import torch

import workbench as wb
import workbench.features as features_module
from workbench.backbones import PRECISIONS, resolve_device, resolve_precision
from workbench.errors import BackboneError, ConfigError


def _own(backbone):
    """A backbone with its own model copy (tests below change the model or let it go)."""
    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model), _text_cache={})


# -- a released model is freed without a garbage collection -----------------------------------

def test_releasing_cache_and_backbone_frees_the_model_without_a_garbage_collection(backbone, shapes):
    own = _own(backbone)
    cache = wb.FeatureCache(own, None, num_workers=0, show_progress=False, channels_last=True)
    cache.get(shapes, shapes.split("test")[:4])
    assert cache._encode_fn is not None          # the encode function was built (what held the cycle)
    model = weakref.ref(own.model)
    gc.collect()
    gc.disable()                                   # a sweep's parent calls empty_cache() right after the dels
    try:
        del cache, own
        assert model() is None, "the model outlived its cache and backbone: a reference cycle keeps it"
    finally:
        gc.enable()


# -- channels-last: on the device, after the (non-blocking) copy --------------------------------

class _Spy(torch.Tensor):
    """A tensor that logs the operations applied to it (a copy with ``to`` ends the logging)."""

    log: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("to", "contiguous"):
            cls.log.append((name, kwargs.get("non_blocking"), kwargs.get("memory_format")))
        out = super().__torch_function__(func, types, args, kwargs)
        return out.as_subclass(torch.Tensor) if name == "to" and isinstance(out, torch.Tensor) else out


def test_pixels_are_copied_non_blocking_from_the_loader_buffer_then_reordered_on_the_device(backbone, shapes,
                                                                                             monkeypatch):
    own = _own(backbone)
    cache = wb.FeatureCache(own, None, num_workers=0, show_progress=False, channels_last=True)
    seen = {}
    real_loader = features_module.DataLoader

    def loader(*args, **kwargs):
        seen.update(kwargs)
        for views, pos, pixels, bad, *rest in real_loader(*args, **kwargs):
            yield (views, pos, None if pixels is None else pixels.as_subclass(_Spy), bad, *rest)

    monkeypatch.setattr(features_module, "DataLoader", loader)
    _Spy.log = []
    ids = shapes.split("test")[:6]
    feats = cache.get(shapes, ids)
    reference = wb.FeatureCache(backbone, None, num_workers=0, show_progress=False).get(shapes, ids)
    assert torch.allclose(feats.raw, reference.raw, atol=1e-5)
    # the batch the loader yields (pinned on CUDA) goes to the device first, non-blocking, untouched ...
    assert _Spy.log[0] == ("to", True, None), _Spy.log
    # ... and nothing reorders it on the host: the layout change happens on the copy (no longer a spy)
    assert not [op for op in _Spy.log if op[0] == "contiguous"], _Spy.log
    assert seen["pin_memory"] is False             # a CPU encoder (on CUDA the loader pins its batches)


def test_encoder_input_goes_to_the_gpu_first_and_is_reordered_there():
    calls = []

    class FakePixels:
        def to(self, device, non_blocking=False):
            calls.append(("to", str(device), non_blocking))
            return self

        def contiguous(self, memory_format=None):
            calls.append(("contiguous", memory_format))
            return self

    features_module.to_encoder_input(FakePixels(), torch.device("cuda", 1), channels_last=True)
    assert calls == [("to", "cuda:1", True), ("contiguous", torch.channels_last)]
    calls.clear()
    features_module.to_encoder_input(FakePixels(), torch.device("cuda", 1), channels_last=False)
    assert calls == [("to", "cuda:1", True)]


# -- the out-of-memory hint names precisions load_backbone accepts -------------------------------

def test_out_of_memory_hint_names_precisions_the_api_accepts(backbone, shapes):
    def oom(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    encoder = features_module.ChunkedEncoder(oom, 4, torch.device("cpu"), name="tiny", precision="fp32")
    with pytest.warns(UserWarning, match="retrying at 2"), pytest.raises(BackboneError) as err:
        encoder(torch.zeros(4, 3, 8, 8))
    named = re.findall(r"precision='([^']+)'", str(err.value))
    assert named == ["amp_fp16", "amp_bf16"], str(err.value)
    for name in named:                       # each is a value resolve_precision takes (on a GPU)
        assert name in PRECISIONS
        with pytest.raises(BackboneError, match="needs a GPU"):   # accepted name, refused only for the CPU
            resolve_precision(name, torch.device("cpu"))
    # already in mixed precision: the hint does not suggest it again
    assert "precision=" not in features_module.out_of_memory_fixes("amp_fp16")


def test_chunked_encoder_encodes_any_length_in_chunks_and_keeps_a_halved_size():
    sizes = []

    def encode(pixels):
        sizes.append(len(pixels))
        if len(pixels) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return pixels.flatten(1)[:, :2] * 2

    encoder = features_module.ChunkedEncoder(encode, 8, torch.device("cpu"))
    x = torch.randn(19, 1, 2, 1)
    with pytest.warns(UserWarning):
        out = encoder(x)
    assert torch.equal(out, x.flatten(1) * 2)
    assert sizes[:2] == [8, 4] and max(sizes[2:]) == 2 and encoder.encode_batch_size == 2 and encoder.halvings == 2
    sizes.clear()
    encoder(x[:5])
    assert sizes == [2, 2, 1]                 # the halved size is kept for later calls


# -- a bare "cuda" under torchrun is cuda:LOCAL_RANK ----------------------------------------------

@pytest.fixture
def four_fake_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_bare_cuda_under_torchrun_resolves_to_the_local_rank(four_fake_gpus, monkeypatch):
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)     # an explicit index is the user's choice
    monkeypatch.setenv("LOCAL_RANK", "5")                          # more processes than GPUs: named now
    with pytest.raises(ConfigError, match="LOCAL_RANK=5 has no GPU"):
        resolve_device("cuda")


def test_bare_cuda_outside_torchrun_stays_bare(four_fake_gpus, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == torch.device("cuda")


# -- augmented views stay on the CPU; the cache forgets them between sweep cells ------------------

class _MoveSpy(torch.Tensor):
    """Logs the shape of every tensor derived from it that is copied with ``to`` (the copy is plain)."""

    moved: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if getattr(func, "__name__", "") == "to":
            cls.moved.append(tuple(args[0].shape))
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return out


@pytest.mark.parametrize("name, params", [
    ("coop", {"ctx_init": "a photo of a", "epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0}),
    ("kgcoop", {"ctx_init": "a photo of a", "epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0}),
    ("cocoop", {"epochs": 2, "batch_size": 4, "warmup_epochs": 0}),
])
def test_prompt_learners_move_one_batch_of_views_at_a_time(name, params, backbone, shapes, monkeypatch):
    from workbench.data import sample_few_shot
    from workbench.features import Features
    from workbench.task import FewShotTask

    def task():
        return FewShotTask(shapes, sample_few_shot(shapes, 3, 1), backbone,
                           wb.FeatureCache(backbone, None, show_progress=False), templates=["a photo of a {}."])

    spied = task()
    real_support = spied.support

    def support(*args, **kwargs):
        feats = real_support(*args, **kwargs)
        return Features(raw=feats.raw.as_subclass(_MoveSpy), labels=feats.labels, ids=feats.ids,
                        skipped=feats.skipped, key=feats.key)

    monkeypatch.setattr(spied, "support", support)
    _MoveSpy.moved = []
    method = wb.get_method(name, **params).fit(spied)
    assert _MoveSpy.moved, "no view reached the device"
    # every copy to the device is one batch of features, never the [views, N, D] stack
    assert all(len(shape) == 2 and shape[0] <= params["batch_size"] for shape in _MoveSpy.moved), _MoveSpy.moved
    assert len(_MoveSpy.moved) == method.fit_info["steps"]
    if name == "coop":                                                # where the views live changes nothing
        state, reference = method.state(), wb.get_method(name, **params).fit(task()).state()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_clear_views_forgets_augmented_views_and_keeps_eval_features(backbone, shapes, tmp_path):
    ids = shapes.split("train")[:6]
    cache = wb.FeatureCache(backbone, None, num_workers=0, show_progress=False)
    views = cache.get(shapes, ids, views=2, aug_seed=1)
    cache.get(shapes, ids)                                        # eval features
    cache.pool(shapes, shapes.split("test")[:4])
    assert cache.get(shapes, ids, views=2, aug_seed=1) is views   # held in memory
    encoded = cache.stats["images_encoded"]
    assert cache.clear_views() == 1
    assert cache.clear_views() == 0
    again = cache.get(shapes, ids, views=2, aug_seed=1)           # no disk folder: encoded afresh ...
    assert again is not views and torch.equal(again.raw, views.raw)
    assert cache.stats["images_encoded"] == encoded + 12
    cache.get(shapes, ids)                                        # ... while eval features and pools stay
    cache.get(shapes, shapes.split("test")[:2])
    assert cache.stats["images_encoded"] == encoded + 12
    on_disk = wb.FeatureCache(backbone, tmp_path, num_workers=0, show_progress=False)
    first = on_disk.get(shapes, ids, views=2, aug_seed=1)
    on_disk.clear_views()
    assert torch.equal(on_disk.get(shapes, ids, views=2, aug_seed=1).raw, first.raw)  # read back from disk
    assert on_disk.stats["images_encoded"] == 12


# -- CLIP-LoRA's validation encode (wise_alpha="val") is chunked and out-of-memory safe -----------

def test_clip_lora_wise_val_encodes_the_validation_images_in_chunks_that_survive_out_of_memory(backbone, shapes,
                                                                                                monkeypatch):
    from workbench.data import sample_few_shot
    from workbench.methods.weights.clip_lora import CLIPLoRA
    from workbench.task import FewShotTask

    params = {"iterations": 2, "batch_size": 4, "lr": 5e-3, "templates": ["a photo of a {}."], "wise_alpha": "val"}
    split = sample_few_shot(shapes, 2, 1)                      # 4 classes: 8 support, 8 validation images

    def fit(limit):
        seen = []
        real_build = CLIPLoRA._build

        def build(self, backbone, cfg=None):
            model, names = real_build(self, backbone, cfg)
            encode = model.encode_image

            def small_gpu(pixels, *args, **kwargs):          # a GPU that holds at most `limit` images
                seen.append(len(pixels))
                if len(pixels) > limit:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return encode(pixels, *args, **kwargs)

            model.encode_image = small_gpu
            return model, names

        monkeypatch.setattr(CLIPLoRA, "_build", build)
        cache = wb.FeatureCache(backbone, None, batch_size=6, show_progress=False)
        task = FewShotTask(shapes, split, backbone, cache, templates=["a photo of a {}."])
        return wb.get_method("clip_lora", **params).fit(task), seen

    with pytest.warns(UserWarning, match="out of memory at an encode batch of 6; retrying at 3"):
        method, seen = fit(limit=4)                           # 8 validation images: chunks of 6, then 3
    assert 8 not in seen and max(seen[seen.index(3):]) <= 4   # never all at once; after the halving all fit
    wise = method.fit_info["wise_ft"]
    assert wise["chosen_on"] == "val" and len(wise["val_accuracy"]) == 11
