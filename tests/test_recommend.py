"""wb.recommend: nested selection on the K-shot data only, bootstrap intervals, paired comparisons, budget."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.data import synthetic_shapes
from workbench.errors import ConfigError
from workbench.methods.base import Method, NoConfig
from workbench.methods import registry
from workbench.recommend import (RULES, PooledCache, bootstrap, bootstrap_draws, candidate_methods, choose, interval,
                                 metric_from_labels, p_beats, p_best, pooled_scores, recommend, resplit,
                                 selection_scores)


@pytest.fixture(scope="module")
def shapes4():
    return synthetic_shapes(4, train_per_class=12, val_per_class=4, test_per_class=6, name="rec_shapes")


class _Centroid(Method):
    """Nearest class mean of the support features: clearly better than a constant on the shapes."""
    Config = NoConfig

    def fit(self, task):
        f = task.support()
        self.class_names = task.class_names
        self.means = F.normalize(torch.stack([f.x[f.labels == c].mean(0) for c in range(task.n_classes)]), dim=-1)
        return self

    def predict_logits(self, features):
        return 30 * features @ self.means.T

    def state(self):
        return {"means": self.means}

    def load_state(self, state):
        self.means = state["means"]


class _Constant(Method):
    """Always the first class."""
    Config = NoConfig

    def fit(self, task):
        self.class_names = task.class_names
        return self

    def predict_logits(self, features):
        out = torch.zeros(len(features), len(self.class_names))
        out[:, 0] = 1.0
        return out

    def state(self):
        return {"dummy": torch.zeros(1)}

    def load_state(self, state):
        pass


@pytest.fixture
def user_methods():
    """Two user methods registered for one test and removed afterwards (the registry is process-wide)."""
    registry.register("test_rec_centroid")(_Centroid)
    registry.register("test_rec_constant")(_Constant)
    yield "test_rec_centroid", "test_rec_constant"
    for name in ("test_rec_centroid", "test_rec_constant"):
        registry._CLASSES.pop(name, None)
        registry._ENTRIES.pop(name, None)


# -- the bootstrap against an independent loop ------------------------------------------------

def _sklearn_metric(y, p, metric):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if metric == "accuracy":
            return accuracy_score(y, p)
        if metric == "balanced_accuracy":
            return balanced_accuracy_score(y, p)
        return f1_score(y, p, average="macro", zero_division=0)


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "macro_f1"])
def test_bootstrap_matches_an_independent_loop(metric):
    rng = np.random.default_rng(3)
    sizes, n_classes, n_cand, n_boot = [7, 5, 9], 3, 3, 60
    groups = []
    for n in sizes:
        y = rng.integers(0, n_classes, n)
        good = np.where(rng.random(n) < 0.8, y, rng.integers(0, n_classes, n))
        groups.append((y, np.stack([good, rng.integers(0, n_classes, n), np.zeros(n, int)])))
    point, reps = bootstrap(groups, n_classes, metric, n_boot=n_boot, seed=11)

    # independent: the documented draw order, sklearn's metrics, plain loops
    draw = np.random.default_rng(11)
    picks = draw.integers(0, len(sizes), size=(n_boot, len(sizes)))
    images = [draw.integers(0, n, size=(n_boot, n)) for n in sizes]
    expected = np.zeros((n_boot, n_cand))
    for b in range(n_boot):
        for g in picks[b]:
            y, p = groups[g]
            idx = images[g][b]
            for m in range(n_cand):
                expected[b, m] += _sklearn_metric(y[idx], p[m, idx], metric) / len(sizes)
    np.testing.assert_allclose(reps, expected, atol=1e-12)
    np.testing.assert_allclose(point, [np.mean([_sklearn_metric(y, p[m], metric) for y, p in groups])
                                       for m in range(n_cand)], atol=1e-12)
    p01 = np.mean([1.0 if expected[b, 0] > expected[b, 1] else 0.5 if expected[b, 0] == expected[b, 1] else 0.0
                   for b in range(n_boot)])
    assert p_beats(reps, 0, 1) == pytest.approx(p01)
    assert p_beats(reps, 0, 1) + p_beats(reps, 1, 0) == pytest.approx(1.0)
    low, high = interval(reps, 0.9)
    assert low[0] == pytest.approx(np.percentile(expected[:, 0], 5)) and high[0] == pytest.approx(
        np.percentile(expected[:, 0], 95))


def test_draws_are_fixed_by_the_seed_and_groups_are_drawn_g_times():
    counts, images = bootstrap_draws([4, 6], 50, seed=5)
    again, images2 = bootstrap_draws([4, 6], 50, seed=5)
    assert (counts == again).all() and all((a == b).all() for a, b in zip(images, images2))
    assert (counts.sum(1) == 2).all() and images[1].shape == (50, 6) and images[1].max() < 6


def test_metric_from_labels_agrees_with_workbench_metrics():
    from workbench.metrics import compute_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 40), rng.integers(0, 3, 40)   # class 3 never predicted
    logits = np.eye(4)[p]
    ref = compute_metrics(logits, y, 4)
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert metric_from_labels(y, p, 4, m) == pytest.approx(ref[m])


# -- the selection rules on constructed tables -----------------------------------------------

def test_pooled_rule_computes_the_metric_once_per_cross_validation_like_sklearn_on_the_concatenation():
    rng = np.random.default_rng(4)
    sizes, keys = [3, 4, 3, 5, 5], [(1, 0), (1, 0), (1, 0), (2, 0), (2, 0)]
    groups = [(rng.integers(0, 3, n), rng.integers(0, 3, (2, n))) for n in sizes]
    got = pooled_scores(groups, keys, 3, "balanced_accuracy")
    expected = []
    for m in range(2):
        per_cv = []
        for key in [(1, 0), (2, 0)]:
            y = np.concatenate([g[0] for g, k in zip(groups, keys) if k == key])
            p = np.concatenate([g[1][m] for g, k in zip(groups, keys) if k == key])
            per_cv.append(_sklearn_metric(y, p, "balanced_accuracy"))
        expected.append(np.mean(per_cv))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # not the per-fold mean: fold 1 has one image of class 1 (missed), fold 2 only class 1 (all right)
    folds = [(np.array([0, 0, 1]), np.array([[0, 0, 0]])), (np.array([1, 1, 1, 1]), np.array([[1, 1, 1, 1]]))]
    per_fold = np.mean([_sklearn_metric(y, p[0], "balanced_accuracy") for y, p in folds])
    assert per_fold == pytest.approx((0.5 + 1.0) / 2)
    pooled = pooled_scores(folds, [(1, 0), (1, 0)], 2, "balanced_accuracy")[0]
    assert pooled == pytest.approx((2 / 2 + 4 / 5) / 2)   # recall of class 0, of class 1 over all 7 images
    assert selection_scores("pooled", None, None, folds, [(1, 0), (1, 0)], 2, "balanced_accuracy")[0] == pooled
    assert pooled_scores(folds, [(1, 0), (2, 0)], 2, "accuracy")[0] == pytest.approx((2 / 3 + 1) / 2)
    assert pooled_scores(folds, [(1, 0), (1, 0)], 2, "accuracy")[0] == pytest.approx(6 / 7)


def test_p_best_rule_counts_the_replicates_each_candidate_wins_with_ties_split():
    reps = np.array([[0.9, 0.5, 0.1], [0.5, 0.55, 0.2], [0.5, 0.55, 0.55], [0.5, 0.55, 0.3]])
    expected = np.zeros(3)
    for row in reps:                      # independent: a plain loop over replicates
        winners = [m for m in range(3) if row[m] == max(row)]
        for m in winners:
            expected[m] += 1 / len(winners) / len(reps)
    np.testing.assert_allclose(p_best(reps), expected)
    np.testing.assert_allclose(p_best(reps), [0.25, 0.625, 0.125])
    # the mean prefers the candidate lifted by one lucky replicate; p_best the one that wins consistently
    point = reps.mean(0)
    tiers, order = [0, 0, 0], [0, 1, 2]
    assert choose(selection_scores("mean", point, reps, None, None, 3, "accuracy"), point, tiers, order) == 0
    assert choose(selection_scores("p_best", point, reps, None, None, 3, "accuracy"), point, tiers, order) == 1
    # ties: the higher mean, then the cheaper tier, then the order given
    assert choose(np.array([0.5, 0.5]), np.array([0.6, 0.7]), [0, 0], [0, 1]) == 1
    assert choose(np.array([0.5, 0.5]), np.array([0.7, 0.7]), [1, 0], [0, 1]) == 1
    assert choose(np.array([0.5, 0.5]), np.array([0.7, 0.7]), [0, 0], [0, 1]) == 0
    with pytest.raises(ConfigError, match="rule must be one of .*Did you mean 'pooled'"):
        selection_scores("poolled", point, reps, None, None, 3, "accuracy")


# -- re-splits and the pooled cache -----------------------------------------------------------

def test_resplit_holds_out_part_of_each_class_and_keeps_the_protocol_ratio(shapes4):
    split = wb.sample_few_shot(shapes4, 4, 1)
    pool = {s.id for s in split.train(shapes4) + split.val(shapes4)}
    test = {s.id for s in shapes4.split("test")}
    inner, held = resplit(shapes4, split, 0, 1 / 3)
    held_ids = {s.id for s in held}
    assert set(inner.train_ids) | set(inner.val_ids) | held_ids == pool
    assert not (set(inner.train_ids) & held_ids or set(inner.val_ids) & held_ids or set(inner.train_ids)
                & set(inner.val_ids) or pool & test)
    labels = [s.label for s in held]
    assert sorted(labels) == sorted([c for c in range(4)] * 3)              # round(8/3) = 3 per class
    assert len(inner.train_ids) == 4 * 3 and len(inner.val_ids) == 4 * 2    # 5 left: 2 val (ratio 4:4), 3 support
    assert resplit(shapes4, split, 0, 1 / 3)[0].train_ids == inner.train_ids   # reproducible
    assert resplit(shapes4, split, 1, 1 / 3)[0].train_ids != inner.train_ids   # another re-split differs
    # cross-validation: three consecutive re-splits hold out every labelled image exactly once
    for repetition in (0, 1):
        held_out = [s.id for r in range(3 * repetition, 3 * repetition + 3)
                    for s in resplit(shapes4, split, r, 1 / 3)[1]]
        assert sorted(held_out) == sorted(pool)
    assert {s.id for s in resplit(shapes4, split, 3, 1 / 3)[1]} != held_ids     # a new shuffle per repetition


def test_a_class_with_one_labelled_image_is_never_held_out(shapes4):
    split = wb.sample_few_shot(shapes4, 1, 2, val_shots=0)
    inner, held = resplit(shapes4, split, 0, 0.5)
    assert held == [] and len(inner.train_ids) == 4


def test_pooled_cache_serves_rows_equal_to_the_subsets_own_encoding(backbone, shapes4, tmp_path):
    from workbench.task import FitView

    split = wb.sample_few_shot(shapes4, 2, 1)
    real = wb.FeatureCache(backbone, None, show_progress=False)
    view = FitView(shapes4, split)
    pool = split.train(shapes4) + split.val(shapes4)
    pooled = PooledCache(real, view, pool)
    subset = pool[1:5]
    for views in (0, 2):
        got = pooled.get(view, subset, views=views, aug_seed=7)
        own = wb.FeatureCache(backbone, None, show_progress=False).get(view, subset, views=views, aug_seed=7)
        assert got.ids == own.ids and torch.equal(got.labels, own.labels)
        torch.testing.assert_close(got.raw, own.raw, rtol=1e-5, atol=1e-6)
    before = real.stats["misses"]
    pooled.get(view, pool[5:7], views=2, aug_seed=7)
    assert real.stats["misses"] == before        # another subset: served from the pool, nothing encoded
    test = pooled.get(shapes4, shapes4.split("test")[:3])   # not in the pool: the real cache, unchanged
    assert test.ids == [s.id for s in shapes4.split("test")[:3]]


# -- the budget and bad input -----------------------------------------------------------------

def test_budget_picks_candidates_from_the_registry_cost_per_device():
    features = [e.name for e in registry.METHODS if e.family == "features" and "single_label" in e.tasks]
    assert candidate_methods(None, "minutes", "cpu")[0] == features      # GPU minutes are CPU hours
    on_gpu = candidate_methods(None, "minutes", "cuda")[0]
    assert "coop" in on_gpu and "clip_lora" in on_gpu
    kept, excluded = candidate_methods(["gda", "coop"], "seconds", "cuda")
    assert kept == ["gda"] and "coop" in excluded and "minutes" in excluded["coop"]
    assert "coop" in candidate_methods(None, "hours", "cpu")[0]


def test_candidates_follow_the_task_kind_of_the_dataset():
    every = candidate_methods(None, "hours", "cuda")[0]
    assert not any(m.startswith("pairs_") for m in every) and "chexzero" not in every and "gda" in every
    multi = candidate_methods(None, "hours", "cuda", "multi_label")[0]
    assert multi == [e.name for e in registry.METHODS if "multi_label" in e.tasks]
    assert {"chexzero", "ovr_linear_probe", "dualcoop", "clip_lora"} <= set(multi) and "gda" not in multi
    with pytest.raises(ConfigError, match=r"'pairs_lora' does not support single_label.*'gda'"):
        candidate_methods(["gda", "pairs_lora"], "hours", "cuda")
    with pytest.raises(ConfigError, match=r"'gda' does not support multi_label.*'chexzero'.*'ovr_linear_probe'"):
        candidate_methods(["gda", "chexzero"], "hours", "cuda", "multi_label")


def test_an_explicit_candidate_of_another_kind_is_refused_before_any_encoding(backbone, shapes4, monkeypatch):
    from workbench.features import FeatureCache

    def no_encoding(*args, **kwargs):
        raise AssertionError("an image was encoded before the candidates were checked")

    monkeypatch.setattr(FeatureCache, "get", no_encoding)
    with pytest.raises(ConfigError, match="'linear_probe' does not support multi_label.*'ovr_linear_probe'"):
        recommend("whu_rs19_mosaic", backbone, ["chexzero", "linear_probe"], shots=2, seeds=[1], budget="seconds")
    with pytest.raises(ConfigError, match="'pairs_svd' does not support single_label"):
        recommend(shapes4, backbone, ["gda", "pairs_svd"], shots=2, seeds=[1], budget="hours")


def test_a_budget_no_candidate_fits_names_the_budget_and_the_cheapest_estimate():
    with pytest.raises(ConfigError, match=r"budget 'seconds': no candidate fits — the cheapest, 'coop', is expected "
                                          r"to take hours per run on this device \(cpu"):
        candidate_methods(["coop", "clip_lora"], "seconds", "cpu")
    with pytest.raises(ConfigError, match="budget must be one of .*Did you mean 'minutes'"):
        candidate_methods(None, "minute", "cpu")


def test_bad_input_is_refused_before_any_image_is_encoded(backbone, shapes4, monkeypatch, quiet):
    from workbench.features import FeatureCache

    def no_encoding(*args, **kwargs):
        raise AssertionError("an image was encoded before the input was checked")

    monkeypatch.setattr(FeatureCache, "get", no_encoding)
    bad = [dict(methods=["clip_lora"], budget="seconds"), dict(resplits=0), dict(holdout=1.5),
           dict(metric="macro_auroc"), dict(methods=["gdaa"]), dict(seeds=[None]), dict(shots=0),
           dict(method_params={"gda": {"no_such_parameter": 1}}), dict(n_boot=10), dict(rule="median")]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            recommend(shapes4, backbone, **{"methods": ["zero_shot", "gda"], **kwargs})
    one_each = [next(s for s in shapes4.split("train") if s.label == c) for c in range(4)]
    tiny = dataclasses.replace(shapes4, splits={"train": one_each, "test": shapes4.split("test")})
    with pytest.raises(ConfigError, match="no class of 'rec_shapes' has two labelled images"):
        recommend(tiny, backbone, ["zero_shot", "gda"], shots=1, seeds=[1], budget="seconds")


# -- the recommendation end to end ----------------------------------------------------------------

def test_a_clearly_better_method_is_chosen_with_p_near_one_and_saved(backbone, shapes4, user_methods, tmp_path,
                                                                      quiet):
    good, bad = user_methods
    rec = recommend(shapes4, backbone, [bad, good], shots=4, seeds=[1, 2], budget="minutes", out_dir=tmp_path,
                    n_boot=1000)
    assert (rec.method, rec.backbone) == (good, "workbench-tiny")
    loser = rec.table[(rec.table["method"] == bad)].iloc[0]
    assert loser["p_chosen_beats"] >= 0.99 and rec.pairwise.loc[f"{good} · workbench-tiny",
                                                                f"{bad} · workbench-tiny"] >= 0.99
    assert rec.ranking()["vs chosen"].tolist() == ["chosen", "**"]
    assert rec.ci_low <= rec.estimate <= rec.ci_high and rec.ci_low > loser["ci_high"]
    assert loser["estimate"] == pytest.approx(0.25)   # the constant is right on one class in four
    assert f"{good} on workbench-tiny is the best choice" in rec.summary and "significantly worse" in rec.summary
    # the winner, refitted on the full K-shot split, is saved and predicts
    model = wb.load(rec.model_dir)
    images = [img for img, _ in wb.report.sample_images(shapes4, "test", n=3)]
    table = model.predict(images)
    assert len(table) == 3 and set(table["label"]) <= set(shapes4.class_names)
    assert (rec.model_dir / "method" / "method.json").read_text().count(good) >= 1
    fig = rec.plot()
    assert fig.axes[0].get_xlabel() == "shots per class (K)"


def test_the_test_split_never_influences_the_choice(backbone, shapes4, user_methods, tmp_path, quiet, monkeypatch):
    """Poison the test labels: the choice, estimates and intervals stay identical; only test scores move.
    And no test image is read before the first refit of phase 2."""
    import workbench.experiment as experiment

    reads = tmp_path / "reads.txt"
    test_refs = {repr(s.ref) for s in shapes4.split("test")}

    class SpyReader:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, ref):
            with open(reads, "a") as f:   # DataLoader workers append too
                f.write(repr(ref) + "\n")
            return self.inner(ref)

    original = experiment.run_experiment

    def marking(*args, **kwargs):
        with open(reads, "a") as f:
            f.write("PHASE2\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", marking)
    spied = dataclasses.replace(shapes4, reader=SpyReader(shapes4.reader))
    kwargs = dict(shots=[2, 4], seeds=[1], budget="minutes", resplits=2, n_boot=300, rule="pooled")
    methods = ["zero_shot", "linear_probe", user_methods[0]]   # eval features only: a fast test
    clean = recommend(spied, backbone, methods, out_dir=tmp_path / "clean", **kwargs)
    phase1 = reads.read_text().split("PHASE2")[0].splitlines()
    assert phase1 and not test_refs & set(phase1)

    flipped = [dataclasses.replace(s, label=(s.label + 1) % 4) for s in shapes4.split("test")]
    poisoned = dataclasses.replace(shapes4, splits={**shapes4.splits, "test": flipped})
    dirty = recommend(poisoned, backbone, methods, out_dir=tmp_path / "dirty", **kwargs)
    assert (dirty.method, dirty.backbone) == (clean.method, clean.backbone)
    # every rule's choice is made in phase 1 too, so none can depend on the test split
    assert set(clean.design["choice_by_rule"]) == set(RULES)
    assert dirty.design["choice_by_rule"] == clean.design["choice_by_rule"]
    assert clean.design["choice_by_rule"]["pooled"] == f"{clean.method} · {clean.backbone}"
    assert "pooled over each cross-validation's folds" in clean.summary
    cols = ["candidate", "shots", "estimate", "ci_low", "ci_high", "selection_score", "rank", "p_chosen_beats",
            "chosen"]
    assert dirty.table[cols].equals(clean.table[cols])
    assert dirty.pairwise.equals(clean.pairwise)
    assert not np.allclose(dirty.table["test"], clean.table["test"])


def test_several_backbones_are_candidates_and_the_pair_is_reported(backbone, biomed_like, shapes4, tmp_path, quiet):
    rec = recommend(shapes4, [backbone, biomed_like], ["zero_shot", "linear_probe"], shots=2, seeds=[1],
                    budget="seconds",
                    resplits=2, n_boot=200, out_dir=tmp_path)
    assert set(rec.table["backbone"]) == {"workbench-tiny", "tiny-biomed"} and len(rec.table) == 4
    assert rec.backbone in {"workbench-tiny", "tiny-biomed"} and f"on {rec.backbone}" in rec.summary
    assert rec.pairwise.shape == (4, 4)
    assert wb.load(rec.model_dir).backbone.name == rec.backbone


def test_backbone_names_take_an_optional_pretrained_tag():
    from workbench.recommend import parse_backbones

    assert parse_backbones(["workbench-tiny", "ViT-B-16-quickgelu@openai"]) == [
        "workbench-tiny", ("ViT-B-16-quickgelu", "openai")]
    assert parse_backbones("hf-hub:org/repo") == ["hf-hub:org/repo"]
    with pytest.raises(ConfigError, match="expected 'NAME' or 'NAME@PRETRAINED'"):
        parse_backbones(["ViT-B-16@"])


def test_wb_recommend_is_the_function_even_after_importing_the_module():
    import workbench.recommend  # noqa: F401  (sets the package attribute to the module, as sweep does)

    assert wb.recommend is recommend


def test_cli_recommend_prints_the_ranking_summary_and_model(tmp_path, capsys, monkeypatch, quiet):
    from workbench.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["recommend", "--dataset", "leaf_disease_synthetic", "--methods", "zero_shot,linear_probe,tda",
                 "--shots", "2", "--seeds", "1", "--resplits", "2", "--budget", "seconds", "--rule", "pooled",
                 "--unlabeled", "test", "--out", "rec"]) == 0
    out = capsys.readouterr().out
    assert "vs chosen" in out and "is the best choice by the held-out estimate pooled" in out
    assert "tda [transductive]" in out and "best transductive candidate is tda" in out
    assert f"chosen model: {tmp_path / 'rec'}" in out
    model_dir = out.split("chosen model: ")[1].strip()
    assert wb.load(model_dir).class_names
    assert main(["recommend", "--dataset", "leaf_disease_synthetic", "--methods", "coop", "--budget", "seconds",
                 "--device", "cpu"]) == 2
    assert "budget 'seconds': no candidate fits" in capsys.readouterr().err


# -- a candidate that fails, features that are not finite (issue 20) ------------------------------

class _Broken(Method):
    """A user method whose fit raises on the second re-split (after one group already scored it)."""
    Config = NoConfig
    calls = 0

    def fit(self, task):
        type(self).calls += 1
        if type(self).calls >= 2:
            raise RuntimeError("boom in fit")
        self.class_names = task.class_names
        return self

    def predict_logits(self, features):
        return torch.zeros(len(features), len(self.class_names))


@pytest.fixture
def broken_method():
    _Broken.calls = 0
    registry.register("test_rec_broken")(_Broken)
    yield "test_rec_broken"
    registry._CLASSES.pop("test_rec_broken", None)
    registry._ENTRIES.pop("test_rec_broken", None)


def test_a_candidate_whose_fit_raises_is_named_left_out_and_listed_as_failed(backbone, shapes4, user_methods,
                                                                             broken_method, tmp_path, quiet):
    good, bad = user_methods
    with pytest.warns(UserWarning, match=r"candidate 'test_rec_broken · workbench-tiny' failed during nested "
                                         r"selection — RuntimeError: boom in fit \(K=2, seed 1, re-split 1\)"):
        rec = recommend(shapes4, backbone, [bad, broken_method, good], shots=2, seeds=[1], resplits=2,
                        budget="minutes", n_boot=200, out_dir=tmp_path)
    assert (rec.method, rec.backbone) == (good, "workbench-tiny")   # the others went on
    assert list(rec.failed) == ["test_rec_broken · workbench-tiny"] and "boom in fit" in rec.failed[
        "test_rec_broken · workbench-tiny"]
    row = rec.table[rec.table["method"] == broken_method].iloc[0]
    assert np.isnan(row["estimate"]) and np.isnan(row["test"]) and "boom in fit" in row["error"]
    ranking = rec.ranking()
    assert ranking["method"].tolist()[-1] == broken_method
    assert ranking["vs chosen"].tolist()[0] == "chosen" and ranking["vs chosen"].tolist()[-1] == "failed"
    assert ranking["rank"].tolist() == [1, 2, 3]
    assert "test_rec_broken · workbench-tiny" not in rec.pairwise.index and rec.pairwise.shape == (2, 2)
    assert "Failed, so left out of the choice: test_rec_broken · workbench-tiny (RuntimeError" in rec.summary
    # the comparison of the others is the one without the broken candidate
    alone = recommend(shapes4, backbone, [bad, good], shots=2, seeds=[1], resplits=2, budget="minutes", n_boot=200,
                      out_dir=tmp_path / "alone")
    scored = rec.table[rec.table["error"] == ""].reset_index(drop=True)
    cols = ["candidate", "estimate", "ci_low", "ci_high", "rank", "p_chosen_beats", "test"]
    assert scored[cols].equals(alone.table[cols])


def test_every_candidate_failing_is_one_clear_error(backbone, shapes4, broken_method, quiet):
    from workbench.errors import DataError

    _Broken.calls = 1   # fails from the first fit
    with pytest.raises(DataError, match=r"every candidate failed during nested selection.*\n  test_rec_broken · "
                                        r"workbench-tiny: RuntimeError: boom in fit"):
        recommend(shapes4, backbone, [broken_method], shots=2, seeds=[1], resplits=2, budget="minutes", n_boot=200)


def test_features_that_are_not_finite_stop_recommend_naming_the_images(backbone, shapes4, monkeypatch, quiet):
    from workbench.features import FeatureCache
    from workbench.recommend import NonFiniteFeatures

    real = FeatureCache.get

    def nan_for_one_image(self, dataset, samples, **kwargs):
        feats = real(self, dataset, samples, **kwargs)
        raw = feats.raw.clone()
        raw[:, 0] = float("nan")        # as a NaN pixel or an overflowing encoder would leave it
        return dataclasses.replace(feats, raw=raw)

    monkeypatch.setattr(FeatureCache, "get", nan_for_one_image)
    with pytest.raises(NonFiniteFeatures, match=r"the features of 1 of \d+ image\(s\) \(the labelled pool of "
                                                r"'rec_shapes'\) are not finite \(NaN or inf\), e\.g\. \['"):
        recommend(shapes4, backbone, ["zero_shot", "linear_probe"], shots=2, seeds=[1], resplits=2,
                  budget="seconds", n_boot=200)


# -- multi-label datasets: macro AUROC from per-finding scores ---------------------------------------

def test_macro_auroc_resampled_matches_sklearn_on_the_explicit_resamples():
    from sklearn.metrics import roc_auc_score

    from workbench.recommend import bootstrap_draws, group_metric, macro_auroc_resampled

    rng = np.random.default_rng(0)
    n, n_find = 14, 4
    y = rng.integers(0, 2, size=(n, n_find))
    y[0, 1], y[1, 2] = -1, -1                        # uncertain: left out of that finding
    y[:, 3] = 0
    y[0, 3] = 1                                      # a rare finding: often absent from a resample
    scores = np.round(rng.normal(size=(2, n, n_find)), 1)   # rounded: tied scores
    _, images = bootstrap_draws([n], 20, seed=3)
    got = macro_auroc_resampled(y, scores, images[0])
    for m in range(2):
        for r, idx in enumerate(images[0]):
            per = []
            for f in range(n_find):
                yy, ss = y[idx, f], scores[m, idx, f]
                known = yy >= 0
                if 0 < yy[known].sum() < known.sum():
                    per.append(roc_auc_score(yy[known], ss[known]))
            expected = np.mean(per) if per else np.nan
            np.testing.assert_allclose(got[m, r], expected, rtol=1e-12, equal_nan=True)
    from workbench.metrics import compute_multilabel_metrics

    assert group_metric(y, scores, 0, "macro_auroc")[0] == pytest.approx(
        compute_multilabel_metrics(scores[0], y)["macro_auroc"])


@pytest.fixture(scope="module")
def rec_mosaic():
    """The offline WHU-RS19 mosaic set (the generator of domains/remote_sensing/whu_rs19_mosaic.yaml), small."""
    from workbench.data.multilabel import mosaic_dataset
    from workbench.paths import repo_root

    return mosaic_dataset(repo_root() / "data" / "whu_rs19_mini", n_images=40, seed=2, name="rec_mosaic",
                          classes=["airport", "beach", "forest", "port", "river"], templates=["aerial imagery of {}."])


def test_resplit_of_a_multi_label_pool_keeps_a_positive_of_every_finding_in_the_support(rec_mosaic):
    from workbench.data.multilabel import sample_multilabel_few_shot, targets_of
    from workbench.recommend import resplit

    split = sample_multilabel_few_shot(rec_mosaic, 2, 1)
    pool = {s.id for s in split.train(rec_mosaic) + split.val(rec_mosaic)}
    held_all = []
    for r in range(3):
        inner, held = resplit(rec_mosaic, split, r, 1 / 3)
        ids = [s.id for s in held]
        assert ids and not set(ids) & (set(inner.train_ids) | set(inner.val_ids))
        assert set(ids) | set(inner.train_ids) | set(inner.val_ids) == pool
        support = targets_of(rec_mosaic.samples(inner.train_ids), rec_mosaic.n_findings)
        assert ((support == 1).sum(0) >= 1).all() and inner.val_ids
        held_all += ids
    assert sorted(held_all) == sorted(pool)          # 3-fold: each labelled image held out exactly once


def test_recommend_on_a_multi_label_set_ranks_on_macro_auroc(backbone, rec_mosaic, tmp_path, quiet):
    rec = recommend(rec_mosaic, backbone, None, shots=2, seeds=[1], budget="seconds", resplits=2, n_boot=200,
                    out_dir=tmp_path, method_params={"ovr_linear_probe": {"c_grid": [0.1, 10.0]}})
    assert rec.metric == "macro_auroc" and set(rec.table["method"]) == {"chexzero", "ovr_linear_probe"}
    assert not rec.failed and rec.table["estimate"].between(0, 1).all()
    assert rec.ci_low <= rec.estimate <= rec.ci_high
    assert rec.table["test"].notna().all() and "positive images per finding" in rec.summary
    assert "macro_auroc" in rec.ranking().columns[3]
    assert rec.plot().axes[0].get_xlabel() == "positive images per finding (K)"
    model = wb.load(rec.model_dir)
    out = model.predict([rec_mosaic.load_image(rec_mosaic.split("test")[0])])
    assert list(out.columns[2:]) == rec_mosaic.class_names


# -- unlabeled pools: transductive candidates in their own group, honest cross-validation ---------------

class _PoolSpy(Method):
    """Zero-shot logits; records what it was given as unlabeled images at fit and the batches it predicts."""
    Config = NoConfig
    uses_unlabeled = "pool"
    log: list = []

    def fit(self, task):
        self.class_names = task.class_names
        self.w = task.text_classifier().float()
        pool = task.unlabeled_features()
        self.transductive = pool is None
        _PoolSpy.log.append(("fit", None if pool is None else pool.clone(), task.unlabeled_source))
        return self

    def predict_logits(self, features):
        _PoolSpy.log.append(("predict", features.clone(), None))
        return 30 * features.float() @ self.w.T

    def state(self):
        return {"w": self.w}

    def load_state(self, state):
        self.w = state["w"]


@pytest.fixture
def pool_spy():
    registry.register("test_rec_pool_spy")(_PoolSpy)
    _PoolSpy.log = []
    yield "test_rec_pool_spy"
    registry._CLASSES.pop("test_rec_pool_spy", None)
    registry._ENTRIES.pop("test_rec_pool_spy", None)


def _ids_of(rows, feats):
    """The image ids whose features are the rows given (exact match of the cached features)."""
    index = {tuple(np.round(f.numpy(), 5)): i for f, i in zip(feats.x, feats.ids)}
    return [index[tuple(np.round(r.numpy(), 5))] for r in rows]


def test_a_transductive_candidate_gets_the_held_out_fold_as_its_pool_and_its_own_group(backbone, shapes4,
                                                                                         pool_spy, tmp_path, quiet):
    from workbench.data.sampling import sample_few_shot

    rec = recommend(shapes4, backbone, ["zero_shot", pool_spy], shots=4, seeds=[1], budget="minutes", resplits=3,
                    n_boot=200, out_dir=tmp_path, unlabeled="test")
    assert not rec.failed
    everything = wb.FeatureCache(backbone, None, show_progress=False).get(
        shapes4, shapes4.split("train") + shapes4.split("val") + shapes4.split("test"))
    split = sample_few_shot(shapes4, 4, 1)
    folds = [resplit(shapes4, split, r, 1 / 3) for r in range(3)]
    nested = _PoolSpy.log[:2 * len(folds)]           # phase 1: (fit, predict) per re-split
    for (inner, held), (fit, predict) in zip(folds, zip(nested[::2], nested[1::2])):
        assert fit[0] == "fit" and fit[1] is None and fit[2] == "test"   # no pool at fit: the batch is the pool
        seen = _ids_of(predict[1], everything)
        assert sorted(seen) == sorted(s.id for s in held)                # exactly the held-out fold ...
        assert not set(seen) & set(inner.train_ids + inner.val_ids)     # ... never its support
    test_ids = {s.id for s in shapes4.split("test")}
    assert not test_ids & {i for _, rows, _ in nested[1::2] for i in _ids_of(rows, everything)}
    # phase 2: the refit is transductive on the test split, as the cross-validation was on its folds
    assert _PoolSpy.log[2 * len(folds)][2] == "test"
    at_k = rec.table.set_index("method")
    assert at_k.loc[pool_spy, "setting"] == "transductive" and at_k.loc["zero_shot", "setting"] == "inductive"
    assert rec.method == "zero_shot" and at_k.loc[pool_spy, "group_best"] and at_k.loc[pool_spy, "rank"] == 1
    assert rec.other_group["method"] == pool_spy and "best transductive candidate" in rec.summary
    ranking = rec.ranking()
    assert list(ranking["setting"]) == ["inductive", "transductive"]
    assert ranking["method"].iloc[1] == f"{pool_spy} [transductive]" and ranking["vs chosen"].iloc[1] == \
        "best transductive"
    legend = [t.get_text() for t in rec.plot().axes[0].get_legend().get_texts()]
    assert f"{pool_spy} · workbench-tiny [transductive]" in legend


def test_a_separate_pool_is_the_same_in_every_fold_and_never_holds_a_labelled_image(backbone, shapes4, pool_spy,
                                                                                       tmp_path, quiet):
    from workbench.data.sampling import sample_few_shot

    rec = recommend(shapes4, backbone, ["zero_shot", pool_spy], shots=4, seeds=[1], budget="minutes", resplits=2,
                    n_boot=200, out_dir=tmp_path, unlabeled="train")
    everything = wb.FeatureCache(backbone, None, show_progress=False).get(shapes4, shapes4.split("train"))
    split = sample_few_shot(shapes4, 4, 1)
    labelled = set(split.train_ids + split.val_ids)
    fits = [entry for entry in _PoolSpy.log if entry[0] == "fit"]
    assert len(fits) == 3 and all(f[2] == "split:train" for f in fits)   # 2 re-splits + the refit
    pools = [sorted(_ids_of(f[1], everything)) for f in fits]
    assert pools[0] == pools[1] == pools[2]
    assert set(pools[0]) == {s.id for s in shapes4.split("train")} - labelled
    assert set(rec.table["setting"]) == {"inductive"} and "setting" not in rec.ranking().columns


# -- a backbone fine-tuned on image–text pairs as one more candidate (issue 25) ------------------------

def test_a_saved_pairs_fine_tune_is_one_more_backbone_candidate(backbone, shapes4, tmp_path, quiet):
    from workbench.methods.pairs.contrastive import fine_tune_pairs

    pairs = wb.load_pairs("whu_rs19_pairs")
    folder = fine_tune_pairs(pairs, backbone, "pairs_lora", steps=2, batch_size=8, lr=1e-2).save(tmp_path / "ft")
    rec = recommend(shapes4, [backbone, str(folder)], ["zero_shot", "linear_probe"], shots=2, seeds=[1],
                    budget="seconds", resplits=2, n_boot=200, out_dir=tmp_path / "rec")
    tuned = f"workbench-tiny (pairs_lora: {folder})"
    assert set(rec.table["backbone"]) == {"workbench-tiny", tuned} and len(rec.table) == 4
    assert rec.pairwise.shape == (4, 4) and not rec.failed
    # the candidate is the fine-tuned encoder, not the base one again
    images = shapes4.split("test")[:4]
    base = wb.FeatureCache(backbone, None, show_progress=False).get(shapes4, images).x
    adapted = wb.FeatureCache(wb.load_backbone(str(folder), device="cpu"), None, show_progress=False).get(
        shapes4, images).x
    assert not torch.allclose(base, adapted, atol=1e-6)
    model = wb.load(rec.model_dir)          # the chosen pair's saved model loads, whichever backbone won
    assert len(model.predict([img for img, _ in wb.report.sample_images(shapes4, "test", n=2)])) == 2
