"""No stale or crossed state, the test split out of reach, bad input refused early (issues 10, 11, 12)."""
from __future__ import annotations

import errno
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import workbench as wb
from workbench import training
from workbench.data import synthetic_shapes
from workbench.data.dataset import Dataset, Sample
from workbench.data.sampling import sample_few_shot
from workbench.errors import ConfigError, DataError
from workbench.features import FeatureCache
from workbench.methods.base import Method
from workbench.task import FewShotTask

from .fakes import random_task


@pytest.fixture(scope="module")
def tiny():
    return synthetic_shapes(2, train_per_class=6, val_per_class=2, test_per_class=3, image_size=32)


def _folder_dataset(root, colours):
    """Two classes x 3 PNGs, each image a flat colour; ``colours[c]`` per class."""
    samples = []
    for label, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            path = root / cls / f"{i}.png"
            Image.new("RGB", (24, 24), colours[label]).save(path)
            samples.append(Sample(f"{cls}/{i}.png", label, str(path)))
    return Dataset("folder", ["a", "b"], ["a", "b"], {"train": samples})


# -- 1. the feature cache keys on image content ------------------------------------------------

def test_replaced_images_with_the_same_names_are_re_encoded(backbone, tmp_path):
    ds = _folder_dataset(tmp_path / "imgs", [(200, 20, 20), (20, 200, 20)])
    first = FeatureCache(backbone, tmp_path / "cache", show_progress=False).get(ds, ds.split("train"))
    again = FeatureCache(backbone, tmp_path / "cache", show_progress=False)
    again.get(ds, ds.split("train"))
    assert again.stats["images_encoded"] == 0  # unchanged files: served from disk, nothing encoded

    stamps = {s.ref: os.stat(s.ref).st_mtime_ns for s in ds.split("train")}
    _folder_dataset(tmp_path / "imgs", [(20, 20, 200), (240, 240, 240)])  # same names, other pixels
    for ref, ns in stamps.items():
        os.utime(ref, ns=(ns + 5_000_000_000, ns + 5_000_000_000))  # a later mtime, whatever the clock
    fresh = FeatureCache(backbone, tmp_path / "cache", show_progress=False)
    second = fresh.get(ds, ds.split("train"))
    assert fresh.stats["images_encoded"] == 6 and fresh.stats["hits"] == 0
    assert not torch.allclose(first.views, second.views)
    # the same cache object (its memory) notices too
    _folder_dataset(tmp_path / "imgs", [(200, 20, 20), (20, 200, 20)])
    for ref, ns in stamps.items():
        os.utime(ref, ns=(ns + 9_000_000_000, ns + 9_000_000_000))
    third = fresh.get(ds, ds.split("train"))
    assert fresh.stats["images_encoded"] == 12 and torch.allclose(third.views, first.views, atol=1e-5)


def test_array_content_and_pool_slices_follow_the_pixels(backbone):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
              "test": rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)}
    labels = {"train": np.array([0, 1] * 3), "test": np.array([0, 1] * 2)}
    a = wb.data.from_arrays(images, labels, name="arr", class_names=["x", "y"])
    b = wb.data.from_arrays({k: 255 - v for k, v in images.items()}, labels, name="arr", class_names=["x", "y"])
    # same name, ids and labels: only the pixels differ
    cache = FeatureCache(backbone, None, show_progress=False)
    cache.pool(a)
    sliced = cache.get(a, a.split("test"))
    assert cache.stats["sliced"] == 1
    other = cache.get(b, b.split("test"))  # must not be served from a's pool or memory
    assert cache.stats["sliced"] == 1 and cache.stats["misses"] == 2
    assert not torch.allclose(sliced.views, other.views)


# -- 2. checkpoints belong to their run ----------------------------------------------------------

def test_checkpoint_dir_reused_for_another_dataset_trains_afresh(backbone, tmp_path):
    params = {"epochs": 2, "n_ctx": 4, "checkpoint_every": 1, "checkpoint_dir": str(tmp_path / "ckpt")}
    first = synthetic_shapes(2, train_per_class=4, val_per_class=2, test_per_class=1, image_size=32, seed=0)
    second = synthetic_shapes(2, train_per_class=4, val_per_class=2, test_per_class=1, image_size=32, seed=5)
    # same name, ids and labels (same settings): only the images differ
    cache = FeatureCache(backbone, None, show_progress=False)
    a = wb.get_method("coop", **params).fit(FewShotTask(first, sample_few_shot(first, 2, 1), backbone, cache))
    assert a.fit_info["resumed_from_epoch"] is None
    with pytest.warns(UserWarning, match="starts fresh"):
        b = wb.get_method("coop", **params).fit(FewShotTask(second, sample_few_shot(second, 2, 1), backbone, cache))
    assert b.fit_info["resumed_from_epoch"] is None and b.fit_info["steps"] == a.fit_info["steps"] > 0
    assert len(list((tmp_path / "ckpt").glob("run-*/last.safetensors"))) == 2
    # the same run again resumes its own (finished) checkpoint
    c = wb.get_method("coop", **params).fit(FewShotTask(first, sample_few_shot(first, 2, 1), backbone, cache))
    assert c.fit_info["resumed_from_epoch"] == 2 and torch.equal(c.ctx, a.ctx)


def test_train_keeps_one_checkpoint_folder_per_identity(tmp_path):
    module = nn.Linear(2, 1)

    def batches(epoch, gen):
        yield torch.ones(1, 2)

    cfg = training.TrainConfig(epochs=2, checkpoint_every=1)
    run = lambda ident: training.train(module, lambda b: module(b).sum(), batches, cfg,  # noqa: E731
                                       device=torch.device("cpu"), checkpoint_dir=tmp_path, identity=ident,
                                       show_progress=False)
    assert run({"data": "A"})["resumed_from_epoch"] is None
    with pytest.warns(UserWarning, match="other run"):
        assert run({"data": "B"})["resumed_from_epoch"] is None
    assert run({"data": "A"})["resumed_from_epoch"] == 2
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2 and all(json.loads((tmp_path / f / "identity.json").read_text()) in
                                     ({"data": "A"}, {"data": "B"}) for f in folders)


# -- 3. the test split is unreachable from the task -----------------------------------------------

def _public_objects(root, skip=()):
    """Every object reachable from ``root`` through public attributes, lists and dicts (not the backbone)."""
    seen, todo, out = set(), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or any(obj is s for s in skip) or isinstance(obj, (torch.Tensor, nn.Module)):
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, dict):
            todo += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo += list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo += [v for k, v in vars(obj).items() if not k.startswith("_")]
    return out


def test_fitting_code_cannot_reach_the_test_split(backbone, tiny, tmp_path):
    cache = FeatureCache(backbone, None, show_progress=False)
    cache.get(tiny, tiny.split("test"))  # test features already in the cache's memory
    task = FewShotTask(tiny, sample_few_shot(tiny, 2, 1), backbone, cache)
    for name in ("dataset", "cache"):
        with pytest.raises(AttributeError):
            getattr(task, name)
    test_ids = {s.id for s in tiny.split("test")}
    reachable = _public_objects(task, skip=(backbone,))
    assert not any(isinstance(o, (Dataset, FeatureCache)) for o in reachable)
    assert not test_ids & {o for o in reachable if isinstance(o, str)}
    assert not test_ids & {o.id for o in reachable if isinstance(o, Sample)}
    # what the task does offer: support, K-shot validation, their images, text
    assert {s.id for s in task.support_samples()} | {s.id for s in task.val_samples()} <= \
        {s.id for s in tiny.split("train")} | {s.id for s in tiny.split("val")}
    images, labels = task.support_images()
    assert len(images) == len(labels) == 4 and task.support().x.shape[0] == 4
    # even the private view refuses test ids
    with pytest.raises(DataError, match="not support or validation"):
        task._view.samples([next(iter(test_ids))])


# -- 4. saved models: atomic, and incomplete folders named -----------------------------------------

@pytest.fixture(scope="module")
def saved(backbone, tiny, tmp_path_factory):
    task = FewShotTask(tiny, sample_few_shot(tiny, 2, 1), backbone, FeatureCache(backbone, None, show_progress=False))
    method = wb.get_method("tip_adapter").fit(task)
    folder = tmp_path_factory.mktemp("saved") / "model"
    wb.Predictor(backbone, method).save(folder)
    return folder


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    task, _ = random_task()
    method = wb.get_method("tip_adapter").fit(task)
    method.save(tmp_path / "old")

    def killed(self, folder):
        (folder / "half").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(method), "save_extra", killed)
    with pytest.raises(KeyboardInterrupt):
        method.save(tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        method.save(tmp_path / "old")  # overwriting: the old folder survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert torch.equal(Method.load(tmp_path / "old").predict_logits(task.val.x), method.predict_logits(task.val.x))


@pytest.mark.parametrize("damage, file, message", [
    ("delete", "method/state.safetensors", "incomplete: method/state.safetensors is missing"),
    ("truncate", "method/state.safetensors", "incomplete: method/state.safetensors is truncated"),
    ("truncate", "predictor.json", "incomplete: predictor.json is truncated"),
    ("delete", "predictor.json", "incomplete: predictor.json is missing"),
    ("truncate", "method/method.json", "incomplete: method/method.json is truncated"),
])
def test_incomplete_saved_folder_names_the_file(saved, tmp_path, damage, file, message):
    folder = _copy(saved, tmp_path / "copy")
    path = folder / file
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=message):
        wb.load(folder)


def test_method_folder_with_truncated_method_json_names_it(saved, tmp_path):
    folder = _copy(saved / "method", tmp_path / "m")
    (folder / "method.json").write_text('{"format": 1, "meth')
    with pytest.raises(ConfigError, match="incomplete: method.json is truncated"):
        Method.load(folder)
    (folder / "method.json").unlink()
    with pytest.raises(ConfigError, match="incomplete: method.json is missing"):
        Method.load(folder)


def test_missing_lora_adapter_is_named_not_a_hub_error(backbone, tiny, tmp_path, quiet):
    task = FewShotTask(tiny, sample_few_shot(tiny, 1, 1), backbone, FeatureCache(backbone, None, show_progress=False))
    method = wb.get_method("clip_lora", iterations=1, batch_size=2).fit(task)
    folder = wb.Predictor(backbone, method).save(tmp_path / "lora")
    (folder / "method" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="incomplete: method/adapter/adapter_model.safetensors is missing"):
        wb.load(folder)


# -- 5. a cache write that fails keeps the run ------------------------------------------------------

def test_full_disk_keeps_features_in_memory_and_names_the_path(backbone, tiny, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    cache = FeatureCache(backbone, tmp_path / "cache", show_progress=False)
    with pytest.warns(UserWarning, match=r"could not write feature cache file .*cache.*No space left"):
        feats = cache.get(tiny, tiny.split("train"))
    assert len(feats) == 12 and len(cache.write_failures) == 1
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written entry
    again = cache.get(tiny, tiny.split("train"))
    assert again is feats and cache.stats["images_encoded"] == 12  # served from memory


# -- 6. an unwritable output folder is refused before fitting ---------------------------------------

class _Spy(Method):
    name = "spy"

    def fit(self, task):
        raise AssertionError("fit ran although the output folder is unwritable")


def test_unwritable_out_dir_is_refused_before_fitting(backbone, tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        wb.run_experiment(tiny, backbone, _Spy(), 1, 1, out_dir=blocker / "results")
    with pytest.raises(ConfigError, match="not writable"):
        wb.compare(tiny, backbone, ["zero_shot"], [1], [1], out_dir=blocker / "results")


# -- 7. parameters checked before any encoding or training ------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "zero_shot", 1, None, cache=c), "seed must be a non-negative integer"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "zero_shot", True, 1, cache=c), "shots must be an integer.*bool"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "zero_shot", 1, 1.5, cache=c), "seed must be an integer"),
    (lambda ds, bb, c: wb.compare(ds, bb, ["zero_shot"], [0], [1], cache=c), "shots must be an integer >= 1"),
    (lambda ds, bb, c: wb.compare(ds, bb, ["zero_shot", "linear_probe"], [1], [1], cache=c,
                                  method_params={"linear_probe": {"max_iter": -1}}), "linear_probe: max_iter must be"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "coop", 1, 1, cache=c, method_params={"batch_size": 0}),
     "coop: batch_size must be an integer >= 1, got 0"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "clip_lora", 1, 1, cache=c, method_params={"dropout": 1.5}),
     "clip_lora: dropout must satisfy 0.0 <= dropout < 1.0"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "coop", 1, 1, cache=c, method_params={"lr": float("nan")}),
     "coop: lr must be a finite number"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "coop", 1, 1, cache=c, method_params={"csc": "yes"}),
     "coop: csc must be bool"),
    (lambda ds, bb, c: wb.run_experiment(ds, bb, "coop", 1, 1, cache=c, method_params={"n_ctx": 500}),
     "n_ctx=500"),
])
def test_bad_parameters_are_refused_before_encoding(backbone, tiny, call, message):
    cache = FeatureCache(backbone, None, show_progress=False)
    with pytest.raises(ConfigError, match=message):
        call(tiny, backbone, cache)
    assert cache.stats["images_encoded"] == 0


def test_method_configs_are_checked_from_their_annotations(tmp_path):
    from dataclasses import dataclass

    from workbench.methods.registry import METHODS
    from workbench.validate import check_config

    for entry in METHODS:  # every registered method's defaults satisfy its own annotations and bounds
        wb.get_method(entry.name)

    @dataclass
    class Toy:
        epochs: int | None = None
        lr: float = 0.1
        out: str | None = None
        blocks: str | list = "all"

    cfg = check_config(Toy(epochs=np.int64(3), lr=np.float32(0.5), out=tmp_path, blocks=(1, 2)), "toy")
    assert (type(cfg.epochs), type(cfg.lr), cfg.out, cfg.blocks) == (int, float, str(tmp_path), (1, 2))
    for bad, message in [({"epochs": 0}, "toy: epochs must be an integer >= 1"), ({"epochs": "3"}, "int or None"),
                         ({"lr": -1.0}, "0.0 < lr"), ({"blocks": 3}, "str or list")]:
        with pytest.raises(ConfigError, match=message):
            check_config(Toy(**bad), "toy")
    assert wb.get_method("coop", n_ctx=0).config.n_ctx == 0  # n_ctx=0: the hand-crafted prompt


def test_numpy_integers_are_accepted_as_plain_ints(backbone, tiny):
    res = wb.run_experiment(tiny, backbone, "zero_shot", np.int64(1), np.int64(2),
                            cache=FeatureCache(backbone, None, show_progress=False))
    assert type(res.row["shots"]) is int and type(res.row["seed"]) is int
    method = wb.get_method("linear_probe", max_iter=np.int64(50))
    assert type(method.config.max_iter) is int
    json.dumps(method.describe())  # still serialisable into provenance


# -- 8. one warning with the expected time for long CPU runs ------------------------------------------

def test_long_cpu_training_warns_once_with_the_expected_time(monkeypatch):
    monkeypatch.setattr(training, "CPU_WARN_SECONDS", 0.0)
    monkeypatch.setattr(training, "_CPU_WARNED", set())
    module = nn.Linear(2, 1)

    def batches(epoch, gen):
        for _ in range(3):
            yield torch.ones(1, 2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # e.g. two runs of a compare
            training.train(module, lambda b: module(b).sum(), batches, training.TrainConfig(epochs=4),
                           device=torch.device("cpu"), desc="Toy", show_progress=False, cpu_hint="iterations={steps}")
    slow = [str(w.message) for w in caught if "training on the CPU" in str(w.message)]
    assert len(slow) == 1
    assert "Toy: training on the CPU, 12 steps" in slow[0] and "about" in slow[0]
    assert re.search(r"pass iterations=\d+ \(about 2 min\)", slow[0])


# -- 9. quiet progress ------------------------------------------------------------------------------

def test_progress_bars_only_when_encoding_takes_long(backbone, tiny, monkeypatch, capsys):
    import workbench.features as features

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    made = []
    real = features.progress
    monkeypatch.setattr(features, "progress", lambda *a, **k: made.append(k) or real(*a, **k))
    assert features.PROGRESS_DELAY_S >= 2
    # an encode shorter than the delay prints nothing (the delay made huge so that a busy machine cannot
    # turn this into a long encode)
    monkeypatch.setattr(features, "PROGRESS_DELAY_S", 1e6)
    cache = FeatureCache(backbone, None, show_progress=True)
    cache.get(tiny, tiny.split("train")[:4])
    assert len(made) == 1 and made[0]["leave"] is False and made[0]["delay"] == 1e6
    cache.get(tiny, tiny.split("train")[:4])  # a cache hit: no bar at all
    assert len(made) == 1
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(features, "PROGRESS_DELAY_S", 0.0)  # a long encode does show its bar
    cache.get(tiny, tiny.split("train")[4:8])
    assert "img" in capsys.readouterr().err


def test_training_bar_does_not_stay(monkeypatch):
    made = []
    real = training.progress
    monkeypatch.setattr(training, "progress", lambda *a, **k: made.append(k) or real(*a, **k))
    module = nn.Linear(2, 1)
    training.train(module, lambda b: module(b).sum(), lambda e, g: iter([torch.ones(1, 2)]),
                   training.TrainConfig(epochs=1), device=torch.device("cpu"), show_progress=False)
    assert made and made[0]["leave"] is False
