"""Nothing runs from data, nothing finished is lost (issue 20) and the checkpoint items of issue 27."""
from __future__ import annotations

import json
import pickle
import re
import warnings

import pytest
import torch
import torch.nn as nn

from workbench import training


def _batches(epoch, gen):
    yield torch.ones(1, 2)


def _train(module, tmp_path, loss_fn=None, **kw):
    cfg = training.TrainConfig(epochs=kw.pop("epochs", 2), checkpoint_every=1, lr=kw.pop("lr", 1e-3),
                               optimizer=kw.pop("optimizer", "adamw"))
    return training.train(module, loss_fn or (lambda b: module(b).sum()), _batches, cfg,
                          device=torch.device("cpu"), checkpoint_dir=tmp_path, identity={"run": "r"},
                          show_progress=False, **kw)


def _ckpt(tmp_path):
    return training.checkpoint_folder(tmp_path, {"run": "r"}) / training.CHECKPOINT_NAME


# -- checkpoints cannot run code, are checked before any tensor is read ------------------------------

class _Payload:
    """Pickles to a call that writes ``marker``: what a swapped checkpoint could run when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",))


def test_checkpoint_is_safetensors_plus_json_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    torch.manual_seed(0)
    part = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    torch.manual_seed(1)
    _train(full, tmp_path / "a", epochs=4)
    torch.manual_seed(1)
    _train(part, tmp_path / "b", epochs=4, stop_after_epoch=2)
    torch.manual_seed(123)   # the resumed run must restore the RNG from the file, not use this one
    history = _train(part, tmp_path / "b", epochs=4)
    assert history["resumed_from_epoch"] == 2
    for a, b in zip(full.parameters(), part.parameters()):
        assert torch.equal(a, b)
    path = _ckpt(tmp_path / "b")
    assert path.read_bytes()[:8] != b"\x80\x04\x95" and not list(tmp_path.rglob("*.pt"))
    meta = training.read_checkpoint_header(path)
    assert meta["format"] == training.CHECKPOINT_FORMAT and meta["precision"] == "fp32"
    assert meta["device_type"] == "cpu" and meta["identity"] == {"run": "r"} and meta["step"] == 4


def test_no_workbench_module_unpickles():
    import pathlib

    root = pathlib.Path(training.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if "weights_only=False" in p.read_text()
                 or "allow_pickle=True" in p.read_text() or "pickle.load" in p.read_text()]
    assert offenders == []


def test_swapped_pickle_checkpoint_is_never_unpickled(tmp_path):
    module = nn.Linear(2, 1)
    folder = training.checkpoint_folder(tmp_path, {"run": "r"})
    folder.mkdir(parents=True)
    marker = tmp_path / "marker"
    (folder / "last.pt").write_bytes(pickle.dumps(_Payload(marker)))   # the old name, a code-running pickle
    with pytest.warns(UserWarning, match="old pickle format, which is never read"):
        history = _train(module, tmp_path)
    assert history["resumed_from_epoch"] is None and not marker.exists()
    # the same bytes under the new name: refused from the header, nothing executed
    _ckpt(tmp_path).write_bytes((folder / "last.pt").read_bytes())
    (folder / "last.pt").unlink()
    with pytest.raises(training.CheckpointError, match="truncated or not a workbench checkpoint"):
        _train(module, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 7, -5])
def test_truncated_or_empty_checkpoint_is_a_clear_error_naming_the_file(tmp_path, cut):
    module = nn.Linear(2, 1)
    _train(module, tmp_path)
    path = _ckpt(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(training.CheckpointError, match=str(path).replace("\\", "\\\\") + ".*(empty|truncated)"):
        _train(module, tmp_path, epochs=3)


def test_identity_is_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    module = nn.Linear(2, 1)
    _train(module, tmp_path)
    header = training.read_checkpoint_header(_ckpt(tmp_path))
    header["identity"] = {"run": "someone else"}
    tensors = training.read_checkpoint_tensors(_ckpt(tmp_path))
    training._write_checkpoint(tensors, header, _ckpt(tmp_path))
    read = []
    monkeypatch.setattr(training, "read_checkpoint_tensors", lambda p: read.append(p))
    with pytest.raises(training.CheckpointError, match="belongs to another run"):
        _train(module, tmp_path)
    assert read == []


def test_checkpoint_write_failure_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    module = nn.Linear(2, 1)
    _train(module, tmp_path, epochs=3, stop_after_epoch=1)
    before = _ckpt(tmp_path).read_bytes()
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(training.CheckpointError, match=r"cannot write the checkpoint .*last\.safetensors.*No space"):
        _train(module, tmp_path, epochs=3)
    assert _ckpt(tmp_path).read_bytes() == before
    assert [p.name for p in _ckpt(tmp_path).parent.iterdir() if p.name.startswith(".ckpt")] == []


# -- precision in the identity; never an empty scaler state (issue 27) ---------------------------------

def test_other_precision_starts_fresh_with_a_warning(tmp_path):
    module = nn.Linear(2, 1)
    _train(module, tmp_path, precision="amp_bf16")
    with pytest.warns(UserWarning, match="precision 'amp_bf16' on 'cpu'; this run uses 'fp32'.*starts fresh"):
        history = _train(module, tmp_path)
    assert history["resumed_from_epoch"] is None
    assert training.read_checkpoint_header(_ckpt(tmp_path))["precision"] == "fp32"


def test_fp16_resume_from_a_checkpoint_written_without_a_scaler(tmp_path, monkeypatch):
    module = nn.Linear(2, 1)
    _train(module, tmp_path, precision="amp_fp16", epochs=3, stop_after_epoch=1)   # CPU: no scaler, state {}
    assert training.read_checkpoint_header(_ckpt(tmp_path))["scaler"] == {}
    # the same run resumed where fp16 has a gradient scaler (CUDA; an enabled CPU scaler stands in for it)
    monkeypatch.setattr(training, "_grad_scaler", lambda d, p: torch.amp.GradScaler("cpu", enabled=True))
    monkeypatch.setattr(training, "autocast_context", lambda d, p: __import__("contextlib").nullcontext())
    history = _train(module, tmp_path, precision="amp_fp16", epochs=3)
    assert history["resumed_from_epoch"] == 1 and history["steps"] == 3


class _FakeCuda:
    """Two 'GPUs' whose generator states are tensors the test can see."""

    def __init__(self, states):
        self.states = [s.clone() for s in states]
        self.set_calls = []

    def is_available(self):
        return True

    def device_count(self):
        return len(self.states)

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states):
        self.set_calls.append([s.clone() for s in states])


def test_cuda_generator_states_are_saved_and_restored(tmp_path, monkeypatch):
    module = nn.Linear(2, 1)
    saved = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    fake = _FakeCuda(saved)
    monkeypatch.setattr(training, "_cuda_rng_states", lambda: fake.get_rng_state_all())
    _train(module, tmp_path, epochs=3, stop_after_epoch=1)
    meta = training.read_checkpoint_header(_ckpt(tmp_path))
    assert meta["cuda_generators"] == 2
    # resumed on a (faked) CUDA device: both generators get the saved states back
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setattr(training.torch, "cuda", fake)
    try:
        training.train(module, lambda b: module(b).sum(), _batches,
                       training.TrainConfig(epochs=3, checkpoint_every=1), device=torch.device("cuda"),
                       checkpoint_dir=tmp_path, identity={"run": "r"}, show_progress=False, stop_after_epoch=1)
    except Exception:
        pass   # a step on the fake "cuda" device may fail: only the restore before it matters here
    assert len(fake.set_calls) == 1 and all(torch.equal(a, b) for a, b in zip(fake.set_calls[0], saved))


# -- the NaN guard: parameters too; fp16 skipped steps counted ------------------------------------------

def test_non_finite_parameters_after_the_last_step_stop_with_step_and_hint(tmp_path):
    module = nn.Linear(2, 1)
    with pytest.raises(training.TrainingDiverged, match=r"parameters became NaN or infinite at step 0 .*learning rate"):
        training.train(module, lambda b: module(b).sum() * 1e10, _batches,
                       training.TrainConfig(epochs=1, optimizer="sgd", lr=1e30, momentum=0.0, weight_decay=0.0),
                       device=torch.device("cpu"), show_progress=False)


def _fp16_scaler(monkeypatch):
    monkeypatch.setattr(training, "_grad_scaler", lambda d, p: torch.amp.GradScaler("cpu", enabled=True))
    monkeypatch.setattr(training, "autocast_context", lambda d, p: __import__("contextlib").nullcontext())


class _OverflowingGrad(torch.autograd.Function):
    """Identity forward (a finite loss), an infinite gradient backward: an fp16 overflow at any scale."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_scaler_skipped_steps_are_counted_not_fatal(monkeypatch):
    _fp16_scaler(monkeypatch)
    module = nn.Linear(2, 1)
    calls = {"n": 0}

    def loss_fn(batch):   # finite loss, overflowing gradients on the first two steps
        calls["n"] += 1
        out = module(batch).sum()
        return _OverflowingGrad.apply(out) if calls["n"] <= 2 else out

    history = training.train(module, loss_fn, _batches, training.TrainConfig(epochs=5), device=torch.device("cpu"),
                             precision="amp_fp16", show_progress=False)
    assert history["steps"] == 5 and history["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_persistent_scaler_skips_stop_the_run(monkeypatch):
    _fp16_scaler(monkeypatch)
    module = nn.Linear(2, 1)
    with pytest.raises(training.TrainingDiverged, match=r"overflowed at 25 steps in a row.*bf16 or fp32"):
        training.train(module, lambda b: _OverflowingGrad.apply(module(b).sum()), _batches, training.TrainConfig(epochs=40),
                       device=torch.device("cpu"), precision="amp_fp16", show_progress=False)


# -- one safe YAML reader ------------------------------------------------------------------------------

from workbench import domains, safe_yaml  # noqa: E402
from workbench.errors import ConfigError  # noqa: E402

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def test_alias_bomb_is_refused_quickly(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)   # 10**9 values once expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: its anchors and aliases expand to more than 100000"):
        safe_yaml.load_yaml(path, what="sweep spec")
    assert time.perf_counter() - t0 < 2.0
    # the same file as a dataset YAML: refused by the same reader
    with pytest.raises(ConfigError, match="dataset YAML .*bomb.yaml.*alias"):
        domains.load_spec(path)


def test_a_few_aliases_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 0.001, epochs: 2}\nruns: [*b, *b]\n")
    assert safe_yaml.load_yaml(path) == {"base": {"lr": 0.001, "epochs": 2}, "runs": [{"lr": 0.001, "epochs": 2}] * 2}


def test_recursive_alias_and_oversized_files_are_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="recursive"):
        safe_yaml.load_yaml(path)
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "a" * (safe_yaml.MAX_BYTES + 10) + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml is \d+ bytes, over the 1000000-byte limit"):
        safe_yaml.load_yaml(big, what="sweep spec")


def test_python_tags_and_syntax_errors_name_file_and_line(tmp_path):
    marker = tmp_path / "ran"
    spec = tmp_path / "sweep.yaml"
    spec.write_text("datasets: [whu_rs19_mini]\nmethods: [zero_shot]\n"
                    f"out: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"sweep spec .*sweep\.yaml, line 3.*python.*refused, for safety"):
        safe_yaml.load_yaml(spec, what="sweep spec")
    assert not marker.exists()
    spec.write_text("datasets: [whu_rs19_mini\nmethods: zero_shot\n")
    with pytest.raises(ConfigError, match=r"sweep\.yaml, line \d+, column \d+: not valid YAML"):
        safe_yaml.load_yaml(spec, what="sweep spec")


def test_pair_dataset_yamls_go_through_the_safe_reader(tmp_path):
    from workbench.data.pairs import load_pair_spec

    spec = tmp_path / "pairs.yaml"
    spec.write_text("name: x\nsource: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match=r"pair-dataset YAML .*pairs\.yaml, line 2.*refused, for safety"):
        load_pair_spec(spec)
    spec.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefg", "bcdefgh")))   # 10^8 values by aliases
    with pytest.raises(ConfigError, match=r"pairs\.yaml"):
        load_pair_spec(spec)


def test_a_sweep_like_spec_loads_as_plain_data(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("datasets: [whu_rs19_mini, data/my_images/]\n"
                    "methods: [zero_shot, {name: tip_adapter, params: {init_alpha: 2.0}}]\n"
                    "shots: [1, 2]\nseeds: [1]\nbackbone: workbench-tiny\n")
    data = safe_yaml.load_yaml(spec, what="sweep spec")
    assert data["methods"][1] == {"name": "tip_adapter", "params": {"init_alpha": 2.0}} and data["shots"] == [1, 2]


def test_backbone_list_is_read_through_the_safe_reader(tmp_path, monkeypatch):
    (tmp_path / "backbones.yaml").write_text(BOMB)
    monkeypatch.setattr(domains, "domains_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="backbone list .*backbones.yaml.*alias"):
        domains.backbone_recipes()


# -- names are not paths ---------------------------------------------------------------------------------

from workbench.paths import safe_name  # noqa: E402


@pytest.mark.parametrize("name", ["../../../x", "/etc/passwd", "a/../../b", ".hidden", "..", "c:\\win", "x\x00y",
                                  "a" * 400])
def test_safe_name_is_one_component_inside_its_root(tmp_path, name):
    out = safe_name(name, "dataset name")
    assert "/" not in out and "\\" not in out and not out.startswith(".") and len(out) <= 120
    assert (tmp_path / out).resolve().parent == tmp_path.resolve()


def test_safe_name_keeps_plain_names_and_hub_ids_and_never_merges_two_names():
    assert safe_name("whu_rs19_mini") == "whu_rs19_mini" and safe_name("user/set") == "user__set"
    assert safe_name("a b") != safe_name("a_b") and safe_name("a?b") != safe_name("a*b")
    with pytest.raises(ConfigError, match="dataset name must be a non-empty string"):
        safe_name("", "dataset name")


def test_a_dataset_named_like_a_path_writes_only_inside_out_dir_and_split_dir(tmp_path, backbone, quiet):
    import workbench as wb
    from workbench.data import synthetic_shapes

    ds = synthetic_shapes(2, train_per_class=3, val_per_class=1, test_per_class=2, image_size=32)
    ds.name = "../../escaped"
    out, splits = tmp_path / "deep" / "out", tmp_path / "deep" / "splits"
    run = wb.run_experiment(ds, backbone, "zero_shot", 1, 1, out_dir=out, split_dir=splits)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(out in p.parents or splits in p.parents for p in written), written
    assert (out / "runs" / run.row["run_id"] / "provenance.json").is_file()
    assert "/" not in run.row["run_id"] and run.row["dataset"] == "../../escaped"   # the row keeps the real name


# -- saved models never reach the network or a file outside their folder ----------------------------------

import numpy as np  # noqa: E402

import workbench as wb  # noqa: E402
from workbench import backbones, predictor  # noqa: E402
from workbench.data.images import UnreadableImage  # noqa: E402
from workbench.errors import DataError, WorkbenchError  # noqa: E402


@pytest.fixture(scope="module")
def saved_model(backbone, tmp_path_factory):
    from workbench.data import synthetic_shapes
    from workbench.data.sampling import sample_few_shot
    from workbench.features import FeatureCache
    from workbench.task import FewShotTask

    ds = synthetic_shapes(2, train_per_class=3, val_per_class=2, test_per_class=1, image_size=32)
    task = FewShotTask(ds, sample_few_shot(ds, 2, 1), backbone, FeatureCache(backbone, None, show_progress=False))
    method = wb.get_method("linear_probe").fit(task)
    return wb.Predictor(backbone, method).save(tmp_path_factory.mktemp("saved") / "model")


def _with_recipe(saved, tmp_path, **backbone_spec):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    meta = json.loads((folder / "predictor.json").read_text())
    meta["backbone"].update(backbone_spec)
    (folder / "predictor.json").write_text(json.dumps(meta))
    return folder


def test_saved_model_naming_a_url_never_downloads(saved_model, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(backbones, "_download_url", lambda url, dest: calls.append(url))
    folder = _with_recipe(saved_model, tmp_path, pretrained="url-zip:http://attacker.example/x.zip#w.pt")
    with pytest.raises(ConfigError, match=r"download its weights from 'http://attacker.example/x.zip'.*pretrained="):
        wb.load(folder)
    assert calls == []


def test_saved_model_naming_a_file_outside_its_folder_is_refused(saved_model, tmp_path):
    for weights in ("/etc/hostname.pt", "../../outside.pt", "url-zip:http://h/x.zip#/etc/hostname"):
        folder = _with_recipe(saved_model, tmp_path / str(abs(hash(weights))), pretrained=weights)
        with pytest.raises(ConfigError, match="outside the folder and your cache|never reaches the network"):
            wb.load(folder)
    folder = _with_recipe(saved_model, tmp_path / "dir", name="local-dir:/etc")
    with pytest.raises(ConfigError, match="outside the folder and your cache"):
        wb.load(folder)


def test_saved_recipe_allows_what_a_user_could_type_and_stays_inside(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert predictor.saved_backbone_recipe(folder, {"name": "workbench-tiny", "pretrained": None}) == \
        ("workbench-tiny", None)
    assert predictor.saved_backbone_recipe(folder, {"name": "ViT-B-32", "pretrained": "openai"}) == \
        ("ViT-B-32", "openai")
    (folder / "w.pt").write_bytes(b"")
    assert predictor.saved_backbone_recipe(folder, {"name": "ViT-B-32", "pretrained": "w.pt"})[1] == str(folder / "w.pt")
    # explicit: the user's own choice is followed
    assert predictor.saved_backbone_recipe(folder, {"name": "ViT-B-32", "pretrained": "/x/y.pt"},
                                           pretrained="/x/y.pt") == ("ViT-B-32", "/x/y.pt")
    with pytest.raises(ConfigError, match="hf-hub:ORG/REPO"):
        predictor.saved_backbone_recipe(folder, {"name": "hf-hub:a/../../b", "pretrained": None})


def test_url_zip_member_must_be_a_file_name_and_offline_means_no_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(backbones, "_download_url", lambda url, dest: calls.append(url))
    with pytest.raises(wb.BackboneError, match="plain file name inside the archive"):
        backbones._zip_checkpoint("url-zip:https://h/x.zip#/etc/hostname", tmp_path)
    with pytest.raises(wb.BackboneError, match="plain file name"):
        backbones._zip_checkpoint("url-zip:https://h/x.zip#../x.pt", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(wb.BackboneError, match="HF_HUB_OFFLINE=1 is set: no download"):
        backbones._zip_checkpoint("url-zip:https://h/x.zip#w.pt", tmp_path)
    assert calls == []


def test_pickled_peft_adapter_is_refused_clearly(tmp_path):
    from workbench.towers.lora import load_lora

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ConfigError, match="adapter_model.bin, a pickled file .*not loaded, for safety"):
        load_lora(nn.Linear(2, 2), tmp_path)


def test_unknown_key_in_method_json_names_key_and_version(saved_model, tmp_path):
    import shutil

    from workbench.methods.base import Method

    folder = tmp_path / "m"
    shutil.copytree(saved_model / "method", folder)
    meta = json.loads((folder / "method.json").read_text())
    meta["config"]["future_knob"] = 3
    meta["workbench_version"] = "9.9.0"
    (folder / "method.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"setting 'future_knob'.*this workbench version \(0\.1\.0\).*workbench 9\.9\.0"):
        Method.load(folder)


def test_manifest_naming_a_file_outside_the_folder_is_refused(saved_model, tmp_path):
    folder = _with_recipe(saved_model, tmp_path)
    meta = json.loads((folder / "predictor.json").read_text())
    meta["files"]["../../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (folder / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="a file outside the folder"):
        wb.load(folder)


# -- predict() refuses what it cannot answer ---------------------------------------------------------------

def test_predict_refuses_none_folders_and_non_finite_images(saved_model, tmp_path):
    model = wb.load(saved_model)
    with pytest.raises(ConfigError, match="predict\\(\\) got None"):
        model.predict(None)
    with pytest.raises(ConfigError, match="is None"):
        model.predict([np.zeros((8, 8, 3), np.uint8), None])
    with pytest.raises(ConfigError, match="is a folder: pass image files or a dataset"):
        model.predict(tmp_path)
    with pytest.raises(UnreadableImage, match="image 0 .*64 of 64 pixel values are NaN"):
        model.predict(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(UnreadableImage, match="NaN or infinite"):
        model.predict([np.ones((8, 8, 3), np.float32), np.where(np.eye(8)[..., None] > 0, np.inf, 1.0)])
    table = model.predict(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32))
    assert len(table) == 1   # one H x W x C array is one image


# -- data: NaN pixels, pickled npz, empty grids, a class folder named test -----------------------------------

def test_nan_pixels_in_a_float_array_source_are_skipped_and_reported(backbone):
    from workbench.features import FeatureCache

    rng = np.random.default_rng(0)
    train = rng.random((4, 16, 16, 3)).astype(np.float32)
    train[1, 3, 3, 0] = np.nan
    ds = wb.data.from_arrays({"train": train, "test": rng.random((2, 16, 16, 3)).astype(np.float32)},
                             {"train": np.array([0, 1, 0, 1]), "test": np.array([0, 1])}, name="f", class_names=["a", "b"])
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        feats = FeatureCache(backbone, None, show_progress=False).get(ds, ds.split("train"))
    assert [s["id"] for s in feats.skipped] == ["train/1"] and "NaN" in feats.skipped[0]["reason"]
    assert len(feats.ids) == 3


def test_npz_with_object_arrays_or_a_pickle_says_so(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, train_images=np.array([np.zeros((2, 2)), "x"], dtype=object), train_labels=np.array([0, 1]))
    with pytest.raises(DataError, match="object arrays are not loaded, for safety"):
        wb.data.from_npz(obj)
    pkl = tmp_path / "pkl.npz"
    pkl.write_bytes(pickle.dumps({"train_images": 1}))
    with pytest.raises(DataError, match="object arrays are not loaded, for safety"):
        wb.data.from_npz(pkl)


@pytest.mark.parametrize("method, params", [("gda", {"alphas": []}), ("linear_probe", {"c_grid": []}),
                                            ("tip_adapter", {"search_step": []}), ("clip_lora", {"params": []})])
def test_empty_search_grids_are_refused_at_construction(method, params):
    with pytest.raises(ConfigError, match=f"{method}: {next(iter(params))} is empty; it needs at least one value"):
        wb.get_method(method, **params)


def test_a_test_folder_beside_class_folders_warns_and_names_layout(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog", "test"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / cls / f"{i}.png")
    with pytest.warns(UserWarning, match=r"\['test'\] are named like splits .*layout='classes'"):
        ds = wb.data.from_folder(tmp_path)
    assert "test" in ds.class_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wb.data.from_folder(tmp_path, layout="classes")   # explicit: no warning


# -- results.csv: nothing finished is lost -------------------------------------------------------------------

import pandas as pd  # noqa: E402

from workbench import results as results_mod  # noqa: E402


def _row(cell, acc):
    return {"cell_id": cell, "run_id": f"r-{cell}", "dataset": "d", "accuracy": acc}


def test_missing_final_newline_keeps_the_finished_row(tmp_path):
    table = results_mod.ResultsTable(tmp_path)
    table.append(_row("a", 0.5))
    table.append(_row("b", 0.25))
    table.path.write_text(table.path.read_text().rstrip("\n"))   # an editor dropped the final newline
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table.append(_row("c", 0.75))
    got = pd.read_csv(table.path)
    assert list(got["cell_id"]) == ["a", "b", "c"] and table.path.read_text().endswith("\n")


def test_a_hand_added_row_with_a_comma_is_moved_aside_never_deleted(tmp_path):
    table = results_mod.ResultsTable(tmp_path)
    table.append(_row("a", 0.5))
    bad = "b,r-b,my set, with a comma,0.9\n"
    table.path.write_text(table.path.read_text() + bad)
    with pytest.warns(UserWarning) as caught:
        table.append(_row("c", 0.75))
    said = [str(w.message) for w in caught]
    assert any(re.search(r"results.csv, line 3: malformed row.*moved, not deleted, to results.rejected", m) for m in said)
    assert any(re.search(r"moved 1 malformed line\(s\) to .*results.rejected.csv", m) for m in said)
    assert list(pd.read_csv(table.path)["cell_id"]) == ["a", "c"]
    assert (tmp_path / "results.rejected.csv").read_text() == bad


def test_semicolon_table_is_refused_by_resume_and_summarize(tmp_path, capsys):
    from workbench import cli

    table = results_mod.ResultsTable(tmp_path)
    table.append(_row("a", 0.5))
    pd.read_csv(table.path).to_csv(table.path, sep=";", index=False)
    before = table.path.read_text()
    with pytest.raises(ConfigError, match=r"results.csv is ;-separated.*not read, so no finished run is recomputed"):
        table.append(_row("b", 0.1))
    assert table.path.read_text() == before
    assert cli.main(["summarize", str(table.path)]) == 2
    assert ";-separated" in capsys.readouterr().err


# -- full disk / read-only folders: clear errors, older files intact ---------------------------------------

def test_predictor_save_on_a_full_disk_names_the_folder_and_keeps_the_old_one(saved_model, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    before = sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    model = wb.load(folder)
    real_write = type(folder).write_text

    def full(self, *a, **k):
        if self.name == "predictor.json":
            raise OSError(28, "No space left on device", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(type(folder), "write_text", full)
    with pytest.raises(ConfigError, match=r"cannot save the model to .*model'.*No space left.*older model .* intact"):
        model.save(folder)
    monkeypatch.undo()
    assert sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]   # no partial folder left


def test_split_file_on_a_read_only_split_dir_names_the_path(tmp_path, monkeypatch):
    from workbench.data import synthetic_shapes
    from workbench.data.sampling import sample_few_shot

    ds = synthetic_shapes(2, train_per_class=3, val_per_class=2, test_per_class=1, image_size=32)

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(ConfigError, match=r"cannot write split file .*shots1_seed1_val1.json.*Permission denied"):
        sample_few_shot(ds, 1, 1, split_dir=tmp_path / "splits")


# -- a notebook runs on a dataset YAML given by its path -------------------------------------------------------

def test_dataset_yaml_parameter_loads_and_validates_the_file(tmp_path):
    from workbench.paths import repo_root

    path = sorted(repo_root().glob("domains/*/whu_rs19_mini.yaml"))[0]
    ds = domains.dataset_from_parameters({"dataset_yaml": str(path.relative_to(repo_root())), "name": ""})
    assert ds.name == "whu_rs19_mini"
    hostile = tmp_path / "x.yaml"
    hostile.write_text(path.read_text() + "\"x = 1; __import__('os').system('touch pwned')  #\": 1\n")
    with pytest.raises(ConfigError, match="x.yaml: unknown key"):
        domains.dataset_from_parameters({"dataset_yaml": str(hostile)})
    with pytest.raises(ConfigError, match="dataset_yaml': expected the path of a dataset YAML"):
        domains.dataset_from_parameters({"dataset_yaml": "data/images/"})


def test_notebook_05_declares_the_dataset_yaml_parameter():
    from workbench import notebook

    declared = notebook.declared_parameters("05_domains.ipynb")
    assert "dataset_yaml" in declared
