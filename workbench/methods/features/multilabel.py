"""Multi-label methods on frozen features: CheXzero's positive/negative prompt pair, one-vs-rest probe.

Both return per-finding **log-odds** ``[N, L]`` from ``predict_logits`` (probability = sigmoid),
choose one decision threshold per finding on the K-shot validation set (best F1,
:func:`workbench.metrics.best_f1_thresholds`; 0.5 without validation images; recorded in
``fit_info["thresholds"]``), and leave uncertain (-1) entries out of fitting and selection
(CheXpert's U-Ignore).

* ``chexzero`` — Tiu et al., "Expert-level detection of pathologies from unannotated chest X-ray
  images via self-supervised learning", Nat. Biomed. Eng. 2022 (rajpurkarlab/CheXzero
  ``zero_shot.py::run_softmax_eval``): for finding c, s⁺ = fᵀt("{c}") and s⁻ = fᵀt("no {c}") with
  raw cosines (no ×100), p_c = exp(s⁺)/(exp(s⁺)+exp(s⁻)), i.e. log-odds s⁺ − s⁻. The positive and
  negative templates default to the reference's ``"{}"`` / ``"no {}"``; ``wrap_in_templates=True``
  also puts each inside the dataset's prompt templates (our option, not the reference). Because
  the cosines are raw, probabilities sit near 0.5: AUROC is unaffected, thresholds are chosen on
  validation, ECE is poor by construction (as in the reference).
* ``ovr_linear_probe`` — one L2-regularised logistic regression per finding (scikit-learn
  L-BFGS, the CLIP/CoOp linear-probe recipe applied one-vs-rest) on L2-normalised features; one C
  shared by all findings is chosen from ``c_grid`` by macro AUROC on the K-shot validation set (tie:
  the smaller C); the winner's classifiers (fitted on the support set only) are kept.
  Differences from the single-label ``linear_probe``: normalised (not raw) features, no bisection
  refinement, selection by macro AUROC (the multi-label kind's primary metric).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError, DataError
from ...metrics import best_f1_thresholds, per_finding_auroc, sigmoid
from ..base import Method
from ..registry import register


def task_targets(task, feats) -> torch.Tensor:
    """The [N, L] targets (1/0/-1) of the images of ``feats`` (support or validation)."""
    if hasattr(task, "targets_for"):
        return task.targets_for(feats.ids)
    raise ConfigError(f"{type(task).__name__} has no targets_for(ids): multi-label methods need a multi-label task.")


class MultiLabelMethod(Method):
    """Shared: sigmoid probabilities, thresholds chosen on validation, predictions above threshold."""

    task_kinds = ("multi_label",)

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.predict_logits(features).float())

    def _choose_thresholds(self, task) -> None:
        val = task.validation()
        n = len(self.class_names)
        if val is None or len(val) == 0:
            self.thresholds = torch.full((n,), 0.5, dtype=torch.float64)
            self.fit_info["thresholds_from"] = "default 0.5 (no validation images)"
        else:
            with torch.no_grad():
                logits = self.predict_logits(val.x).double().numpy()
            self.thresholds = torch.tensor(best_f1_thresholds(sigmoid(logits), task_targets(task, val).numpy()),
                                           dtype=torch.float64)
            self.fit_info["thresholds_from"] = f"best F1 per finding on the K-shot validation set ({len(val)} images)"
        self.fit_info["thresholds"] = [float(t) for t in self.thresholds]

    def predict_findings(self, features: torch.Tensor) -> list[list[str]]:
        """Per image, the findings whose probability reaches its threshold."""
        p = self.predict_proba(features).double()
        above = p >= self.thresholds.to(p)[None]
        return [[self.class_names[j] for j in torch.nonzero(row).flatten().tolist()] for row in above]


@dataclass
class CheXzeroConfig:
    #: positive prompt of a finding ('{}' = its readable name); CheXzero: "{}"
    positive: str = "{}"
    #: negative prompt of a finding; CheXzero: "no {}"
    negative: str = "no {}"
    #: also put each prompt inside the dataset's templates (not the reference; averaged per finding)
    wrap_in_templates: bool = False

    def __post_init__(self):
        for name in ("positive", "negative"):
            v = getattr(self, name)
            if not isinstance(v, str) or v.count("{}") != 1:
                raise ConfigError(f"chexzero: {name} must be a string with exactly one '{{}}', got {v!r}.")


def pos_neg_text(task, positive: str, negative: str, wrap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit text vectors ``[L, D]`` of the positive and the negative prompt of every finding."""
    if hasattr(task, "pos_neg_text"):   # a MultiLabelTensorTask holds them already
        return task.pos_neg_text()
    from ...prompts import text_classifier

    names = task.class_names
    templates = list(task.templates) if wrap else ["{}"]
    pos = text_classifier(task.backbone, [positive.format(n) for n in names], templates)
    neg = text_classifier(task.backbone, [negative.format(n) for n in names], templates)
    return pos, neg


@register("chexzero")
class CheXzero(MultiLabelMethod):
    """Zero-shot multi-label: softmax over a positive/negative prompt pair per finding (Tiu et al. 2022)."""

    Config = CheXzeroConfig

    def fit(self, task) -> "CheXzero":
        cfg = self.config
        self.pos, self.neg = pos_neg_text(task, cfg.positive, cfg.negative, cfg.wrap_in_templates)
        self.class_names = list(task.class_names)
        self.fit_info = {"positive": cfg.positive, "negative": cfg.negative,
                         "templates": list(task.templates) if cfg.wrap_in_templates else ["{}"], "scale": 1.0}
        self._choose_thresholds(task)
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        f = features.float()
        return f @ self.pos.T - f @ self.neg.T   # log-odds of softmax([s+, s-]) = s+ - s-

    def state(self):
        return {"pos": self.pos, "neg": self.neg, "thresholds": self.thresholds}

    def load_state(self, state):
        self.pos, self.neg, self.thresholds = state["pos"], state["neg"], state["thresholds"]


@dataclass
class OvrProbeConfig:
    #: C values (inverse L2 strength) searched on the K-shot validation set by macro AUROC
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])
    #: L-BFGS iterations per finding
    max_iter: int = 1000
    #: C used when there is no validation set
    default_C: float = 1.0


def fit_binary_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> tuple[np.ndarray, float]:
    """(w, b) of scikit-learn's L2 logistic regression (L-BFGS) on 0/1 labels; a finding whose known
    labels are all one value gets w = 0 and b = ±log(n+1) (a constant, never a crash)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    if y.min() == y.max():
        return np.zeros(x.shape[1]), float(np.log(len(y) + 1.0)) * (1.0 if y[0] == 1 else -1.0)
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    # single-threaded BLAS: these problems are far too small to gain from threads (as linear_probe)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)   # large C on few images may stop at max_iter
        clf.fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


@register("ovr_linear_probe")
class OvrLinearProbe(MultiLabelMethod):
    """One-vs-rest logistic regression per finding, C chosen on the K-shot validation set by macro AUROC."""

    Config = OvrProbeConfig

    def _fit_c(self, x, y, c):
        w, b = [], []
        for j in range(y.shape[1]):
            known = y[:, j] >= 0
            if not known.any() or y[known, j].sum() == 0:
                raise DataError(f"ovr_linear_probe: finding {self.class_names[j]!r} has no positive support image "
                                "(after leaving out uncertain labels); sample more shots or drop the finding.")
            wj, bj = fit_binary_logistic(x[known], y[known, j], c, self.config.max_iter)
            w.append(wj)
            b.append(bj)
        return torch.tensor(np.stack(w)), torch.tensor(np.array(b))

    def fit(self, task) -> "OvrLinearProbe":
        cfg = self.config
        self.class_names = list(task.class_names)
        sup = task.support()
        x = F.normalize(sup.x.double(), dim=-1).numpy()
        y = task_targets(task, sup).numpy()
        val = task.validation()
        tried = {}
        if val is None or len(val) == 0 or not cfg.c_grid:
            best_c = cfg.default_C
            self.weight, self.bias = self._fit_c(x, y, best_c)
            how = "default_C (no validation images)"
        else:
            vx = F.normalize(val.x.double(), dim=-1)
            vy = task_targets(task, val).numpy()
            best = None
            for c in sorted(cfg.c_grid):   # ascending: on a tie the smaller C (stronger regularisation) stays
                w, b = self._fit_c(x, y, c)
                aucs = [a for a in per_finding_auroc((vx @ w.T + b).numpy(), vy) if a is not None]
                score = float(np.mean(aucs)) if aucs else float("nan")
                tried[c] = score
                if best is None or (score == score and (best[0] != best[0] or score > best[0])):
                    best = (score, c, w, b)
            _, best_c, self.weight, self.bias = best
            how = "macro AUROC on the K-shot validation set"
        self.fit_info = {"C": best_c, "selected_by": how, "val_macro_auroc_per_C": tried,
                         "features": "normalized", "n_support": len(x)}
        self._choose_thresholds(task)
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        f = F.normalize(features.double(), dim=-1)
        return (f @ self.weight.T + self.bias).float()

    def state(self):
        return {"weight": self.weight, "bias": self.bias, "thresholds": self.thresholds}

    def load_state(self, state):
        self.weight, self.bias, self.thresholds = state["weight"], state["bias"], state["thresholds"]


class MultiLabelTensorTask:
    """A multi-label few-shot task over features you already have (tests, benchmarks).

    ``support_x`` [N, D] and ``support_y`` [N, L] (1/0/-1), ``val_x`` / ``val_y`` likewise,
    ``text_pos`` / ``text_neg`` [L, D] the positive / negative prompt embeddings.
    """

    def __init__(self, support_x, support_y, val_x, val_y, text_pos, text_neg, class_names=None, seed: int = 1):
        from ...features import Features

        self._y = {}
        ids_s = [f"support/{i}" for i in range(len(support_x))]
        ids_v = [f"val/{i}" for i in range(len(val_x))]
        self._y.update(zip(ids_s, torch.as_tensor(support_y).long()))
        self._y.update(zip(ids_v, torch.as_tensor(val_y).long()))
        dummy = lambda n: torch.full((n,), -1, dtype=torch.long)  # noqa: E731 - no single label
        self._support = Features(raw=torch.as_tensor(support_x)[None], labels=dummy(len(ids_s)), ids=ids_s)
        self._val = Features(raw=torch.as_tensor(val_x)[None], labels=dummy(len(ids_v)), ids=ids_v)
        self._pos, self._neg = F.normalize(text_pos.float(), dim=-1), F.normalize(text_neg.float(), dim=-1)
        self.class_names = list(class_names or [f"finding {j}" for j in range(text_pos.shape[0])])
        self.templates = ["{}"]
        self.seed = seed

    def support(self, views: int = 0, **_):
        return self._support

    def validation(self):
        return self._val

    def targets_for(self, ids):
        return torch.stack([self._y[i] for i in ids])

    def pos_neg_text(self):
        return self._pos, self._neg
