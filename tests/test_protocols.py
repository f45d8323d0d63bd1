"""Every protocol through compare: base-to-new for every method, cross-dataset, budget sampling, one table."""
import dataclasses
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.base2new import NEW_CLASS_RULES, harmonic_mean, new_class_rule
from workbench.data import synthetic_shapes
from workbench.data.dataset import Sample
from workbench.errors import ConfigError, DataError
from workbench.methods.registry import method_names
from workbench.protocols import shared_classes


@pytest.fixture(scope="module")
def four():
    return synthetic_shapes(4, train_per_class=8, val_per_class=2, test_per_class=5, image_size=32)


@pytest.fixture()
def cache(backbone):
    return wb.FeatureCache(backbone, None, show_progress=False)


# -- base-to-new ------------------------------------------------------------------------------------

def test_every_registered_method_has_a_base_to_new_rule():
    assert set(method_names()) <= set(NEW_CLASS_RULES)
    cannot = sorted(m for m in method_names() if new_class_rule(m).how is None)
    assert cannot == ["chexzero", "linear_probe", "lp_plus_plus", "ovr_linear_probe", "pairs_full", "pairs_lora",
                      "pairs_svd", "tda", "transclip"]


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.0, 0.0) == 0.0 and np.isnan(harmonic_mean(float("nan"), 0.5))


def test_a_two_class_set_is_refused_before_any_work(backbone):
    two = synthetic_shapes(2, train_per_class=4, val_per_class=1, test_per_class=2, image_size=32)
    with pytest.raises(ConfigError, match=r"at least 4 classes .* 'synthetic_shapes2' has 2 \(circle, square\).*"
                                          r"protocol='default'"):
        wb.compare(two, backbone, ["zero_shot"], [1], [1], protocol="base_to_new")


def _zero_shot_accuracy(backbone, subset, templates, cache):
    """Independent float64 zero-shot accuracy of ``subset``'s test images among its own classes."""
    feats = cache.get(subset, subset.split("test"))
    text = np.stack([np.mean([backbone.text_features([t.format(c)])[0].double().numpy() for t in templates], 0)
                     for c in subset.class_names])
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    pred = (feats.x.double().numpy() @ text.T).argmax(1)
    return float((pred == feats.labels.numpy()).mean())


def test_base_to_new_rows_scores_hm_and_reasons(backbone, four, cache, quiet):
    table = wb.compare(four, backbone, ["zero_shot", "tip_adapter", "linear_probe"], [2], [1], cache=cache,
                       protocol="base_to_new")
    rows = table.set_index("method")
    assert (table["protocol"] == "base_to_new").all() and (table["metric"] == "hm").all()
    # zero-shot: base and new accuracy are plain zero-shot on each half, among that half's classes
    from workbench.base2new import split_classes

    base, new = split_classes(four)
    assert rows.loc["zero_shot", "base_accuracy"] == pytest.approx(_zero_shot_accuracy(backbone, base,
                                                                                       four.templates, cache))
    assert rows.loc["zero_shot", "new_accuracy"] == pytest.approx(_zero_shot_accuracy(backbone, new,
                                                                                      four.templates, cache))
    # Tip-Adapter falls back to zero-shot on the new classes: the same new accuracy
    assert rows.loc["tip_adapter", "new_accuracy"] == rows.loc["zero_shot", "new_accuracy"]
    for m in ("zero_shot", "tip_adapter"):
        b, n = rows.loc[m, "base_accuracy"], rows.loc[m, "new_accuracy"]
        assert rows.loc[m, "hm"] == pytest.approx(0.0 if b + n == 0 else 2 * b * n / (b + n))
    # a method that cannot: a row with the reason, no crash, no scores
    assert np.isnan(rows.loc["linear_probe", "hm"]) and "cannot" in rows.loc["linear_probe", "note"]
    assert "zero-shot" in rows.loc["tip_adapter", "note"]
    summary = wb.summarize(table).set_index("method")
    assert (summary["protocol"] == "base_to_new").all() and (summary["metric"] == "hm").all()


def test_a_trained_method_end_to_end_and_clip_adapter_uses_its_adapter_on_new_classes(backbone, four, cache, quiet):
    from workbench.base2new import run_base_to_new

    row = run_base_to_new(four, backbone, shots=2, seed=1, method="coop", cache=cache,
                          method_params={"epochs": 1, "augment_views": 1, "batch_size": 4})
    assert (row["base_classes"], row["new_classes"]) == (2, 2) and 0 <= row["hm"] <= 1
    assert row["hm"] == pytest.approx(harmonic_mean(row["base_accuracy"], row["new_accuracy"]))
    assert "prompts" in row["note"]

    # CLIP-Adapter re-targeted: the fitted adapter on image features, the new names' text classifier
    from workbench.base2new import prepare_base_to_new, retarget

    base, new, split, task, templates = prepare_base_to_new(four, backbone, 2, 1, cache=cache)
    fitted = wb.get_method("clip_adapter", epochs=2).fit(task)
    logits_fn, encoder = retarget(fitted, "clip_adapter", backbone, new.class_names, templates)
    x = cache.get(new, new.split("test")).x
    text = wb.prompts.text_classifier(backbone, new.class_names, templates).double()
    r = fitted.config.ratio
    h = torch.relu(torch.relu(x.double() @ fitted.down.double().T) @ fitted.up.double().T)
    blended = r * h + (1 - r) * x.double()
    expected = float(fitted.scale) * (blended / blended.norm(dim=-1, keepdim=True)) @ text.T + float(fitted.bias)
    assert encoder is backbone and torch.allclose(logits_fn(x).double(), expected, atol=1e-4)


def test_run_base_to_new_refuses_a_method_that_cannot_before_fitting(backbone, four):
    from workbench.base2new import run_base_to_new

    with pytest.raises(ConfigError, match="'lp_plus_plus' cannot classify classes it was not trained on"):
        run_base_to_new(four, backbone, shots=2, method="lp_plus_plus")


# -- cross-dataset ------------------------------------------------------------------------------------

def _source_and_target():
    """Two tiny sets sharing two classes under other names: square = 'box', circle = 'round'."""
    source = synthetic_shapes(shapes=["circle", "square", "triangle"], train_per_class=8, val_per_class=2,
                              test_per_class=4, image_size=32, name="source_shapes")
    drawn = synthetic_shapes(shapes=["circle", "square", "ring"], train_per_class=2, val_per_class=0,
                             test_per_class=6, image_size=32, seed=5, name="target_shapes")
    # other images, another class order and other names (the generator's hue follows the drawn shape)
    order = {0: 1, 1: 0, 2: 2}
    splits = {k: [Sample(s.id, order[s.label], s.ref) for s in v] for k, v in drawn.splits.items()}
    target = dataclasses.replace(drawn, class_ids=["square", "circle", "ring"], class_names=["box", "round", "ring"],
                                 splits=splits)
    target.class_map = {"source_shapes": {"box": "square", "round": "circle"}}
    return source, target


def test_shared_classes_by_name_and_class_map():
    source, target = _source_and_target()
    assert shared_classes(source, target) == [(1, 0), (0, 1)]   # box=square, round=circle; ring unshared
    target.class_map = {}
    assert shared_classes(source, target) == []
    assert shared_classes(source, target, {"box": "square", "ring": "circle"}) == [(1, 0), (0, 2)]
    with pytest.raises(ConfigError, match=r"class_map argument: class_map names 'sqare', not a class of "
                                          r"'source_shapes'.*Did you mean 'square'"):
        shared_classes(source, target, {"box": "sqare"})


def test_remote_sensing_yamls_map_their_classes_to_resisc45():
    from workbench.domains import load_spec

    def named(name):
        spec = load_spec(name)
        return SimpleNamespace(name=name, class_names=list(spec["classes"].values()),
                               class_map=spec.get("class_map") or {}, source={"spec": spec["_file"]})

    resisc, whu = named("resisc45"), wb.load_dataset("whu_rs19_mini")
    pairs = {(resisc.class_names[s], whu.class_names[t]) for s, t in shared_classes(resisc, whu)}
    assert {("harbor", "port"), ("commercial area", "commercial"), ("airport", "airport")} <= pairs and len(pairs) == 13
    ucm = named("uc_merced")
    pairs = {(resisc.class_names[s], ucm.class_names[t]) for s, t in shared_classes(resisc, ucm)}
    assert ("storage tank", "storage tanks") in pairs and len(pairs) == 19
    shared = {n: len(shared_classes(resisc, named(n))) for n in ("aid", "patternnet", "optimal31", "whu_rs19")}
    assert shared == {"aid": 20, "patternnet": 21, "optimal31": 31, "whu_rs19": 13}


def test_class_map_naming_an_unknown_class_is_refused_naming_the_file():
    import copy

    from workbench.domains import load_spec, validate_spec

    spec = copy.deepcopy({k: v for k, v in load_spec("whu_rs19_mini").items() if not k.startswith("_")})
    spec["class_map"]["resisc45"]["harbour"] = "harbor"
    with pytest.raises(ConfigError, match=r"x\.yaml: 'class_map\.resisc45' has class 'harbour'"):
        validate_spec(spec, "x.yaml")


def test_cross_dataset_scores_the_source_model_on_the_shared_classes(backbone, cache, quiet):
    source, target = _source_and_target()
    table = wb.compare(source, backbone, ["linear_probe", "zero_shot"], [4], [1], cache=cache,
                       protocol="cross_dataset", targets=[target])
    row = table.set_index("method").loc["linear_probe"]
    assert (row["protocol"], row["eval_dataset"], row["eval_classes"]) == ("cross_dataset", "target_shapes", "shared")
    assert row["n_classes"] == 2 and row["n_test"] == 12 and "box=square" in row["note"]
    # independent: the same fitted probe, its logits restricted to (square, circle) in the target's order
    run = wb.run_experiment(source, backbone, "linear_probe", 4, 1, cache=cache)
    feats = cache.get(target, [s for s in target.split("test") if s.label in (0, 1)])
    logits = run.method.predict_logits(feats.raw.mean(0)).double().numpy()[:, [1, 0]]
    assert row["accuracy"] == pytest.approx(float((logits.argmax(1) == feats.labels.numpy()).mean()))
    assert row["accuracy"] > 0.8   # same shapes, other images: the probe transfers


def test_cross_dataset_on_all_target_classes_and_a_method_that_cannot(backbone, cache, quiet):
    source, target = _source_and_target()
    table = wb.compare(source, backbone, ["zero_shot", "linear_probe"], [2], [1], cache=cache,
                       protocol="cross_dataset", targets=[target], eval_classes="all")
    rows = table.set_index("method")
    assert rows.loc["zero_shot", "n_classes"] == 3 and rows.loc["zero_shot", "n_test"] == 18
    assert rows.loc["zero_shot", "accuracy"] == pytest.approx(
        _zero_shot_accuracy(backbone, target, source.templates, cache))
    assert np.isnan(rows.loc["linear_probe", "accuracy"]) and "cannot" in rows.loc["linear_probe", "note"]


def test_cross_dataset_bad_input_before_any_work(backbone):
    source, target = _source_and_target()
    target.class_map = {}
    with pytest.raises(ConfigError, match=r"share 0 class\(es\).*class_map.*eval_classes='all'"):
        wb.compare(source, backbone, ["zero_shot"], [1], [1], protocol="cross_dataset", targets=[target])
    with pytest.raises(ConfigError, match="needs targets="):
        wb.compare(source, backbone, ["zero_shot"], [1], [1], protocol="cross_dataset")
    with pytest.raises(ConfigError, match="protocol must be one of"):
        wb.compare(source, backbone, ["zero_shot"], [1], [1], protocol="base2new")


# -- budget mode and the primary metric ---------------------------------------------------------------

def _imbalanced():
    ds = synthetic_shapes(3, train_per_class=12, val_per_class=2, test_per_class=4, image_size=32)
    rare = [s for s in ds.split("train") if s.label == 2][:2]   # class 2 (triangle) keeps 2 images
    train = [s for s in ds.split("train") if s.label != 2] + rare
    ds = dataclasses.replace(ds, splits={**ds.splits, "train": train}, name="imbalanced_shapes")
    ds.metric = "balanced_accuracy"
    return ds


def test_k_above_the_smallest_class_names_it_and_budget_mode_runs(backbone, cache, quiet):
    ds = _imbalanced()
    with pytest.raises(DataError, match=r"class 'triangle' has only 2 training image\(s\).*budgets=\[N\]"):
        wb.compare(ds, backbone, ["zero_shot"], [4], [1], cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = wb.compare(ds, backbone, ["linear_probe"], [], [1], cache=cache, budgets=[12])
    row = table.iloc[0]
    assert (row["budget"], row["allocation"], row["shots"], row["metric"]) == (12, "proportional", 4,
                                                                                "balanced_accuracy")
    run = wb.run_experiment(ds, backbone, "linear_probe", None, 1, cache=cache, budget=12)
    assert run.record["split"]["per_class"] == {"circle": 5, "square": 5, "triangle": 2}
    assert wb.summarize(table)["metric"].iloc[0] == "balanced_accuracy"


def test_choice_uses_the_primary_metric_on_validation():
    rows = []
    for method, val_acc, val_bal in (("a", 0.9, 0.5), ("b", 0.6, 0.8)):   # accuracy prefers a, balanced b
        rows.append({"dataset": "d", "method": method, "shots": 4, "seed": 1, "metric": "balanced_accuracy",
                     "val_accuracy": val_acc, "val_balanced_accuracy": val_bal, "fit_seconds": 1.0,
                     "accuracy": 0.5, "balanced_accuracy": 0.5})
    table = pd.DataFrame(rows)
    assert wb.report.choose_on_validation(table) == "b"
    assert wb.report.choose_on_validation(table, metric="accuracy") == "a"


# -- one table -----------------------------------------------------------------------------------------

def test_protocols_share_one_results_file_and_old_files_resume(backbone, four, cache, tmp_path, quiet):
    out = tmp_path / "out"
    wb.compare(four, backbone, ["zero_shot"], [1], [1], cache=cache, out_dir=out)
    # a results file from before the protocol columns: drop them, as an older version wrote it
    path = out / "results.csv"
    old = pd.read_csv(path)
    old.drop(columns=[c for c in ("protocol", *wb.experiment.PROTOCOL_COLUMNS) if c in old]).to_csv(path, index=False)
    again = wb.compare(four, backbone, ["zero_shot"], [1], [1], cache=cache, out_dir=out)
    assert len(pd.read_csv(path)) == 1 and again["protocol"].tolist() == ["default"]   # resumed, not rerun
    wb.compare(four, backbone, ["zero_shot"], [2], [1], cache=cache, out_dir=out, protocol="base_to_new")
    table = pd.read_csv(path)
    assert sorted(table["protocol"].fillna("default")) == ["base_to_new", "default"]
    assert list(wb.compare(four, backbone, ["zero_shot"], [2], [1], cache=cache, out_dir=out,
                           protocol="base_to_new")["protocol"]) == ["base_to_new"]
    assert len(pd.read_csv(path)) == 2   # the base-to-new run resumed too
    from workbench.results import read_table

    summary = wb.summarize(read_table(path))
    assert set(summary["protocol"]) == {"default", "base_to_new"}


def test_a_sweep_runs_base_to_new_into_the_same_table(tmp_path, quiet):
    from workbench.sweep import SweepSpec, sweep

    ds = synthetic_shapes(4, train_per_class=3, val_per_class=0, test_per_class=2, image_size=32)
    for split in ("train", "test"):   # a small image folder: root/<split>/<class>/*.png
        for s in ds.split(split):
            path = tmp_path / "data" / split / ds.class_ids[s.label] / f"{s.id.replace('/', '_')}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.reader(s.ref).save(path)
    spec = {"datasets": [str(tmp_path / "data")], "methods": ["zero_shot", "linear_probe"], "shots": [1],
            "seeds": [1], "output_dir": str(tmp_path / "sweep"), "protocol": "base_to_new"}
    summary = sweep(spec, show_progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    table = pd.read_csv(tmp_path / "sweep" / "results.csv").set_index("method")
    assert (table["protocol"] == "base_to_new").all() and 0 <= table.loc["zero_shot", "hm"] <= 1
    assert "cannot" in table.loc["linear_probe", "note"]
    with pytest.raises(ConfigError, match="cross-dataset runs need targets"):
        SweepSpec(**{**spec, "protocol": "cross_dataset"})


@pytest.mark.parametrize("method,params", [("zero_shot", {}), ("clip_adapter", {"epochs": 2}),
                                           ("clip_lora", {"iterations": 1, "batch_size": 4, "lr": 1e-2})])
def test_retargeting_to_the_fitted_classes_gives_back_the_fitted_logits(method, params, backbone, four, cache, quiet):
    """The new-class head is built from class names alone: given the base names it is the base classifier
    (CLIP-LoRA: the adapted text encoder; the frozen one differs by 0.03 in the logits at this lr)."""
    from workbench.base2new import prepare_base_to_new, retarget

    base, new, split, task, templates = prepare_base_to_new(four, backbone, 1, 1, cache=cache)
    fitted = wb.get_method(method, **params).fit(task)
    logits_fn, encoder = retarget(fitted, method, backbone, base.class_names, templates)
    assert encoder is fitted.image_backbone(backbone)   # CLIP-LoRA: the adapted image encoder
    x = (cache if encoder is backbone else wb.FeatureCache(encoder, None, show_progress=False)).get(
        base, base.split("test")).x
    assert torch.allclose(logits_fn(x), fitted.predict_logits(x), atol=1e-4)


def test_base_to_new_with_more_shots_than_a_base_class_holds_names_it(backbone, cache):
    ds = synthetic_shapes(4, train_per_class=3, val_per_class=1, test_per_class=2, image_size=32)
    with pytest.raises(DataError, match=r"base-to-new on dataset 'synthetic_shapes4': shots=16 per base class, but "
                                        r"base class 'circle' has only 3 training image\(s\)\. Use shots <= 3"):
        wb.compare(ds, backbone, ["zero_shot"], [16], [1], cache=cache, protocol="base_to_new")
