"""Subgroup audits, for any task kind: how a fitted model does on each group of a metadata column.

For one attribute (``sex``, ``view``, ``site``...) and the test predictions of a run, an audit
reports per group: the number of test images, the metric with a percentile bootstrap CI (images of
the group resampled with replacement), and overall: the **gap** (max − min over groups with a
value), the **worst group**, and for AUROC metrics the **equity-scaled AUC** of FairCLIP (Luo et
al., CVPR 2024, ``FairCLIP/src/modules.py::equity_scaled_AUC``; reference note task_kinds.md §8):

    ES-AUC = AUC_overall / (1 + α Σ_g |AUC_g − AUC_overall|),   α = 1,

summed (not averaged) over every group of the attribute, so the penalty grows with the number of
groups, as in the reference. Groups with fewer than ``min_group`` test images are **flagged**
(``small``), never silently averaged: they still appear, with their CI, and the gap / worst group /
ES-AUC are computed over the unflagged groups (``include_small=True`` to use all). A group of one
image or with one class only (AUROC undefined) gets NaN and a flag saying why.

Groups never enter fitting: the audit reads only test predictions and the metadata column.

Metrics: ``macro_auroc`` (multi-label: mean per-finding AUROC; single-label: one-vs-rest macro
AUROC of the softmax), ``accuracy`` (single-label), ``mAP`` (multi-label).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError, DataError

AUDIT_METRICS = ("macro_auroc", "accuracy", "mAP")
MIN_GROUP = 30


def fast_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC as the Mann–Whitney statistic with average ranks for ties (equal to sklearn's
    ``roc_auc_score``; the bootstrap calls it thousands of times). NaN without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(y) == 1
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro(y2d: np.ndarray, s2d: np.ndarray) -> float:
    vals = []
    for j in range(s2d.shape[1]):
        known = y2d[:, j] >= 0
        v = fast_auroc(y2d[known, j], s2d[known, j])
        if np.isfinite(v):
            vals.append(v)
    return float(np.mean(vals)) if vals else float("nan")


def _metric_fn(metric: str, multi_label: bool):
    from . import metrics as M

    if metric not in AUDIT_METRICS:
        raise ConfigError(f"audit metric {metric!r} is not one of {list(AUDIT_METRICS)}.")
    if multi_label:
        if metric == "accuracy":
            raise ConfigError("accuracy is undefined for a multi-label run; audit macro_auroc or mAP.")

        def fn(logits, y):
            p = M.sigmoid(logits)
            if metric == "mAP":
                return M.mean_average_precision(p, y)
            return _macro(y, logits)   # AUROC is rank-based: log-odds rank like probabilities
        return fn
    if metric == "mAP":
        raise ConfigError("mAP is a multi-label metric; audit accuracy or macro_auroc for a single-label run.")

    def fn(logits, y):
        if metric == "accuracy":
            return float((logits.argmax(1) == y).mean())
        p = M.softmax(logits)
        onehot = (y[:, None] == np.arange(p.shape[1])[None]).astype(int)
        return _macro(onehot, p)   # one-vs-rest over classes present with both labels, as metrics.macro_auroc
    return fn


@dataclass
class Audit:
    """Result of :func:`subgroup_audit`: ``table`` (one row per group) and the summary numbers."""

    attribute: str
    metric: str
    table: pd.DataFrame
    overall: float
    gap: float
    worst_group: str | None
    es_auc: float | None
    min_group: int
    notes: list = field(default_factory=list)

    def summary(self) -> dict:
        return {"attribute": self.attribute, "metric": self.metric, "overall": self.overall, "gap": self.gap,
                "worst_group": self.worst_group, "es_auc": self.es_auc, "min_group": self.min_group,
                "flagged": self.table.loc[self.table["flag"] != "", "group"].tolist()}

    def plot(self, ax=None):
        """One row per group: the metric with its bootstrap CI, the overall value as a line; flagged groups grey."""
        import matplotlib.pyplot as plt

        t = self.table
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(t)))
        ys = np.arange(len(t))[::-1]
        for y, (_, r) in zip(ys, t.iterrows()):
            colour = "tab:grey" if r["flag"] else "tab:blue"
            if np.isfinite(r["value"]):
                lo, hi = r["ci_low"], r["ci_high"]
                err = [[r["value"] - lo], [hi - r["value"]]] if np.isfinite(lo) else None
                ax.errorbar(r["value"], y, xerr=err, fmt="o", color=colour, capsize=3)
        ax.axvline(self.overall, color="k", lw=1, ls="--", label=f"overall {self.overall:.3f}")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{g} (n={n}){' ⚑ ' + f if f else ''}" for g, n, f in zip(t["group"], t["n"], t["flag"])])
        title = f"{self.metric} by {self.attribute}: gap {self.gap:.3f}, worst {self.worst_group}"
        if self.es_auc is not None:
            title += f", ES-AUC {self.es_auc:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(self.metric)
        ax.legend(loc="lower right", fontsize=8)
        return ax


def equity_scaled_auc(overall: float, group_aucs: Sequence[float], alpha: float = 1.0) -> float:
    """FairCLIP's ES-AUC: overall / (1 + α Σ_g |AUC_g − overall|) (sum over groups, not averaged)."""
    return float(overall / (1.0 + alpha * sum(abs(a - overall) for a in group_aucs)))


def subgroup_audit(logits, targets, groups: Sequence, *, attribute: str = "group", metric: str = "macro_auroc",
                   multi_label: bool | None = None, n_boot: int = 1000, seed: int = 0, min_group: int = MIN_GROUP,
                   include_small: bool = False, alpha: float = 1.0, ci: float = 0.95) -> Audit:
    """Audit test predictions by the group of each image (module docstring).

    ``logits``: [N, C] (single-label) or [N, L] per-finding log-odds (multi-label); ``targets``:
    [N] class ids or [N, L] 1/0/-1; ``groups``: N group values (None / "" = unknown: dropped, counted
    in ``notes``). ``multi_label`` is inferred from the targets' shape when not given.
    """
    logits = np.asarray(logits.detach().cpu().double() if isinstance(logits, torch.Tensor) else logits, float)
    y = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
    g = np.array(["" if v is None else str(v) for v in groups], dtype=object)
    if len(g) != len(logits) or len(y) != len(logits):
        raise DataError(f"subgroup audit of {attribute!r}: {len(logits)} predictions, {len(y)} targets and {len(g)} "
                        "group values; give one group value per test image.")
    multi = (y.ndim == 2) if multi_label is None else multi_label
    fn = _metric_fn(metric, multi)
    notes = []
    unknown = g == ""
    if unknown.any():
        notes.append(f"{int(unknown.sum())} test image(s) without a value of {attribute!r} left out of the groups")
    overall = fn(logits, y)
    rng = np.random.default_rng(seed)
    rows = []
    for name in sorted(set(g[~unknown])):
        idx = np.flatnonzero(g == name)
        flag = ""
        value = fn(logits[idx], y[idx]) if len(idx) > 1 else float("nan")
        lo = hi = float("nan")
        if len(idx) == 1:
            flag = "one image"
        elif not np.isfinite(value):
            flag = "metric undefined (one class only)"
        else:
            boots = []
            for _ in range(n_boot):
                b = idx[rng.integers(0, len(idx), len(idx))]
                v = fn(logits[b], y[b])
                if np.isfinite(v):
                    boots.append(v)
            if boots:
                lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        if not flag and len(idx) < min_group:
            flag = f"small (< {min_group} images)"
        rows.append({"attribute": attribute, "group": name, "n": len(idx), "value": value, "ci_low": float(lo),
                     "ci_high": float(hi), "flag": flag})
    table = pd.DataFrame(rows, columns=["attribute", "group", "n", "value", "ci_low", "ci_high", "flag"])
    use = table[np.isfinite(table["value"]) & ((table["flag"] == "") | include_small)]
    if len(use) == 0:
        notes.append("no group large enough to compare: gap, worst group and ES-AUC are undefined "
                     f"(lower min_group={min_group} or pass include_small=True)")
        gap, worst, es = float("nan"), None, None
    else:
        gap = float(use["value"].max() - use["value"].min())
        worst = str(use.loc[use["value"].idxmin(), "group"])
        es = equity_scaled_auc(overall, use["value"].tolist(), alpha) if "auroc" in metric else None
    return Audit(attribute, metric, table, float(overall), gap, worst, es, min_group, notes)


def audit_run(result, dataset, attribute: str, **kw) -> Audit:
    """Audit a :func:`~workbench.run_experiment` result by one of ``dataset.groups``' columns."""
    columns: Mapping = getattr(dataset, "groups", None) or {}
    if attribute not in columns:
        from .errors import did_you_mean

        raise DataError(f"dataset {dataset.name!r} has no group column {attribute!r}; it has {sorted(columns)}. Name "
                        "it in the loader (groups=[...]) or the YAML's source.groups." + did_you_mean(attribute, columns))
    ids = getattr(result, "test_ids", None)
    if ids is None:
        raise ConfigError("this result does not record its test image ids; re-run it with this version.")
    values = columns[attribute]
    missing = [i for i in ids if i not in values]
    if len(missing) == len(ids):
        raise DataError(f"group column {attribute!r} has no value for any test image of {dataset.name!r}.")
    kw.setdefault("metric", getattr(dataset, "metric", None) if getattr(dataset, "metric", None) in AUDIT_METRICS
                  else "macro_auroc")
    return subgroup_audit(result.logits, result.labels, [values.get(i) for i in ids], attribute=attribute, **kw)
