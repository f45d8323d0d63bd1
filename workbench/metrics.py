"""Classification metrics computed from logits and true labels.

All metrics treat every class of the task (``n_classes``), not only those predicted, so a method
that never predicts a class present in the test labels is penalised in macro-F1 and balanced
accuracy. Macro-F1 averages over the classes present in the truth or the predictions, as
sklearn's ``f1_score(average="macro")`` does: a class neither true nor predicted has no F1 (0/0)
and is left out rather than counted as 0 (which would pull every score towards 0 on test sets
that lack a class). Balanced accuracy averages recall over the classes present in the truth.
"""
from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall per class; NaN for a class with no test images."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = (cm.sum(axis=1) + cm.sum(axis=0)) > 0  # classes neither in truth nor predictions are left out
    return float(f1[present].mean()) if present.any() else float("nan")


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins over (0, 1] (Guo et al., 2017)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def calibration_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: count, mean confidence, accuracy (the reliability diagram's data)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        n = int(in_bin.sum())
        bins.append({"low": float(lo), "high": float(hi), "count": n,
                     "confidence": float(conf[in_bin].mean()) if n else None,
                     "accuracy": float(correct[in_bin].mean()) if n else None})
    return bins


def macro_auroc(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over classes that have both positives and negatives in the test set."""
    from sklearn.metrics import roc_auc_score

    scores = []
    for c in range(probs.shape[1]):
        pos = y_true == c
        if pos.any() and (~pos).any():
            scores.append(roc_auc_score(pos, probs[:, c]))
    return float(np.mean(scores)) if scores else float("nan")


def compute_metrics(logits, y_true, n_classes: int | None = None) -> dict:
    """Scalar metrics plus ``per_class_recall`` (list) and ``confusion`` (nested list)."""
    logits = _np(logits).astype(np.float64)
    y_true = _np(y_true).astype(np.int64)
    if logits.ndim != 2 or len(logits) != len(y_true):
        raise ValueError(f"logits {logits.shape} and labels {y_true.shape} do not match")
    n_classes = n_classes or logits.shape[1]
    probs = softmax(logits)
    y_pred = logits.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    recall = per_class_recall(cm)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(np.nanmean(recall)),
        "macro_f1": macro_f1(cm),
        "macro_auroc": macro_auroc(probs, y_true),
        "ece": expected_calibration_error(probs, y_true),
        "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
        "confusion": cm.tolist(),
        "calibration": calibration_bins(probs, y_true),
    }


SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece")


# -- multi-label (several findings per image) ---------------------------------------------------
# Targets are an [N, L] matrix of 1 (present), 0 (absent) and -1 (uncertain): uncertain entries are left
# out of every metric of their finding. Scores are per-finding probabilities (sigmoid of the logits).

MULTILABEL_SCALARS = ("macro_auroc", "micro_auroc", "mAP", "macro_f1", "macro_sensitivity", "macro_specificity",
                      "ece")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # stable for large |x|


def _check_multilabel(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    scores = _np(scores).astype(np.float64)
    targets = _np(targets).astype(np.int64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"multi-label scores {scores.shape} and targets {targets.shape} must both be [N, L]")
    if not np.isin(targets, (-1, 0, 1)).all():
        raise ValueError("multi-label targets must be 1, 0 or -1 (uncertain)")
    return scores, targets


def per_finding_auroc(scores, targets) -> list[float | None]:
    """AUROC of each finding over its known (non-uncertain) images; None without both classes."""
    from sklearn.metrics import roc_auc_score

    scores, targets = _check_multilabel(scores, targets)
    out = []
    for j in range(scores.shape[1]):
        known = targets[:, j] >= 0
        y = targets[known, j]
        out.append(float(roc_auc_score(y, scores[known, j])) if 0 < y.sum() < len(y) else None)
    return out


def micro_auroc(scores, targets) -> float:
    """AUROC of all known (image, finding) pairs pooled."""
    from sklearn.metrics import roc_auc_score

    scores, targets = _check_multilabel(scores, targets)
    known = targets >= 0
    y = targets[known]
    return float(roc_auc_score(y, scores[known])) if 0 < y.sum() < len(y) else float("nan")


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Non-interpolated AP: mean precision at the rank of each positive (ties: sklearn's step rule)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def mean_average_precision(scores, targets) -> float:
    """mAP: the mean over findings (with a known positive) of their average precision."""
    scores, targets = _check_multilabel(scores, targets)
    aps = []
    for j in range(scores.shape[1]):
        known = targets[:, j] >= 0
        y = targets[known, j]
        if y.sum() > 0:
            aps.append(average_precision(y, scores[known, j]))
    return float(np.mean(aps)) if aps else float("nan")


def best_f1_thresholds(probs, targets, default: float = 0.5) -> list[float]:
    """Per finding, the probability threshold with the best F1 on (validation) data.

    Candidates are the midpoints between consecutive distinct scores (and ``default``); on a tie
    the threshold closest to ``default`` wins. A finding without a known positive and negative
    keeps ``default``. (FairMedFM's ``find_threshold`` picks the best-F1 threshold the same way.)
    """
    probs, targets = _check_multilabel(probs, targets)
    out = []
    for j in range(probs.shape[1]):
        known = targets[:, j] >= 0
        y, s = targets[known, j], probs[known, j]
        if not (0 < y.sum() < len(y)):
            out.append(float(default))
            continue
        u = np.unique(s)
        cands = np.concatenate([(u[:-1] + u[1:]) / 2, [default], [u[0] - 1e-9]])
        best, best_t = -1.0, default
        for t in sorted(cands, key=lambda t: abs(t - default)):
            f1 = _f1(y, s >= t)
            if f1 > best + 1e-12:
                best, best_t = f1, float(t)
        out.append(best_t)
    return out


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def binary_ece(p: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of a binary probability: equal-width bins of p over [0, 1], |mean(y) - mean(p)| weighted by bin size."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def compute_multilabel_metrics(logits, targets, thresholds=None, finding_names=None) -> dict:
    """Per-finding and averaged metrics of a multi-label prediction.

    ``logits``: [N, L] per-finding log-odds (probability = sigmoid). ``thresholds``: one per finding
    (chosen on the K-shot validation set by the method, :func:`best_f1_thresholds`); default 0.5.
    Scalars: ``macro_auroc`` (the kind's primary metric; mean over findings with both classes),
    ``micro_auroc``, ``mAP``, ``macro_f1`` / ``macro_sensitivity`` / ``macro_specificity`` at the
    thresholds, ``ece`` (mean of the per-finding ECEs). Lists per finding: ``per_finding_auroc``,
    ``per_finding_ap``, ``per_finding_f1``, ``sensitivity``, ``specificity``, ``per_finding_ece``,
    ``thresholds``, ``positives`` (test positives).
    """
    logits, targets = _check_multilabel(logits, targets)
    probs = sigmoid(logits)
    n, n_find = probs.shape
    thr = np.full(n_find, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if thr.shape != (n_find,):
        raise ValueError(f"thresholds: {thr.shape[0] if thr.ndim else 1} values for {n_find} findings")
    aurocs = per_finding_auroc(probs, targets)
    f1s, sens, spec, eces, aps, npos = [], [], [], [], [], []
    for j in range(n_find):
        known = targets[:, j] >= 0
        y, p = targets[known, j], probs[known, j]
        pred = p >= thr[j]
        npos.append(int(y.sum()))
        f1s.append(_f1(y, pred) if y.sum() else None)
        sens.append(float((pred & (y == 1)).sum() / y.sum()) if y.sum() else None)
        spec.append(float((~pred & (y == 0)).sum() / (y == 0).sum()) if (y == 0).any() else None)
        eces.append(binary_ece(p, y) if len(y) else None)
        aps.append(average_precision(y, p) if y.sum() else None)

    def mean(v):
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else float("nan")

    out = {
        "macro_auroc": mean(aurocs), "micro_auroc": micro_auroc(probs, targets), "mAP": mean(aps),
        "macro_f1": mean(f1s), "macro_sensitivity": mean(sens), "macro_specificity": mean(spec), "ece": mean(eces),
        "per_finding_auroc": aurocs, "per_finding_ap": aps, "per_finding_f1": f1s, "sensitivity": sens,
        "specificity": spec, "per_finding_ece": eces, "thresholds": [float(t) for t in thr], "positives": npos,
    }
    if finding_names is not None:
        out["findings"] = list(finding_names)
    return out
