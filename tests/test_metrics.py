import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from workbench.metrics import compute_metrics, expected_calibration_error


def test_hand_computed_example():
    # true: 0 0 1 1 2 ; predicted: 0 1 1 1 0
    y = np.array([0, 0, 1, 1, 2])
    logits = np.log(np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.5, .2, .3]]))
    m = compute_metrics(logits, y)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class_recall"] == [0.5, 1.0, 0.0]
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    # F1: class0 P=1/2 R=1/2 -> .5; class1 P=2/3 R=1 -> .8; class2 -> 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # ECE by hand (15 bins): confidences .8 .6 .8 .7 .5; correct 1 0 1 1 0
    # bins: (.4667,.5333]: {.5: wrong}; (.5333,.6]: {.6: wrong}; (.6667,.7333]: {.7 right}; (.7333,.8]: {.8,.8 right}
    ece = (1 * abs(0 - .5) + 1 * abs(0 - .6) + 1 * abs(1 - .7) + 2 * abs(1 - .8)) / 5
    assert m["ece"] == pytest.approx(ece)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, logits.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(y, logits.argmax(1), average="macro"))


def test_auroc_matches_sklearn_and_skips_absent_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    logits = rng.normal(size=(50, 4))  # class 3 never occurs in the test labels
    m = compute_metrics(logits, y, n_classes=4)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(3)])
    assert m["macro_auroc"] == pytest.approx(expected)
    assert m["per_class_recall"][3] is None


def test_ece_perfect_calibration_is_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0
