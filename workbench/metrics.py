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
