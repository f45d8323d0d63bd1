"""Tests that pin the protocol, not only the formulas (issue 28): each fails on a deliberate small bug
that the float64 and sklearn formula checks let through."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.data import sample_few_shot, synthetic_shapes
from workbench.methods import registry
from workbench.methods.base import Method, NoConfig


# -- recommend: the held-out estimate is scored on exactly that re-split's held-out fold --------

class _SpyCentroid(Method):
    """Nearest class mean; records what it is fitted on (ids) and what it is asked to predict (features)."""
    Config = NoConfig
    events: list = []

    def fit(self, task):
        seen = {s.id for s in task.support_samples()} | {s.id for s in task.val_samples()}
        type(self).events.append(("fit", seen))
        f = task.support()
        self.class_names = task.class_names
        self.means = F.normalize(torch.stack([f.x[f.labels == c].mean(0) for c in range(task.n_classes)]), dim=-1)
        return self

    def predict_logits(self, features):
        type(self).events.append(("predict", features.detach().clone()))
        return 30 * features @ self.means.T

    def state(self):
        return {"means": self.means}


@pytest.fixture
def spy_method():
    _SpyCentroid.events = []
    registry.register("test_pin_spy")(_SpyCentroid)
    yield "test_pin_spy"
    registry._CLASSES.pop("test_pin_spy", None)
    registry._ENTRIES.pop("test_pin_spy", None)


def test_recommend_scores_each_candidate_on_exactly_the_held_out_fold(backbone, spy_method, tmp_path, quiet):
    from workbench.recommend import resplit

    data = synthetic_shapes(3, train_per_class=10, val_per_class=4, test_per_class=4, name="pin_shapes")
    k, seed, resplits, holdout = 4, 1, 3, 1 / 3
    wb.recommend(data, backbone, ["zero_shot", spy_method], shots=k, seeds=[seed], resplits=resplits,
                 holdout=holdout, n_boot=100, out_dir=tmp_path, score_test=False)
    # which image each predicted feature row is: match it to the labelled pool's own features
    split = sample_few_shot(data, k, seed)
    pool = split.train(data) + split.val(data)
    pool_feats = wb.FeatureCache(backbone, None, show_progress=False).get(data, pool)
    ids = pool_feats.ids

    def which(features):
        sim = F.normalize(features.float(), dim=-1) @ pool_feats.x.T
        best = sim.max(1)
        assert (best.values > 0.9999).all(), "a predicted image is not in the labelled pool"
        return [ids[i] for i in best.indices.tolist()]

    events = _SpyCentroid.events
    for r in range(resplits):   # phase 1: per re-split, the candidate is fitted, then asked to predict
        (kind_fit, fitted), (kind_pred, feats) = events[2 * r], events[2 * r + 1]
        assert (kind_fit, kind_pred) == ("fit", "predict")
        inner, held = resplit(data, split, r, holdout)
        scored = which(feats)
        assert sorted(scored) == sorted(s.id for s in held)            # exactly the held-out fold ...
        assert fitted == set(inner.train_ids) | set(inner.val_ids)     # ... of the split it was fitted on,
        assert not fitted & set(scored)                                # disjoint from fit and selection
    assert set().union(*(set(which(f)) for kind, f in events[: 2 * resplits] if kind == "predict")) == set(ids)


# -- macro-F1 with a class that is neither true nor predicted -----------------------------------

def test_macro_f1_matches_sklearn_with_an_absent_class():
    from sklearn.metrics import f1_score

    from workbench.metrics import compute_metrics

    y_true = np.array([0, 0, 1, 1, 1, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 0, 3, 0])       # class 2: neither true nor predicted
    logits = torch.full((7, 4), -5.0)
    logits[torch.arange(7), torch.as_tensor(y_pred)] = 5.0
    ours = compute_metrics(logits, torch.as_tensor(y_true), 4)["macro_f1"]
    assert ours == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    from workbench.recommend import metric_from_labels   # the bootstrap's own implementation agrees

    assert metric_from_labels(y_true, y_pred, 4, "macro_f1") == pytest.approx(ours, abs=1e-12)
    # averaging over the absent class as well (a zero F1) would give 3/4 of it
    assert ours != pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro", zero_division=0))


# -- p_beats: a tie counts one half -------------------------------------------------------------

def test_p_beats_counts_ties_as_one_half():
    from workbench.recommend import p_beats

    reps = np.array([[0.5, 0.5], [0.6, 0.5], [0.5, 0.5], [0.4, 0.5]])   # 2 ties, 1 win, 1 loss
    assert p_beats(reps, 0, 1) == pytest.approx((1 + 0.5 * 2) / 4)
    assert p_beats(reps, 0, 1) + p_beats(reps, 1, 0) == pytest.approx(1.0)
    assert p_beats(np.full((10, 2), 0.7), 0, 1) == pytest.approx(0.5)   # identical candidates: a coin flip


# -- Tip-Adapter-F epoch_selection="val": the earliest of tied epochs ---------------------------

def test_tip_adapter_f_keeps_the_earliest_of_tied_epochs(quiet):
    from tests.fakes import random_task

    task, centres = random_task(n_classes=3, shots=4, dim=8, views=10)
    task.val = type(task.val)(raw=centres.repeat(2, 1)[None], labels=torch.arange(3).repeat(2), ids=[""] * 6)
    task.text = centres.clone()   # validation accuracy is 100% after every epoch: a 6-way tie
    common = dict(epochs=6, search=False, init_alpha=1.0, lr=0.01)
    chosen = wb.get_method("tip_adapter_f", epoch_selection="val", **common).fit(task)
    last = wb.get_method("tip_adapter_f", epoch_selection="last", **common).fit(task)
    assert chosen.fit_info["chosen_epoch"] == 0
    assert not torch.allclose(chosen.keys, last.keys)   # the epoch-0 snapshot was restored, not the last
