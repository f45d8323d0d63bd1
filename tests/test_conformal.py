"""Split-conformal prediction sets: the coverage guarantee, checked where it can be checked."""
import math

import numpy as np
import pytest
import torch

from workbench.conformal import ConformalCalibrator, set_metrics
from workbench.errors import ConfigError


def _synthetic(n, n_classes, gen):
    """A fixed noisy "model": exchangeable (probs, label) pairs with continuous scores."""
    labels = torch.randint(n_classes, (n,), generator=gen)
    logits = torch.randn(n, n_classes, generator=gen, dtype=torch.float64) * 1.5
    logits[torch.arange(n), labels] += 1.0
    return torch.softmax(logits, -1), labels


def test_threshold_is_the_finite_sample_quantile():
    gen = torch.Generator().manual_seed(0)
    probs, labels = _synthetic(37, 4, gen)
    cal = ConformalCalibrator(coverage=0.8).fit(probs, labels)
    scores = 1 - probs[torch.arange(37), labels].numpy()
    expected = np.quantile(scores, math.ceil(38 * 0.8) / 37, method="inverted_cdf")  # the k-th smallest, k = ceil((n+1)c)
    assert float(cal.thresholds[0]) == pytest.approx(expected, abs=1e-12)
    sets = cal.predict_sets(probs)
    assert torch.equal(sets, torch.as_tensor(1 - probs.numpy() <= expected))


@pytest.mark.parametrize("class_conditional", [False, True])
def test_coverage_guarantee_holds_on_average_over_calibration_draws(class_conditional):
    gen = torch.Generator().manual_seed(1)
    target, n_cal, trials, covs = 0.9, 200, 150, []
    per_class = []
    for _ in range(trials):
        cal_p, cal_y = _synthetic(n_cal, 3, gen)
        test_p, test_y = _synthetic(500, 3, gen)
        sets = ConformalCalibrator(target, class_conditional).fit(cal_p, cal_y).predict_sets(test_p)
        covs.append(set_metrics(sets, test_y)["coverage"])
        per_class.append([float(sets[test_y == c, c].double().mean()) for c in range(3)])
    mean = float(np.mean(covs))
    # marginal guarantee: >= target; with continuous scores also <= target + 1/(n+1) (per class: n_c ~ 67)
    slack = 1 / (n_cal / 3 + 1) if class_conditional else 1 / (n_cal + 1)
    assert target - 0.01 <= mean <= target + slack + 0.01
    if class_conditional:
        assert (np.mean(per_class, axis=0) >= target - 0.015).all()


def test_too_few_calibration_images_give_full_sets_and_say_so():
    gen = torch.Generator().manual_seed(2)
    probs, labels = _synthetic(12, 3, gen)
    labels = torch.tensor([0, 1, 2] * 4)  # 4 per class: 0.9 needs 9 per class
    with pytest.warns(UserWarning, match=r"at least 9 per class"):
        cal = ConformalCalibrator(0.9, class_conditional=True).fit(probs, labels)
    assert cal.uncertified_classes == [0, 1, 2]
    assert cal.predict_sets(probs).all()


def test_bad_input_is_named():
    probs = torch.full((4, 2), 0.5)
    for bad in (0, 1, 1.5, "0.9", True):
        with pytest.raises(ConfigError, match="coverage must be a number strictly between 0 and 1"):
            ConformalCalibrator(bad).fit(probs, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match=r"labels \[N\]"):
        ConformalCalibrator(0.5).fit(probs, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="expected probabilities with 2 classes"):
        ConformalCalibrator(0.5).fit(probs, torch.tensor([0, 1, 0, 1])).predict_sets(torch.ones(3, 5))


def test_saved_model_gives_prediction_sets_calibrated_on_the_validation_images(backbone, whu, tmp_path, quiet):
    import json

    import workbench as wb

    res = wb.run_experiment(whu, backbone, "linear_probe", 4, 1, out_dir=tmp_path, save_model=True)
    record = json.loads((tmp_path / "runs" / res.row["run_id"] / "provenance.json").read_text())
    summary = record["conformal"]
    n_val = len(res.record["split"]["val_ids"])
    assert summary["n_calibration"] == n_val and summary["target_coverage"] == 0.9
    assert 0 <= summary["coverage"] <= 1 and 1 <= summary["mean_set_size"] <= whu.n_classes
    # linear_probe chose C on its validation images: the sets are honestly not certified
    assert res.row["val_tuned"] and summary["certified"] is False and summary["notes"][0].startswith("not certified")
    assert set(summary["scores"]) == {"lac", "aps", "raps"} and "class_coverage_gap" in summary["scores"]["aps"]

    model = wb.load(res.model_dir)
    assert model.calibration_certified is False
    probs, labels = model.calibration
    assert probs.shape == (n_val, whu.n_classes) and torch.allclose(probs.sum(1), torch.ones(n_val), atol=1e-5)
    paths = [s.ref for s in whu.split("test")[:6]]
    with pytest.warns(UserWarning, match="prediction sets not certified"):
        table = model.predict(paths, coverage=0.8)
    assert list(table.columns[:5]) == ["image", "label", "confidence", "prediction_set", "set_size"]
    expected = ConformalCalibrator(0.8).fit(probs, labels).predict_sets(torch.tensor(table[whu.class_names].to_numpy()))
    assert table["set_size"].tolist() == expected.sum(1).tolist()
    for names, row in zip(table["prediction_set"], expected):
        assert names == [whu.class_names[c] for c in row.nonzero().flatten().tolist()]
    model.calibration = None
    with pytest.raises(ConfigError, match="no calibration images"):
        model.predict(paths, coverage=0.9)


# --- APS / RAPS against an independent loop over the reference's formulas (conformal_classification
# conformal.py: get_tau for the calibration score, gcq for the sets), with the same u per image.

def _ref_tau(p, y, u, pen):
    """get_tau: randomised generalized inverse quantile of one image (float64, plain loops)."""
    order = np.argsort(-p, kind="stable")
    r = int(np.where(order == y)[0][0])
    before = sum(p[order[j]] for j in range(r))
    return before + u * p[order[r]] + sum(pen[: r + 1])


def _ref_gcq(p, tau, u, pen, allow_zero_sets=False):
    """gcq: the label indices of one image's set."""
    order = np.argsort(-p, kind="stable")
    ordered = p[order]
    cum, pencum = np.cumsum(ordered), np.cumsum(pen)
    size = min(int(((cum + pencum) <= tau).sum()) + 1, len(p))
    v = (tau - (cum[size - 1] - ordered[size - 1]) - pencum[size - 1]) / ordered[size - 1]
    size -= int(u >= v)
    if not allow_zero_sets and size == 0:
        size = 1
    return set(order[:size].tolist())


@pytest.mark.parametrize("score,k_reg,lam", [("aps", 0, 0.0), ("raps", 2, 0.05), ("raps", 0, 0.2)])
def test_aps_raps_match_the_reference_formulas(score, k_reg, lam):
    from workbench.conformal import label_scores

    gen = torch.Generator().manual_seed(3)
    probs, labels = _synthetic(60, 6, gen)
    u = torch.rand(60, generator=gen, dtype=torch.float64)
    pen = np.zeros(6)
    pen[k_reg:] = lam
    scores = label_scores(probs, score, u, k_reg, lam)
    p, y = probs.numpy(), labels.numpy()
    expected = [_ref_tau(p[i], y[i], float(u[i]), pen) for i in range(60)]
    assert np.allclose(scores[torch.arange(60), labels].numpy(), expected, atol=1e-12)
    # deterministic version: the full cumulative sum including y (+ penalty)
    det = label_scores(probs, score, None, k_reg, lam)[torch.arange(60), labels].numpy()
    assert np.allclose(det, [_ref_tau(p[i], y[i], 1.0, pen) for i in range(60)], atol=1e-12)
    # sets: our "label score <= tau, empty -> top-1" equals gcq for one threshold
    for tau in (0.3, 0.75, 0.95, 1.4):
        cal = ConformalCalibrator(0.9, score=score)
        cal.thresholds, cal.fitted_k_reg, cal.fitted_lam = torch.full((6,), tau, dtype=torch.float64), k_reg, lam
        cal._u = lambda n, salt: u   # the same u as the loop below
        ours = cal._sets(probs, cal.thresholds, k_reg, lam, salt=0)
        for i in range(60):
            assert set(ours[i].nonzero().flatten().tolist()) == _ref_gcq(p[i], tau, float(u[i]), pen), (tau, i)


def test_raps_tunes_k_reg_and_lambda_on_a_held_out_share():
    gen = torch.Generator().manual_seed(4)
    probs, labels = _synthetic(100, 8, gen)
    cal = ConformalCalibrator(0.9, score="raps").fit(probs, labels)
    assert cal.n_calibration == 100 - 30          # pct_paramtune = 0.3 left out of the quantile
    assert cal.fitted_k_reg >= 1 and cal.fitted_lam in (0.001, 0.01, 0.1, 0.2, 0.5)
    assert cal.k_reg is None and cal.lam is None  # the config is not overwritten
    fixed = ConformalCalibrator(0.9, score="raps", k_reg=1, lam=0.001).fit(probs, labels)
    assert fixed.n_calibration == 100 and (fixed.fitted_k_reg, fixed.fitted_lam) == (1, 0.001)
    with pytest.raises(ConfigError, match="RAPS with k_reg/lam left to tuning"):
        ConformalCalibrator(0.9, score="raps").fit(probs[:1], labels[:1])
    with pytest.raises(ConfigError, match="not one of"):
        ConformalCalibrator(0.9, score="thr").fit(probs, labels)


@pytest.mark.parametrize("score", ["aps", "raps"])
def test_adaptive_scores_keep_the_coverage_guarantee(score):
    gen = torch.Generator().manual_seed(5)
    covs = []
    for trial in range(120):
        cal_p, cal_y = _synthetic(150, 5, gen)
        test_p, test_y = _synthetic(400, 5, gen)
        sets = ConformalCalibrator(0.9, score=score, seed=trial).fit(cal_p, cal_y).predict_sets(test_p)
        covs.append(set_metrics(sets, test_y)["coverage"])
    assert 0.89 <= float(np.mean(covs)) <= 0.93


def test_class_coverage_gap_is_the_mean_absolute_per_class_miss():
    sets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])   # class 0 covered 2/2, class 1 1/2, class 2 1/2
    m = set_metrics(sets, labels, coverage=0.9)
    assert m["coverage"] == pytest.approx(4 / 6)
    assert m["class_coverage_gap"] == pytest.approx((0.1 + 0.4 + 0.4) / 3)
    assert m["worst_class_coverage"] == pytest.approx(0.5)


# --- the guarantee needs calibration images that selection never saw ---------------------------

def _overfit_selection_coverages(score, draws=300):
    """Synthetic few-shot run: 40 equally good "hyper-parameter settings" (independent noise), the
    one with the best accuracy on the validation images is chosen. Returns the mean test coverage of
    sets calibrated (a) on the same validation images (the old behaviour) and (b) on the part
    ``split_calibration`` held out of selection."""
    from workbench.conformal import split_calibration

    rng = np.random.default_rng(0)
    n_classes, per_class, n_candidates = 5, 8, 40

    def probs_for(y):
        logits = rng.normal(size=(len(y), n_classes)) * 1.5
        logits[np.arange(len(y)), y] += 1.0
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    y_val = np.repeat(np.arange(n_classes), per_class)
    old, new = [], []
    for d in range(draws):
        candidates = [probs_for(y_val) for _ in range(n_candidates)]
        y_test = rng.integers(n_classes, size=400)
        p_test = torch.tensor(probs_for(y_test))   # every candidate is equally good on new images

        def choose(idx):
            return int(np.argmax([(p[idx].argmax(1) == y_val[idx]).mean() for p in candidates]))

        every = np.arange(len(y_val))
        p = candidates[choose(every)]
        sets = ConformalCalibrator(0.9, score=score, seed=d).fit(torch.tensor(p), torch.tensor(y_val)).predict_sets(p_test)
        old.append(set_metrics(sets, torch.tensor(y_test))["coverage"])
        selection, calibration = (np.array(i) for i in split_calibration(y_val, 0.5, seed=d))
        p = candidates[choose(selection)]
        sets = ConformalCalibrator(0.9, score=score, seed=d).fit(
            torch.tensor(p[calibration]), torch.tensor(y_val[calibration])).predict_sets(p_test)
        new.append(set_metrics(sets, torch.tensor(y_test))["coverage"])
    return float(np.mean(old)), float(np.mean(new))


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_calibrating_on_selection_images_under_covers_and_held_out_calibration_does_not(score):
    old, new = _overfit_selection_coverages(score)
    assert old < 0.885, old      # selection made the validation images look easy: q̂ too small
    assert new >= 0.89, new      # nominal 0.9 (the mean over 300 draws has a standard error ~0.004)


def test_split_calibration_is_stratified_and_refuses_too_few():
    from workbench.conformal import split_calibration

    labels = [0] * 4 + [1] * 4 + [2] * 3
    sel, cal = split_calibration(labels, 0.5, seed=1)
    assert sorted(sel + cal) == list(range(11)) and not set(sel) & set(cal)
    assert [sum(labels[i] == c for i in cal) for c in range(3)] == [2, 2, 2]   # round(1.5) = 2 for the 3-image class
    assert split_calibration(labels, 0.5, seed=1) == (sel, cal)
    with pytest.raises(ConfigError, match="class 1 has 1 K-shot validation image"):
        split_calibration([0, 0, 1], 0.5)
    with pytest.raises(ConfigError, match="calibration_fraction must be"):
        split_calibration(labels, 1.0)


def test_calibration_fraction_holds_calibration_images_out_of_fitting(backbone, whu, tmp_path, quiet):
    import json

    import workbench as wb
    from workbench.task import FewShotTask

    seen = []
    real_fit = wb.get_method("linear_probe").__class__.fit

    class Spy(wb.get_method("linear_probe").__class__):
        def fit(self, task: FewShotTask):
            seen.append({s.id for s in task.val_samples()} | {s.id for s in task.support_samples()})
            return real_fit(self, task)

    res = wb.run_experiment(whu, backbone, Spy(), 4, 1, out_dir=tmp_path, save_model=True, calibration_fraction=0.5)
    split = res.record["split"]
    cal_ids = set(split["calibration_ids"])
    assert len(split["val_ids"]) == 3 * whu.n_classes   # 3 per class: 2 calibrate (1.5 rounds up), 1 selects
    assert len(cal_ids) == 2 * whu.n_classes and cal_ids <= set(split["val_ids"])
    assert not cal_ids & seen[0]                     # the method never saw a calibration image
    summary = json.loads((tmp_path / "runs" / res.row["run_id"] / "provenance.json").read_text())["conformal"]
    assert summary["calibration"] == "held_out" and summary["n_calibration"] == len(cal_ids)
    assert summary["certified"] == (len(cal_ids) >= 9)   # 0.9 needs 9 calibration images
    model = wb.load(res.model_dir)
    assert model.calibration_certified and len(model.calibration[1]) == len(cal_ids)
    with pytest.raises(ConfigError, match="calibration_fraction must be"):
        wb.run_experiment(whu, backbone, "linear_probe", 4, 1, calibration_fraction=2)
    with pytest.raises(ConfigError, match="at least 2 per class"):
        wb.run_experiment(whu, backbone, "linear_probe", 1, 1, calibration_fraction=0.5)
