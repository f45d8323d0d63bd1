"""GDA: Gaussian discriminant analysis on CLIP features (Wang et al., "A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation", ICLR 2024; reference code mrflogs/ICLR24
``main_few_shots.py`` and ``main_base2new.py``).

Estimation (``main_few_shots.py:run``):

* features of ``augment_views = 10`` passes of RandomResizedCrop(scale 0.5–1) + flip over the
  support set, each L2-normalised and **kept as separate samples** (N = 10·K·C);
* class means μ_k; every sample centred on its own class mean; ``cov`` the sample covariance
  of the centred vectors (``torch.cov``, divides by N − 1);
* the reference's shrinkage ("KS estimator") inverse ``Σ⁻¹ = D · pinv((N − 1)·cov + tr(cov)·I)``;
  that matrix is positive definite, so it is inverted by Cholesky (same matrix to ~1e-15, several
  times faster than ``pinv`` at 512²);
* uniform priors π_k = 1/C, ``W = Σ⁻¹μ`` and ``b_k = log π_k − ½ μ_kᵀ Σ⁻¹ μ_k``;
* ``logits = logit_scale · f·Tᵀ (+ logit_bias) + α · (f·W + b)``, α from
  {1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100} by accuracy (strict ``>``, first best wins, 0.1 if none
  beats zero accuracy). The reference hard-codes 100 for the zero-shot scale; we use the
  backbone's own (100 for OpenAI CLIP).

``covariance="pooled"`` is ``main_base2new.py``'s estimate for the base classes:
``Σ⁻¹ = pinv(mean_k cov_k)``. :meth:`GDA.new_class_head` synthesises classifiers for classes
never seen in the support set from the nearest support features of their text embeddings,
as ``main_base2new.py`` does (see :mod:`workbench.base2new`).

Precision: the class means, covariance and its inverse are float64 (a float32 covariance moves Σ⁻¹
by ~1e-7 relative); the logits, the α selection and predictions are float32 like the reference,
with the same chosen α (tests/test_training_free.py compares against the float64 path).
``gram_dtype="float32"`` computes the N·D² covariance product — nearly all of the fit's arithmetic
at 100 classes × 16 shots × 10 views — in float32, as a plain float32 implementation does: on a
CPU float64 matrix products run at about half the float32 rate, so this is the speed of the plain
computation; on the benchmark task Σ⁻¹ moves by 5e-7 and W by 3e-7 relative, with the same α and
the same predictions (tested). The default stays float64: the cost of the tighter agreement.

Selection: the reference tunes α on the full validation split (ImageNet: on test). Default
here is the K-shot validation set of the few-shot split (``selection="kshot_val"``);
``"full_val"`` reproduces the papers' protocol. The test split is never read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import ConfigError
from ..base import Method
from ..registry import register

ALPHAS = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def class_means(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[C, D]`` mean of each class's rows (one scatter-add, no per-class masks); float64 accumulation."""
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x.double())
    return sums / torch.bincount(y, minlength=n_classes).clamp(min=1)[:, None]


def _gram(centred: torch.Tensor, weights: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    """``Σ_i w_i c_i c_iᵀ``, returned in float64; the product in float64 by default: the covariance is where
    float64 matters (a float32 product moves Σ⁻¹ by ~1e-7 relative, more than the reference-level agreement
    the tests hold it to). ``dtype=torch.float32``: the product in float32 (about twice as fast on a CPU)."""
    centred = centred.to(dtype)
    lhs = centred if weights is None else centred * weights[:, None].to(dtype)
    return (lhs.T @ centred).double()


def spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix by Cholesky (about 9x faster than ``pinv`` at 512², the same
    matrix to ~1e-15); a singular one (every sample on its class mean: trace 0) falls back to the pseudo-inverse."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(matrix)


def shrunk_system(centred: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """``(N−1)·cov + tr(cov)·I`` of class-centred vectors ``[N, D]``: symmetric positive definite (the trace ridge)."""
    n, d = centred.shape
    gram = _gram(centred, dtype=dtype)                           # (N−1)·cov: the centred vectors have zero mean
    return gram + (torch.trace(gram) / (n - 1)) * torch.eye(d, dtype=torch.float64)


def ks_inverse_covariance(centred: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """``D · ((N−1)·cov + tr(cov)·I)⁻¹`` of already class-centred vectors ``[N, D]`` (float64).

    The reference takes a pseudo-inverse; the matrix is positive definite, so its Cholesky
    inverse is the same matrix (to ~1e-15) at a fraction of the cost.
    """
    return centred.shape[1] * spd_inverse(shrunk_system(centred, dtype))


def pooled_inverse_covariance(centred: torch.Tensor, y: torch.Tensor, n_classes: int,
                              dtype=torch.float64) -> torch.Tensor:
    """``pinv(mean_k cov_k)``: ``main_base2new.py``'s estimate for the base classes (``centred`` on class means).

    ``mean_k cov_k = Σ_i c_i c_iᵀ / ((n_{y_i} − 1)·C)``: one weighted product instead of a loop over classes.
    The average may be singular (fewer samples than dimensions), so this one stays a pseudo-inverse.
    """
    counts = torch.bincount(y, minlength=n_classes).double()
    weights = 1.0 / ((counts - 1) * n_classes)
    return torch.linalg.pinv(_gram(centred, weights[y], dtype))


def linear_head(means: torch.Tensor, cov_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [D, C]`` and ``b [C]`` of the Gaussian discriminant with uniform priors."""
    means = means.double()
    c = means.shape[0]
    w = cov_inv @ means.T
    b = math.log(1.0 / c) - (means * w.T).sum(-1) / 2
    return w, b


@dataclass
class GDAConfig:
    #: augmented passes of the support set, kept as separate samples
    augment_views: int = 10
    aug_scale: list = field(default_factory=lambda: [0.5, 1.0])
    #: candidate weights α of the GDA logits against the zero-shot logits
    alphas: list = field(default_factory=lambda: list(ALPHAS))
    #: "ks" (few-shot reference) or "pooled" (the base-to-new reference's base classes)
    covariance: str = "ks"
    #: "kshot_val" (default, leak-free) or "full_val" (the papers' protocol)
    selection: str = "kshot_val"
    #: α kept when no candidate beats zero accuracy (the reference's initial value)
    default_alpha: float = 0.1
    #: precision of the covariance product: "float64" (default, tight agreement) or "float32" (about 2x faster
    #: on a CPU, the plain computation's precision; parameters move by ~1e-7 relative)
    gram_dtype: str = "float64"


@register("gda")
class GDA(Method):
    Config = GDAConfig

    def fit(self, task) -> "GDA":
        cfg = self.config
        if cfg.covariance not in ("ks", "pooled"):
            raise ConfigError(f"gda: covariance must be 'ks' or 'pooled', got {cfg.covariance!r}.")
        if cfg.gram_dtype not in ("float64", "float32"):
            raise ConfigError(f"gda: gram_dtype must be 'float64' or 'float32', got {cfg.gram_dtype!r}.")
        dtype = torch.float64 if cfg.gram_dtype == "float64" else torch.float32
        support = task.support(views=cfg.augment_views, aug_scale=tuple(cfg.aug_scale))
        x, y = support.flat()
        x = x.float()
        c = task.n_classes
        present = torch.bincount(y, minlength=c)
        if (present == 0).any():
            missing = [task.class_names[i] for i in torch.nonzero(present == 0).flatten().tolist()]
            raise ValueError(f"gda: no support features for class(es) {missing}; every class needs an image.")
        means = class_means(x, y, c)
        centred = x.double() - means[y]
        if cfg.covariance == "ks":
            cov_inv = ks_inverse_covariance(centred, dtype)
        else:
            cov_inv = pooled_inverse_covariance(centred, y, c, dtype)
        weight, bias = linear_head(means, cov_inv)
        self.weight, self.bias_gda = weight, bias   # float64 parameters, applied to float32 features
        self.text_weights = task.text_classifier()
        self.scale = torch.tensor(task.backbone.logit_scale)
        self.bias = torch.tensor(task.backbone.logit_bias or 0.0)
        self.class_names = task.class_names
        self.support_vecs = x           # kept for new-class synthesis (base-to-new)
        self.cov_inv = cov_inv
        alpha, info = self._select_alpha(task)
        self.alpha = torch.tensor(alpha)
        self.fit_info = {"alpha": alpha, "n_samples": int(x.shape[0]), "covariance": cfg.covariance,
                         "templates": list(task.templates), **info}
        return self

    # Logits in float32 (the reference's precision): only the covariance algebra needs float64.
    def _zero_shot(self, features):
        return self.scale.float() * (features.float() @ self.text_weights.float().T) + self.bias.float()

    def _gda(self, features):
        return features.float() @ self.weight.float() + self.bias_gda.float()

    def _select_alpha(self, task):
        cfg = self.config
        val = task.selection_set(cfg.selection)
        if val is None or len(val) == 0:
            return cfg.default_alpha, {"selection": "none (no validation images): default_alpha kept"}
        zs, g = self._zero_shot(val.x), self._gda(val.x)
        alphas = torch.tensor(cfg.alphas, dtype=torch.float32)
        logits = torch.addcmul(zs[None], alphas[:, None, None], g[None])     # [A, N, C]
        acc = (logits.argmax(-1) == val.labels).double().mean(-1)
        best, best_alpha = 0.0, cfg.default_alpha
        for a, v in zip(cfg.alphas, acc.tolist()):   # strict '>', first best wins, as the reference
            if v > best:
                best, best_alpha = v, a
        return float(best_alpha), {"selection": cfg.selection, "selection_images": len(val),
                                   "selection_accuracy": {str(a): v for a, v in zip(cfg.alphas, acc.tolist())}}

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return torch.addcmul(self._zero_shot(features), self.alpha.float(), self._gda(features))

    def new_class_head(self, new_text_weights: torch.Tensor, k: int = 64, text_copies: int = 16):
        """Classifier ``(W, b)`` for unseen classes, synthesised as ``main_base2new.py`` does.

        For each new class text embedding ``w``: its ``k`` most similar support features; the
        class mean is the mean of those features and ``text_copies`` copies of ``w``; the
        covariance is the KS estimate of those ``k`` features centred on ``w``, averaged over the
        new classes. (The reference hard-codes D = 512; we use the feature dimension.)
        """
        self._check_fitted()
        vecs = self.support_vecs.double()
        texts = new_text_weights.double()
        k = min(k, vecs.shape[0])
        d = vecs.shape[1]
        means, inverses = [], []
        for w in texts:
            near = vecs[torch.topk(w @ vecs.T, k=k).indices]
            means.append(torch.cat([near, w[None].repeat(text_copies, 1)]).mean(0))
            centred = near - w[None]
            system = centred.T @ centred            # (k−1)·cov, centred on w as the reference does
            system += (torch.trace(system) / (k - 1)) * torch.eye(d, dtype=system.dtype)
            inverses.append(d * spd_inverse(system))
        return linear_head(torch.stack(means), torch.stack(inverses).mean(0))

    def state(self):
        return {"weight": self.weight, "bias_gda": self.bias_gda, "text_weights": self.text_weights, "scale": self.scale,
                "bias": self.bias, "alpha": self.alpha, "support_vecs": self.support_vecs, "cov_inv": self.cov_inv}

    def load_state(self, state):
        for key, value in state.items():
            setattr(self, key, value)
