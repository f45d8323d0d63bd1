"""Conformal prediction sets: "the true class is in this set with probability ≥ coverage".

Medical users ask for coverage rather than a single label. Given calibration images that are
exchangeable with the test images, split conformal prediction (Vovk et al. 2005; Angelopoulos &
Bates, "A Gentle Introduction to Conformal Prediction", 2021, §1) gives, for a new image,

    P(y ∈ C(x)) ≥ coverage,   C(x) = {c : s(x, c) ≤ q̂},

where q̂ is the ⌈(n+1)·coverage⌉-th smallest calibration score ``s(x_i, y_i)`` among n.

**What the guarantee needs.** The calibration images must be exchangeable with the test images
*given the fitted model*: images the method fitted on, early-stopped on, or chose its
hyper-parameters on (β/α, C, epochs, WiSE-FT α) are not — the model looks better on them than
on test, so q̂ comes out too small and the sets under-cover (Conf-OT, Silva-Rodríguez et al.,
CVPR 2025; the "validation illusion" of few-shot selection). :func:`workbench.run_experiment`
therefore holds out ``calibration_fraction`` of the K-shot validation images per class from
fitting and selection when asked, and otherwise reports the sets as *not certified* whenever the
method read the validation images (``certified: false`` with a note saying why and how to fix it).

**Scores** (``score=``):

- ``"lac"`` (default; Sadinle, Lei & Wasserman, JASA 2019): ``s = 1 − p_y(x)``; smallest sets on
  average, but their coverage is uneven over easy and hard images.
- ``"aps"`` (Romano, Sesia & Candès, NeurIPS 2020): sort the probabilities descending,
  π_(1) ≥ π_(2) ≥ …, let o(x, y) be the rank of y; ``s = Σ_{j<o} π_(j) + u·π_(o)`` with
  ``u ~ U[0, 1]`` (``randomized=True``, the reference default) or the full cumulative sum
  (``randomized=False``). Sets grow with the model's uncertainty.
- ``"raps"`` (Angelopoulos, Bates, Malik & Jordan, ICLR 2021): APS ``+ λ·(o − k_reg)⁺``, which
  penalises long tails of unlikely classes. With ``k_reg``/``lam`` left ``None`` (the reference
  default) they are tuned on a ``pct_paramtune`` = 0.3 share of the calibration images, which are
  then left out of the quantile: k_reg = the coverage-quantile ('higher') of the true label's
  0-based rank + 1, λ the value of {0.001, 0.01, 0.1, 0.2, 0.5} with the smallest mean set size.

Reference: aangelopoulos/conformal_classification ``conformal.py`` (``get_tau``/``giq`` for the
calibration score, ``gcq`` for the sets, ``pick_kreg``/``pick_lamda_size``/``pick_parameters``,
``ConformalModel`` defaults ``randomized=True, allow_zero_sets=False, pct_paramtune=0.3,
lamda_criterion='size'``). Here a label enters a set when its own (randomised) score is ≤ q̂,
with one ``u`` per image — for one threshold this is exactly the reference's ``gcq`` (labels
ranked above the boundary always enter; the boundary label enters with probability
``(q̂ − Σ_{j<L} π_(j) − penalty)/π_(L)``), and it extends to per-class thresholds.
Deliberate differences, each with its effect: (1) q̂ is the finite-sample ⌈(n+1)·coverage⌉-th
score for every score (the reference's APS/RAPS path takes ``quantile(1 − α, 'higher')``, i.e.
the ⌈n·coverage⌉-th, which drops the +1 correction and can under-cover by up to 1/(n+1) — a lot
at few-shot n); (2) no Platt temperature is fitted on the calibration images (the reference
fits T, init 1.3, on the same images it then takes the quantile over); the method's own logits
are used, which keeps every calibration image exchangeable; (3) the random ``u`` comes from a
seeded generator (``seed=``), so a run's sets are reproducible.

With ``class_conditional=True`` (Mondrian conformal) the threshold is computed per true class,
so the guarantee holds for every class separately — at the price of needing more calibration
images per class: with ``n_c`` images of a class, a coverage above ``n_c / (n_c + 1)`` cannot be
certified and that class's threshold becomes "every class" (the sets say so honestly; a warning
names the classes). :func:`set_metrics` reports the class-conditional coverage gap
(mean over classes of |coverage_c − target|, Ding et al., NeurIPS 2023), which marginal sets
do not control.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

SCORES = ("lac", "aps", "raps")
RAPS_LAMBDA_GRID = (0.001, 0.01, 0.1, 0.2, 0.5)   # reference pick_lamda_size grid


def _check_coverage(coverage) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage < 1:
        raise ConfigError(f"coverage must be a number strictly between 0 and 1 (e.g. 0.9), got {coverage!r}.")
    return float(coverage)


def _rank(n: int, coverage: float) -> int:
    """⌈(n+1)·coverage⌉, guarded against float error (10 × 0.9 is 9.000000000000002)."""
    return math.ceil((n + 1) * coverage - 1e-9)


def min_calibration_images(coverage: float) -> int:
    """The fewest calibration images that can certify ``coverage`` (9 for 0.9, 19 for 0.95)."""
    coverage = _check_coverage(coverage)
    return next(n for n in range(1, 10**7) if _rank(n, coverage) <= n)


def _quantile_threshold(scores: torch.Tensor, coverage: float) -> float:
    """The ⌈(n+1)·coverage⌉-th smallest score; +inf when n is too small to certify the coverage."""
    n = scores.numel()
    rank = _rank(n, coverage)
    if rank > n:
        return math.inf
    return float(torch.sort(scores).values[rank - 1])


def _penalties(n_classes: int, k_reg: int, lam: float) -> torch.Tensor:
    """λ for 0-based ranks ≥ k_reg (the reference's ``penalties[:, kreg:] += lamda``), cumulated."""
    pen = torch.zeros(n_classes, dtype=torch.float64)
    pen[min(int(k_reg), n_classes):] = float(lam)
    return pen.cumsum(0)


def label_scores(probs: torch.Tensor, score: str = "lac", u: torch.Tensor | None = None,
                 k_reg: int = 0, lam: float = 0.0) -> torch.Tensor:
    """Every label's conformity score ``[N, C]`` (the score it would have were it the true label).

    ``u`` (``[N]`` in [0, 1]) randomises APS/RAPS; ``None`` gives the deterministic cumulative sum.
    For RAPS the penalty of the label at 0-based rank r is ``λ·(r + 1 − k_reg)⁺`` summed, as in
    the reference ``get_tau``.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if score == "lac":
        return 1.0 - probs
    order = torch.argsort(probs, dim=1, descending=True, stable=True)
    ordered = torch.gather(probs, 1, order)
    cumsum = ordered.cumsum(1)
    if u is None:
        sorted_scores = cumsum
    else:
        sorted_scores = cumsum - ordered + torch.as_tensor(u, dtype=torch.float64)[:, None] * ordered
    if score == "raps":
        sorted_scores = sorted_scores + _penalties(probs.shape[1], k_reg, lam)[None, :]
    elif score != "aps":
        raise ConfigError(f"conformal score {score!r} is not one of {SCORES}.")
    out = torch.empty_like(sorted_scores)
    out.scatter_(1, order, sorted_scores)
    return out


@dataclass
class ConformalCalibrator:
    """Thresholds learned from calibration probabilities; :meth:`predict_sets` turns probabilities into sets.

    ``score``: ``"lac"``, ``"aps"`` or ``"raps"`` (module docstring). ``randomized``: APS/RAPS
    tie-breaking with ``u ~ U[0, 1]`` (reference default True). ``k_reg``/``lam``: RAPS penalty
    (``None``: tuned on ``pct_paramtune`` of the calibration images, which the quantile then
    leaves out). ``allow_zero_sets``: False (reference default) turns an empty set into the top-1
    class. ``seed``: the generator of ``u`` and of the RAPS tuning split.
    """

    coverage: float = 0.9
    class_conditional: bool = False
    score: str = "lac"
    randomized: bool = True
    k_reg: int | None = None
    lam: float | None = None
    pct_paramtune: float = 0.3
    allow_zero_sets: bool = False
    seed: int = 0
    thresholds: torch.Tensor | None = None
    n_calibration: int = 0
    uncertified_classes: list[int] = field(default_factory=list)
    #: RAPS penalty actually used (``k_reg``/``lam`` as given, or as tuned by ``fit``)
    fitted_k_reg: int = 0
    fitted_lam: float = 0.0

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed) * 1000003 + salt)

    def _u(self, n: int, salt: int) -> torch.Tensor | None:
        if self.score == "lac" or not self.randomized:
            return None
        return torch.rand(n, generator=self._generator(salt), dtype=torch.float64)

    def _true_scores(self, probs, labels, k_reg, lam, salt) -> torch.Tensor:
        scores = label_scores(probs, self.score, self._u(len(labels), salt), k_reg, lam)
        return scores[torch.arange(len(labels)), labels]

    def _tune_raps(self, probs: torch.Tensor, labels: torch.Tensor):
        """Reference ``pick_parameters``: k_reg and λ from a ``pct_paramtune`` share, the rest calibrates."""
        n = len(labels)
        n_tune = math.ceil(self.pct_paramtune * n)
        if n_tune < 1 or n - n_tune < 1:
            raise ConfigError(f"RAPS with k_reg/lam left to tuning needs calibration images both to tune on and to "
                              f"calibrate on; {n} image(s) with pct_paramtune={self.pct_paramtune} leave none for one "
                              "of them. Pass k_reg and lam (e.g. k_reg=1, lam=0.001 as Conf-OT does) or more images.")
        perm = torch.randperm(n, generator=self._generator(7))
        tune, rest = perm[:n_tune], perm[n_tune:]
        tp, ty = probs[tune], labels[tune]
        k_reg = self.k_reg
        if k_reg is None:   # pick_kreg: 'higher' quantile of the 0-based true rank, + 1
            ranks = (tp > tp[torch.arange(len(ty)), ty][:, None]).sum(1).double()
            k_reg = int(torch.sort(ranks).values[math.ceil(len(ranks) * self.coverage - 1e-9) - 1]) + 1
        lam = self.lam
        if lam is None:   # pick_lamda_size: smallest mean set size on the tuning images themselves
            best_size, lam = float(probs.shape[1]), RAPS_LAMBDA_GRID[0]
            for cand in RAPS_LAMBDA_GRID:
                tau = _quantile_threshold(self._true_scores(tp, ty, k_reg, cand, salt=11), self.coverage)
                size = float(self._sets(tp, torch.full((probs.shape[1],), tau, dtype=torch.float64),
                                        k_reg, cand, salt=13).sum(1).double().mean())
                if size < best_size:
                    best_size, lam = size, cand
        return int(k_reg), float(lam), probs[rest], labels[rest]

    def fit(self, probs: torch.Tensor, labels: torch.Tensor) -> "ConformalCalibrator":
        self.coverage = _check_coverage(self.coverage)
        if self.score not in SCORES:
            raise ConfigError(f"conformal score {self.score!r} is not one of {SCORES}.")
        probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels).long()
        if probs.ndim != 2 or labels.shape != (probs.shape[0],):
            raise ConfigError(f"conformal calibration needs probabilities [N, C] and labels [N]; got "
                              f"{tuple(probs.shape)} and {tuple(labels.shape)}.")
        if probs.shape[0] == 0:
            raise ConfigError("conformal calibration needs at least one labelled calibration image "
                              "(the K-shot validation set is empty).")
        k_reg, lam = (self.k_reg or 0), (self.lam or 0.0)
        if self.score == "raps":
            if self.k_reg is None or self.lam is None:
                k_reg, lam, probs, labels = self._tune_raps(probs, labels)
        self.fitted_k_reg, self.fitted_lam = int(k_reg), float(lam)
        scores = self._true_scores(probs, labels, k_reg, lam, salt=1)
        n_classes = probs.shape[1]
        if self.class_conditional:
            thresholds = [_quantile_threshold(scores[labels == c], self.coverage) for c in range(n_classes)]
        else:
            thresholds = [_quantile_threshold(scores, self.coverage)] * n_classes
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)
        self.n_calibration = int(len(labels))
        self.uncertified_classes = [c for c, t in enumerate(thresholds) if math.isinf(t)]
        if self.uncertified_classes:
            counts = torch.bincount(labels, minlength=n_classes)
            need = min_calibration_images(self.coverage)
            which = ("every class" if not self.class_conditional else
                     "classes " + ", ".join(f"{c} ({int(counts[c])} images)" for c in self.uncertified_classes[:5]))
            warnings.warn(f"conformal calibration: too few calibration images to certify coverage {self.coverage} for "
                          f"{which}; at least {need} per {'class' if self.class_conditional else 'set'} are needed. "
                          "Their sets will contain every class.", stacklevel=2)
        return self

    def _sets(self, probs, thresholds, k_reg, lam, salt) -> torch.Tensor:
        scores = label_scores(probs, self.score, self._u(probs.shape[0], salt), k_reg, lam)
        sets = scores <= thresholds[None, :]
        if not self.allow_zero_sets:
            empty = ~sets.any(1)
            sets[empty, probs[empty].argmax(1)] = True
        return sets

    def predict_sets(self, probs: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N, C]``: entry (i, c) is True when class c is in image i's prediction set."""
        if self.thresholds is None:
            raise RuntimeError("call fit(calibration_probs, calibration_labels) before predict_sets.")
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.ndim != 2 or probs.shape[1] != self.thresholds.numel():
            raise ConfigError(f"expected probabilities with {self.thresholds.numel()} classes, got {tuple(probs.shape)}.")
        return self._sets(probs, self.thresholds, self.fitted_k_reg, self.fitted_lam, salt=2)


def set_metrics(sets: torch.Tensor, labels: torch.Tensor, coverage: float | None = None) -> dict[str, float]:
    """Empirical coverage (true class inside the set) and mean set size.

    With the target ``coverage``, also ``class_coverage_gap``: the mean over the classes present
    in ``labels`` of |coverage within the class − target| (Ding et al., NeurIPS 2023), and
    ``worst_class_coverage``. Marginal sets can cover 90% overall while missing a rare class far
    more often; the gap says how uneven it is.
    """
    labels = torch.as_tensor(labels).long()
    covered = sets[torch.arange(len(labels)), labels].double()
    out = {"coverage": float(covered.mean()), "mean_set_size": float(sets.sum(1).double().mean())}
    if coverage is not None:
        per_class = torch.stack([covered[labels == c].mean() for c in labels.unique()])
        out["class_coverage_gap"] = float((per_class - coverage).abs().mean())
        out["worst_class_coverage"] = float(per_class.min())
    return out


def split_calibration(labels, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices ``(selection, calibration)``: ``fraction`` of each class's labelled images held out for calibration.

    Class-stratified (as Conf-OT's ``standard_split``): a class with v images gives
    ``fraction·v`` (half rounds up) of them, at least 1 and at most v − 1, to calibration, so every class keeps
    an image to select on. The cost is selection data: hyper-parameters (β/α, C, epochs, WiSE-FT α)
    are then chosen on the remaining ``1 − fraction`` only. Raises a ConfigError naming the class
    when a class has fewer than 2 images.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"calibration_fraction must be a number strictly between 0 and 1 (e.g. 0.5), "
                          f"got {fraction!r}.")
    labels = [int(v) for v in labels]
    gen = torch.Generator().manual_seed(int(seed))
    selection, calibration = [], []
    for c in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == c]
        if len(idx) < 2:
            raise ConfigError(f"calibration_fraction={fraction}: class {c} has {len(idx)} K-shot validation image(s); "
                              "holding calibration images out of selection needs at least 2 per class (one to select "
                              "on, one to calibrate on). Sample more validation images (val_shots) or leave "
                              "calibration_fraction=None (the sets are then reported as not certified).")
        perm = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        n_cal = min(max(int(fraction * len(idx) + 0.5), 1), len(idx) - 1)   # half rounds up
        calibration += perm[:n_cal]
        selection += perm[n_cal:]
    return sorted(selection), sorted(calibration)
