"""Which method (and backbone) should I use on *my* data? A leak-free recommendation with intervals.

``recommend(dataset, backbones, methods, shots, seeds, budget)`` answers from the labelled
few-shot data alone, in two phases that never mix:

1. **Selection (support + validation only).** For every seed, the K-shot split's labelled pool
   (its support and K-shot validation images) is re-split ``resplits`` times, per class, into a
   *fit* part and a *held-out* part (repeated stratified cross-validation with
   ``round(1 / holdout)`` folds, see :func:`resplit`; the fit part is split
   again into support and validation in the protocol's K : min(K, 4) ratio, so methods that
   choose their hyper-parameters on validation still can). Every candidate (backbone, method)
   is fitted on each fit part and scored on the held-out images with the dataset's primary
   metric. By default (``rule="mean"``) the candidate with the best mean over seeds × re-splits
   is chosen; ``rule="pooled"`` computes the metric once on each cross-validation's pooled
   held-out predictions, ``rule="p_best"`` takes the candidate most often best under the
   paired bootstrap below (:func:`selection_scores`). Exact ties go to the higher mean, then
   the cheaper registry cost, then the order given. The test split is not read, not
   encoded and not sampled from in this phase: the tasks are :class:`~workbench.task.FewShotTask`
   views of the labelled pool, which refuse any other image.
2. **What the choice was worth (test, once).** Only after the choice is fixed, every candidate
   is refitted on the full K-shot split (``run_experiment``) and the test split scored once per
   (candidate, K, seed); the chosen one's saved model is written for ``workbench.load``.

Uncertainty is a two-level bootstrap over the held-out images and the (seed, re-split) groups:
each replicate draws groups with replacement and, within each group, its images with
replacement, recomputes the metric per group and averages over the drawn groups. Every
candidate is scored on the *same* draws, so ``P(A beats B)`` is a paired bootstrap (ties count
one half). The draw order is fixed and documented in :func:`bootstrap_draws` so that a test can
recompute it independently.

Budget: ``"seconds"``, ``"minutes"`` or ``"hours"`` of expected fit time per run on this device,
estimated from the registry's cost column (:data:`workbench.methods.registry.METHODS`):
feature methods cost seconds anywhere; prompt and weight methods cost minutes on a GPU and are
counted as hours on a CPU or MPS device (the step figures in the README: a ViT-B/16 CLIP-LoRA
step takes ~23 s on the 2-core CPU). The measured fit seconds of every candidate are reported
next to the estimate, and a warning says when a measurement exceeds the budget.
"""
from __future__ import annotations

import hashlib
import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError, did_you_mean

BUDGETS = ("seconds", "minutes", "hours")
#: the budget's limit on one run's fit time, for the after-the-fact check of measured times
BUDGET_SECONDS = {"seconds": 60.0, "minutes": 3600.0, "hours": math.inf}
#: metrics the bootstrap computes from predicted labels (AUROC would need every replicate's scores)
BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
#: P(chosen beats this candidate) at or above which the ranking marks it significantly worse
SIGNIFICANT = 0.95


# -- budget: expected cost per run on this device ---------------------------------------------

def cost_tier(method: str, device_type: str) -> str:
    """``"seconds"``, ``"minutes"`` or ``"hours"``: expected fit time of one run of ``method`` on a
    device of type ``device_type`` (``cpu``, ``cuda``, ``mps``), from the registry's cost column.

    The registry says ``seconds`` (feature methods) or ``minutes (GPU)`` (prompt and weight
    methods, which run the encoders every step); without CUDA those are counted as hours.
    A user's own method (cost ``?``) is counted as minutes.
    """
    from .methods.registry import _ENTRIES, method_class

    method_class(method)  # unknown name -> ConfigError with did-you-mean
    cost = _ENTRIES[method].cost
    if cost.startswith("seconds"):
        return "seconds"
    if cost.startswith("minutes"):
        return "minutes" if ("GPU" not in cost or device_type == "cuda") else "hours"
    if cost.startswith("hours"):
        return "hours"
    return "minutes"


def check_budget(budget) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"budget must be one of {BUDGETS} (expected fit time per run on this device), got "
                          f"{budget!r}." + did_you_mean(str(budget), BUDGETS))
    return budget


def candidate_methods(methods: Sequence[str] | None, budget: str, device_type: str) -> tuple[list[str], dict]:
    """The methods that fit ``budget`` (default: every registered method) and ``{excluded: reason}``.

    Raises :class:`ConfigError` naming the budget and the cheapest candidate's estimate when
    none fits.
    """
    from .methods.registry import METHODS

    check_budget(budget)
    names = [e.name for e in METHODS] if methods is None else list(methods)
    if not names:
        raise ConfigError("methods is empty; pass None for every method that fits the budget, or name some.")
    tiers = {m: cost_tier(m, device_type) for m in names}
    limit = BUDGETS.index(budget)
    kept = [m for m in names if BUDGETS.index(tiers[m]) <= limit]
    excluded = {m: f"expected {tiers[m]} per run on {device_type}, over the budget {budget!r}"
                for m in names if m not in kept}
    if not kept:
        cheapest = min(names, key=lambda m: BUDGETS.index(tiers[m]))
        raise ConfigError(f"budget {budget!r}: no candidate fits — the cheapest, {cheapest!r}, is expected to take "
                          f"{tiers[cheapest]} per run on this device ({device_type}; from the registry's cost "
                          f"column). Raise the budget to {tiers[cheapest]!r} or add a cheaper method "
                          "(feature methods such as 'gda' or 'linear_probe' take seconds).")
    return kept, excluded


def parse_backbones(names: Sequence[str]) -> list:
    """``["workbench-tiny", "ViT-B-16-quickgelu@openai"]`` -> ``["workbench-tiny", ("ViT-B-16-quickgelu", "openai")]``
    (the command line's and the notebook's way of naming a backbone with its pretrained tag)."""
    out = []
    for name in ([names] if isinstance(names, str) else list(names)):
        if not isinstance(name, str) or not name.strip() or name.strip().endswith("@"):
            raise ConfigError(f"backbone {name!r}: expected 'NAME' or 'NAME@PRETRAINED', e.g. "
                              "'ViT-B-16-quickgelu@openai'.")
        out.append(tuple(name.strip().split("@", 1)) if "@" in name else name.strip())
    return out


# -- bootstrap ----------------------------------------------------------------------------------

def bootstrap_draws(sizes: Sequence[int], n_boot: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The random draws of the two-level bootstrap, in a fixed order.

    With ``rng = np.random.default_rng(seed)``: first ``counts`` — for each replicate, how often
    each of the G groups is drawn (``rng.integers(0, G, (n_boot, G))``, counted per group) —
    then, group by group, the image indices ``rng.integers(0, n_g, (n_boot, n_g))``.
    """
    rng = np.random.default_rng(seed)
    n_groups = len(sizes)
    picks = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.stack([(picks == g).sum(1) for g in range(n_groups)], axis=1)
    images = [rng.integers(0, n, size=(n_boot, n)) for n in sizes]
    return counts, images


def metric_from_labels(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, metric: str) -> np.ndarray:
    """``metric`` of predictions ``y_pred [..., n]`` against ``y_true [..., n]`` (leading axes broadcast).

    Same definitions as :mod:`workbench.metrics`: balanced accuracy is the mean recall over the
    classes present in ``y_true``; macro-F1 averages F1 over the classes present in the truth or
    the predictions.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if metric == "accuracy":
        return (y_true == y_pred).mean(-1)
    truth = y_true[..., None] == np.arange(n_classes)            # [..., n, C]
    pred = y_pred[..., None] == np.arange(n_classes)
    tp = (truth & pred).sum(-2).astype(float)                     # [..., C]
    support = truth.sum(-2)
    predicted = pred.sum(-2)
    if metric == "balanced_accuracy":
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        return np.nanmean(recall, axis=-1)
    if metric == "macro_f1":
        denom = 2 * tp + (predicted - tp) + (support - tp)
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        present = (support + predicted) > 0
        return (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1)
    raise ConfigError(f"metric {metric!r} cannot be bootstrapped from predicted labels; use one of "
                      f"{BOOTSTRAP_METRICS}.")


def bootstrap(groups: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int, metric: str, n_boot: int = 2000,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Point estimates ``[M]`` and bootstrap replicates ``[n_boot, M]`` of M candidates.

    ``groups``: per (seed, re-split) group, ``(y_true [n_g], y_pred [M, n_g])`` — the same
    held-out images for every candidate, which makes the replicates paired. The point estimate
    is the mean over groups of each group's metric; a replicate averages the groups' metrics on
    resampled images, weighted by how often each group was drawn (:func:`bootstrap_draws`).
    """
    if not groups:
        raise DataError("nothing to bootstrap: no held-out images.")
    point = np.mean([metric_from_labels(y, p, n_classes, metric) for y, p in groups], axis=0)
    counts, images = bootstrap_draws([len(y) for y, _ in groups], n_boot, seed)
    total = np.zeros((n_boot, groups[0][1].shape[0]))
    for g, ((y, p), idx) in enumerate(zip(groups, images)):
        scores = metric_from_labels(y[idx][None], p[:, idx], n_classes, metric)   # [M, n_boot]
        scores = np.nan_to_num(scores, nan=0.0)  # only when a group drew no image of any class: weight 0 below
        total += counts[:, g:g + 1] * scores.T
    return point, total / len(groups)


def interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column."""
    tail = (1 - confidence) / 2 * 100
    return np.percentile(replicates, tail, axis=0), np.percentile(replicates, 100 - tail, axis=0)


def p_beats(replicates: np.ndarray, a: int, b: int) -> float:
    """Paired bootstrap probability that candidate ``a`` scores above ``b`` (ties count one half)."""
    return float((replicates[:, a] > replicates[:, b]).mean() + 0.5 * (replicates[:, a] == replicates[:, b]).mean())


# -- the selection rule ---------------------------------------------------------------------------

def pooled_scores(groups: Sequence[tuple[np.ndarray, np.ndarray]], keys: Sequence, n_classes: int,
                  metric: str) -> np.ndarray:
    """``[M]``: the metric of each candidate on the *pooled* predictions of each cross-validation, averaged.

    Groups with the same key (one seed's one repetition of the F folds) are concatenated, so the
    metric is computed once over every labelled image that repetition held out, then averaged
    over the keys. For accuracy this equals the per-fold mean up to fold-size weights; for
    balanced accuracy and macro-F1 on folds of a few images per class it avoids averaging
    many tiny, noisy per-fold ratios (Forman & Scholz, "Apples-to-apples in cross-validation
    studies", SIGKDD Explorations 12(1), 2010, recommend pooling for such metrics).
    """
    if len(groups) != len(keys):
        raise DataError(f"{len(groups)} held-out groups but {len(keys)} keys; cannot pool.")
    by_key: dict = {}
    for (y, p), key in zip(groups, keys):
        by_key.setdefault(key, []).append((y, p))
    scores = [metric_from_labels(np.concatenate([y for y, _ in parts]),
                                 np.concatenate([p for _, p in parts], axis=-1), n_classes, metric)
              for parts in by_key.values()]
    return np.mean(scores, axis=0)


def p_best(replicates: np.ndarray) -> np.ndarray:
    """``[M]``: paired-bootstrap probability that each candidate is the best.

    Per replicate, the candidates that reach the replicate's maximum share one unit equally
    (ties split, so the values sum to 1); the result is the average over replicates.
    """
    top = replicates == replicates.max(axis=1, keepdims=True)          # [n_boot, M]
    return (top / top.sum(axis=1, keepdims=True)).mean(axis=0)


def _rule_mean(point, replicates, groups, keys, n_classes, metric) -> np.ndarray:
    """The mean over (seed, re-split) groups of each group's metric (the point estimate)."""
    return np.asarray(point, dtype=float)


def _rule_pooled(point, replicates, groups, keys, n_classes, metric) -> np.ndarray:
    """:func:`pooled_scores`: the metric on each cross-validation's pooled predictions."""
    return pooled_scores(groups, keys, n_classes, metric)


def _rule_p_best(point, replicates, groups, keys, n_classes, metric) -> np.ndarray:
    """:func:`p_best`: the probability of being the best under the paired two-level bootstrap."""
    return p_best(replicates)


#: how the held-out evidence is turned into a choice: rule name -> function of (point [M], replicates
#: [n_boot, M], groups, keys, n_classes, metric) returning the ``[M]`` scores it maximises. A new rule
#: is one function added here.
SELECTION_RULES = {"mean": _rule_mean, "pooled": _rule_pooled, "p_best": _rule_p_best}
RULES = tuple(SELECTION_RULES)


def selection_scores(rule: str, point: np.ndarray, replicates: np.ndarray, groups, keys, n_classes: int,
                     metric: str) -> np.ndarray:
    """``[M]``: the score the ``rule`` maximises. All use the held-out images of the labelled pool only.

    * ``"mean"``: the mean over (seed, re-split) groups of each group's metric (the point estimate).
    * ``"pooled"``: :func:`pooled_scores` — the metric on each cross-validation's pooled predictions.
    * ``"p_best"``: :func:`p_best` — the probability of being the best under the paired
      two-level bootstrap, which favours a candidate that wins consistently over one whose
      mean is lifted by a few lucky groups or images.
    """
    if rule not in SELECTION_RULES:
        raise ConfigError(f"rule must be one of {RULES}, got {rule!r}." + did_you_mean(str(rule), RULES))
    return SELECTION_RULES[rule](point, replicates, groups, keys, n_classes, metric)


def choose(scores: np.ndarray, estimates: np.ndarray, tiers: Sequence[int], order: Sequence[int]) -> int:
    """Index of the chosen candidate: the highest ``scores``; ties go to the higher point estimate,
    then the cheaper cost tier, then the order given."""
    return min(range(len(scores)), key=lambda i: (-scores[i], -estimates[i], tiers[i], order[i]))


# -- nested re-splits of the labelled pool -------------------------------------------------------

def folds_for(holdout: float) -> int:
    """Folds of the re-splits: ``round(1 / holdout)``, at least 2 (holdout 1/3 -> 3-fold)."""
    return max(2, round(1 / holdout))


def resplit(dataset, split, resplit_index: int, holdout: float):
    """One re-split of a K-shot split's labelled pool: ``(inner FewShotSplit, held-out samples)``.

    Repeated stratified cross-validation over support ∪ validation: with F = :func:`folds_for`
    (holdout), re-split r holds out fold ``r mod F`` of repetition ``r // F``, where each class's
    images are shuffled once per repetition (by a string seed: reproducible across runs and
    platforms) and cut into F nearly equal folds — so F consecutive re-splits hold out every
    labelled image exactly once. A class with one image is never held out. The rest is split
    into support and validation in the outer protocol's ratio K : val_shots (support at least one).
    """
    from .data.sampling import FewShotSplit

    folds = folds_for(holdout)
    repetition, fold = divmod(resplit_index, folds)
    pool = split.train(dataset) + split.val(dataset)
    ratio = split.val_shots / (split.shots + split.val_shots) if (split.shots + split.val_shots) else 0.0
    train_ids, val_ids, held, per_class = [], [], [], []
    for label, cid in enumerate(dataset.class_ids):
        own = sorted((s for s in pool if s.label == label), key=lambda s: s.id)
        random.Random(f"recommend/{split.seed}/{split.shots}/{repetition}/{cid}").shuffle(own)
        n = len(own)
        cut = np.array_split(np.arange(n), folds)[fold] if n >= 2 else np.arange(0)
        out_ = [own[i] for i in cut]
        rest = [s for i, s in enumerate(own) if i not in set(cut.tolist())]
        n_val = min(len(rest) - 1, math.floor(len(rest) * ratio)) if rest else 0
        held += out_
        val_ids += [s.id for s in rest[:n_val]]
        train_ids += [s.id for s in rest[n_val:]]
        per_class.append(len(rest) - n_val)
    inner = FewShotSplit(dataset=split.dataset, fingerprint=split.fingerprint, shots=max(per_class), seed=split.seed,
                         val_shots=split.val_shots, train_ids=train_ids, val_ids=val_ids,
                         val_source=f"recommend re-split {resplit_index} of the K-shot pool")
    return inner, held


class PooledCache:
    """A feature cache for one K-shot split that encodes its labelled pool once per request kind.

    Requests for a subset of the pool (support or validation of a re-split, or of the full
    split) are served as rows of the pool's features: each augmented view is seeded per
    (view, image), so a row of the pool's encoding equals the subset's own encoding. Anything
    else (the test split, in phase 2) goes to the real cache unchanged.
    """

    def __init__(self, cache, pool_view, pool_samples):
        self._cache, self._view, self._samples = cache, pool_view, list(pool_samples)
        self._ids = {s.id for s in self._samples}
        self._pools: dict = {}

    def __getattr__(self, name):   # batch_size, num_workers, show_progress, stats, ...
        if name.startswith("_"):      # not set yet (copy, pickle): no recursion through self._cache
            raise AttributeError(name)
        return getattr(self._cache, name)

    def get(self, dataset, samples, *, views: int = 0, aug_seed=0, aug_scale=(0.5, 1.0), flip: bool = True,
            desc: str | None = None):
        from .features import Features

        ids = [s if isinstance(s, str) else s.id for s in samples]
        same_data = dataset.name == self._view.name and dataset.fingerprint() == self._view.fingerprint()
        if not (same_data and ids and set(ids) <= self._ids):
            feats = self._cache.get(dataset, samples, views=views, aug_seed=aug_seed, aug_scale=aug_scale, flip=flip,
                                    desc=desc)
            check_finite_features(feats, f"{dataset.name!r}, {desc or 'requested images'}")
            return feats
        key = (views, aug_seed if views else None, tuple(aug_scale), flip)
        if key not in self._pools:
            pool = self._cache.get(self._view, self._samples, views=views, aug_seed=aug_seed, aug_scale=aug_scale,
                                   flip=flip, desc=f"labelled pool x{max(views, 1)}")
            check_finite_features(pool, f"the labelled pool of {self._view.name!r}" + (f", {views} augmented views"
                                                                                        if views else ""))
            self._pools[key] = pool
        pool = self._pools[key]
        row = {i: n for n, i in enumerate(pool.ids)}
        kept = [i for i in ids if i in row]   # an unreadable image was skipped in the pool too
        idx = [row[i] for i in kept]
        wanted = set(ids)
        return Features(raw=pool.raw[:, idx], labels=pool.labels[idx], ids=kept,
                        skipped=[s for s in pool.skipped if s["id"] in wanted],
                        key=pool.key + "/" + hashlib.sha1("\n".join(kept).encode()).hexdigest()[:12])


# -- the result ---------------------------------------------------------------------------------

@dataclass
class Recommendation:
    """What :func:`recommend` found. ``table``: one row per (backbone, method, K)."""

    dataset: str
    metric: str
    shots: int                     # the K the choice is made for (the largest asked)
    budget: str
    backbone: str                  # the chosen pair ...
    method: str
    params: dict                   # ... its configuration (after presets) and what fitting chose
    fit_choices: dict
    estimate: float                # held-out estimate of the metric (fraction) with its interval
    ci_low: float
    ci_high: float
    confidence: float
    table: pd.DataFrame
    pairwise: pd.DataFrame         # P(row beats column) at K = shots, paired bootstrap
    model_dir: Path | None
    summary: str
    excluded: dict = field(default_factory=dict)
    cost_source: str = "registry cost column (per device); measured fit seconds reported"
    design: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)   # candidate -> the error of its failed fit (left out of the choice)

    def __repr__(self) -> str:
        saved = f"; saved in {self.model_dir}" if self.model_dir else ""
        return (f"Recommendation({self.method} on {self.backbone} for {self.dataset}, K={self.shots}: held-out "
                f"{self.metric.replace('_', ' ')} {100 * self.estimate:.1f}% [{100 * self.ci_low:.1f}, "
                f"{100 * self.ci_high:.1f}] ({100 * self.confidence:.0f}% CI), {len(self.table[['backbone', 'method']].drop_duplicates())} "
                f"candidates{saved}; .summary, .ranking())")

    def ranking(self) -> pd.DataFrame:
        """Candidates at K = ``shots``, best held-out estimate first, with significance marks.

        ``vs chosen``: ``**`` the chosen candidate beats it with paired-bootstrap probability
        ≥ 0.99, ``*`` ≥ 0.95, ``n.s.`` below (statistically tied with the choice).
        """
        at_k = self.table[self.table["shots"] == self.shots].sort_values(["rank", "chosen"], ascending=[True, False])
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        errors = at_k["error"] if "error" in at_k else pd.Series("", index=at_k.index)
        failed = [bool(e) and np.isnan(v) for e, v in zip(errors, at_k["estimate"])]  # left out of the choice
        out = pd.DataFrame({
            "rank": at_k["rank"].astype(int), "backbone": at_k["backbone"], "method": at_k["method"],
            f"held-out {self.metric} (%)": [f"failed: {err}" if f else f"{pct(e)} [{pct(lo)}, {pct(hi)}]"
                                            for e, lo, hi, f, err in zip(at_k["estimate"], at_k["ci_low"],
                                                                         at_k["ci_high"], failed, errors)],
            "P(chosen beats)": at_k["p_chosen_beats"].round(3),
            "vs chosen": ["failed" if f else _mark(p, chosen)
                          for p, chosen, f in zip(at_k["p_chosen_beats"], at_k["chosen"], failed)],
            "fit s": at_k["fit_seconds"].round(2),
            f"test {self.metric} (%)": [f"{pct(t)} [{pct(lo)}, {pct(hi)}]" if not np.isnan(t) else "—"
                                        for t, lo, hi in zip(at_k["test"], at_k["test_ci_low"], at_k["test_ci_high"])],
        })
        return out.reset_index(drop=True)

    def plot(self, ax=None, which: str = "estimate"):
        """The metric vs K per candidate with its bootstrap interval: ``which="estimate"`` (held-out,
        what the choice used) or ``"test"`` (scored once after the choice)."""
        from .report import _pyplot, chance_level, metric_label

        if which not in ("estimate", "test"):
            raise ConfigError(f"which must be 'estimate' or 'test', got {which!r}.")
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(5.8, 3.8))
        lo_col, hi_col = ("ci_low", "ci_high") if which == "estimate" else ("test_ci_low", "test_ci_high")
        labels = list(dict.fromkeys(self.table["candidate"]))
        for i, label in enumerate(labels):
            g = self.table[self.table["candidate"] == label].sort_values("shots")
            y = 100 * g[which]
            err = [100 * g[which] - 100 * g[lo_col], 100 * g[hi_col] - 100 * g[which]]
            shift = 2 ** (0.05 * (i - (len(labels) - 1) / 2))   # the K axis is log2: shift error bars apart
            chosen = label == f"{self.method} · {self.backbone}"
            ax.errorbar(g["shots"] * shift, y, yerr=err, marker="o", capsize=3, label=label + (" (chosen)" if chosen
                                                                                                else ""),
                        linewidth=2.2 if chosen else 1.2)
        chance = chance_level(self.metric, self.design.get("n_classes"))
        if chance is not None:
            ax.axhline(100 * chance, linestyle=":", color="gray", label=f"chance ({100 * chance:.1f}%)")
        ax.set_xscale("log", base=2)
        ks = sorted(self.table["shots"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("shots per class (K)")
        what = "held-out estimate" if which == "estimate" else "test, scored once after the choice"
        ax.set_ylabel(metric_label(self.metric))
        ax.set_title(f"{self.dataset}: {what}\n{int(100 * self.confidence)}% bootstrap intervals over images × "
                     f"{self.design.get('groups_label', 'groups')}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def _mark(p: float, chosen: bool) -> str:
    if chosen:
        return "chosen"
    return "**" if p >= 0.99 else "*" if p >= SIGNIFICANT else "n.s."


# -- the recommendation, phase by phase ----------------------------------------------------------
#
# recommend() reads as the protocol: everything is checked and loaded first (_plan: the arguments,
# the candidates, the K-shot splits and their re-splits, the backbones), then every candidate is
# fitted on every re-split and predicts its held-out images (nested_selection), that evidence is
# weighed (weigh_evidence: bootstrap, the selection rules, the choice), the candidates are refitted
# and the test split scored once (refit_and_test, score_test), and the report is written (_report).
# A new selection rule is one function in SELECTION_RULES; a new kind of candidate is one change in
# candidate_pairs (and the fit in _fit_candidate).

def _as_list(value, name: str) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        return [value]
    out = list(value)
    if not out:
        raise ConfigError(f"{name} is empty; give at least one.")
    return out


def _label(backbone) -> str:
    return f"{backbone.name} ({backbone.pretrained})" if backbone.pretrained else backbone.name


class NonFiniteFeatures(DataError):
    """Image features with NaN or inf values: no candidate can be fitted or scored on them."""


def check_finite_features(feats, what: str, error: type = NonFiniteFeatures) -> None:
    """Raise ``error`` (default :class:`NonFiniteFeatures`) naming the images whose features are NaN or inf."""
    import torch

    bad = ~torch.isfinite(feats.raw.reshape(-1, *feats.raw.shape[-2:])).all(-1).all(0) if feats.raw.numel() else None
    if bad is None or not bool(bad.any()):
        return
    ids = [i for i, b in zip(feats.ids, bad.tolist()) if b]
    raise error(
        f"recommend: the features of {len(ids)} of {len(feats.ids)} image(s) ({what}) are not finite (NaN or inf), "
        f"e.g. {ids[:3]}; no candidate can be fitted or compared on them. Check those images (a NaN pixel in an "
        "array source?) and the backbone (weights that overflow at this precision: try precision='fp32').")


def _predict(method, backbone, cache, view, samples):
    """Predicted labels of ``method`` on ``samples`` of the labelled pool (its own features if it adapted
    the image encoder)."""
    import torch

    from .features import FeatureCache

    encoder = method.image_backbone(backbone)
    if encoder is backbone:
        feats = cache.get(view, samples, desc="held-out")
    else:
        feats = FeatureCache(encoder, None, batch_size=cache.batch_size, num_workers=cache.num_workers,
                             show_progress=False).get(view, samples, desc="held-out (adapted)")
        check_finite_features(feats, f"held-out images under {method.name!r}'s adapted image encoder",
                              DataError)  # this candidate's own encoder: it fails, the others go on
    with torch.no_grad():
        logits = method.predict_logits(feats.x if method.normalized_input else feats.raw.mean(0)).float()
    return logits.argmax(-1).cpu().numpy(), feats.labels.cpu().numpy()


@dataclass
class _Plan:
    """Everything :func:`recommend` checked and loaded before any image is encoded."""

    dataset: Any
    metric: str
    shots: list                    # the K's, ascending; the choice is made at the largest
    seeds: list
    budget: str
    rule: str
    resplits: int
    holdout: float
    n_boot: int
    confidence: float
    boot_seed: int
    device_type: str               # the slowest device among the backbones'
    methods: list                  # candidate method names (within the budget)
    excluded: dict                 # method -> why it is not a candidate
    backbones: list                # loaded Backbone objects
    labels: list                   # their display names
    caches: list                   # one FeatureCache per backbone
    pairs: list                    # the candidates: (backbone index, method name)
    settings: dict                 # method -> run settings (the dataset's presets applied)
    splits: dict                   # (K, seed) -> FewShotSplit
    designs: dict                  # (K, seed) -> [(re-split index, inner split, held-out samples)]
    method_params: dict
    templates: list | None
    split_dir: Any

    @property
    def target(self) -> int:
        return max(self.shots)

    def name(self, i: int) -> str:
        bi, m = self.pairs[i]
        return f"{m} · {self.labels[bi]}"


def _check_arguments(budget, rule, shots, seeds, resplits, holdout, n_boot, confidence) -> dict:
    """Every scalar argument checked (each error names the argument); returns them normalised."""
    from .validate import check_float, check_int, check_seed, check_shots

    check_budget(budget)
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES}, got {rule!r}." + did_you_mean(str(rule), RULES))
    return {
        "shots": sorted({check_shots(k, "recommend") for k in _as_list(shots, "shots")}),
        "seeds": list(dict.fromkeys(check_seed(s, "recommend") for s in _as_list(seeds, "seeds"))),
        "resplits": check_int(resplits, "resplits", minimum=1, where="recommend"),
        "holdout": check_float(holdout, "holdout", minimum=0.0, maximum=1.0, exclusive_min=True, exclusive_max=True,
                               where="recommend"),
        "n_boot": check_int(n_boot, "n_boot", minimum=100, where="recommend"),
        "confidence": check_float(confidence, "confidence", minimum=0.5, maximum=1.0, exclusive_max=True,
                                  where="recommend"),
    }


def candidate_pairs(n_backbones: int, methods: Sequence[str]) -> list[tuple[int, str]]:
    """The candidates: every (backbone index, method), backbone-major (the order ties fall back to)."""
    return [(bi, m) for bi in range(n_backbones) for m in methods]


def _draw_splits(dataset, shots, seeds, resplits: int, holdout: float, split_dir) -> tuple[dict, dict]:
    """The K-shot splits per (K, seed) and their re-splits (:func:`resplit`); a fold that holds out
    nothing is left out, and a (K, seed) with no held-out image at all is a ConfigError."""
    from .data.sampling import sample_few_shot

    splits = {(k, s): sample_few_shot(dataset, k, s, split_dir=split_dir) for k in shots for s in seeds}
    # a fold can hold out nothing when every class has fewer images than folds: it is left out
    designs = {key: [(r, *part) for r in range(resplits) for part in [resplit(dataset, sp, r, holdout)] if part[1]]
               for key, sp in splits.items()}
    for (k, s), parts in designs.items():
        if not parts:
            raise ConfigError(f"K={k}, seed {s}: no class of {dataset.name!r} has two labelled images (support + "
                              "validation) to hold one out, so the choice cannot be made without the test split. "
                              "Use a larger K, or a split with validation images.")
    return splits, designs


def _plan(dataset, backbones, methods, shots, seeds, budget, metric, *, method_params, resplits, holdout, n_boot,
          confidence, boot_seed, split_dir, cache_dir, templates, device, rule) -> _Plan:
    """Check every argument, list the candidates, draw the splits and load the backbones — in the order
    that refuses bad input before any image is encoded."""
    from .backbones import Backbone, load_backbone, resolve_device
    from .data.dataset import Dataset
    from .domains import load_dataset, run_settings
    from .features import FeatureCache
    from .methods import get_method

    args = _check_arguments(budget, rule, shots, seeds, resplits, holdout, n_boot, confidence)
    backbone_list = _as_list(backbones, "backbones")
    device_types = {b.device.type if isinstance(b, Backbone) else resolve_device(device).type for b in backbone_list}
    # the slowest device decides: GPU minutes are CPU hours
    device_type = "cuda" if device_types == {"cuda"} else sorted(device_types - {"cuda"})[0]
    candidates, excluded = candidate_methods(methods, budget, device_type)
    unknown = sorted(set(method_params or {}) - set(candidates) - set(excluded))
    if unknown:
        raise ConfigError(f"method_params names {unknown}, which are not among the methods {candidates}.")
    for m in candidates:   # types and bounds of every method's parameters
        get_method(m, **((method_params or {}).get(m) or {}))
    if not isinstance(dataset, Dataset):
        dataset = load_dataset(dataset)
    metric = metric or getattr(dataset, "metric", None) or "accuracy"
    if metric not in BOOTSTRAP_METRICS:
        raise ConfigError(f"metric {metric!r}: recommend bootstraps {BOOTSTRAP_METRICS} (computed from predicted "
                          "labels); pass metric= one of them.")
    if not (dataset.has_split("test") and len(dataset.split("test")) > 0):
        raise DataError(f"dataset {dataset.name!r} has no test split; recommend refits every candidate and saves the "
                        "chosen model through run_experiment, which scores one. Give the dataset a test split "
                        "(e.g. test_fraction=0.3 in its source).")
    splits, designs = _draw_splits(dataset, args["shots"], args["seeds"], args["resplits"], args["holdout"], split_dir)
    if len(candidates) * len(backbone_list) < 2:
        warnings.warn("recommend: a single candidate (backbone × method) — nothing to choose between; its estimate "
                      "and interval are still reported.", stacklevel=3)

    loaded = [b if isinstance(b, Backbone) else
              load_backbone(*(b if isinstance(b, (tuple, list)) else (b,)), device=device) for b in backbone_list]
    labels = [_label(b) for b in loaded]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"backbones repeat: {labels}; give each backbone once.")
    caches = [FeatureCache(b, None if cache_dir is None else Path(cache_dir) / f"backbone{i}", show_progress=False)
              for i, b in enumerate(loaded)]
    return _Plan(dataset=dataset, metric=metric, budget=budget, rule=rule, boot_seed=boot_seed,
                 device_type=device_type, methods=candidates, excluded=excluded, backbones=loaded, labels=labels,
                 caches=caches, pairs=candidate_pairs(len(loaded), candidates),
                 settings={m: run_settings(dataset, m, (method_params or {}).get(m)) for m in candidates},
                 splits=splits, designs=designs, method_params=dict(method_params or {}), templates=templates,
                 split_dir=split_dir, **args)


# -- phase 1: nested selection on the labelled pool only ------------------------------------------

@dataclass
class _Nested:
    """What the nested re-splits produced: per K, each (seed, re-split) group's held-out truth and every
    candidate's predictions, and the candidates that failed (left out of the choice)."""

    pooled: dict                   # (backbone index, K, seed) -> PooledCache of that split's labelled pool
    groups: dict                   # K -> [(y_true [n], {candidate index: y_pred [n]})]
    keys: dict                     # K -> [(seed, repetition)]: which groups pool (rule "pooled")
    fit_seconds: dict              # (K, (backbone index, method)) -> [seconds per fit]
    failed: dict                   # candidate index -> "Error: message" of its first failed fit
    notes: list                    # warnings raised while fitting, once each
    seconds: float


def _fit_candidate(plan: _Plan, i: int, k: int, seed: int, inner, held, cache, view) -> tuple:
    """Fit candidate ``i`` on a re-split's inner split; returns (held-out predictions, truth, fit seconds)."""
    import torch

    from .methods import get_method
    from .task import FewShotTask

    bi, m = plan.pairs[i]
    dataset = plan.dataset
    tmpl = list(plan.templates or plan.settings[m].templates or dataset.templates or ["a photo of a {}."])
    task = FewShotTask(dataset, inner, plan.backbones[bi], cache, templates=tmpl)
    method = get_method(m, **(plan.settings[m].params or {}))
    torch.manual_seed(seed)   # as run_experiment does: the same seed for every candidate
    t0 = time.perf_counter()
    method.fit(task)
    seconds = time.perf_counter() - t0
    pred, y = _predict(method, plan.backbones[bi], cache, view, held)
    return pred, y, seconds


def nested_selection(plan: _Plan) -> _Nested:
    """Fit every candidate on every re-split's inner split and predict its held-out images.

    Reads the support and validation images of each K-shot split only (a :class:`FitView`). A
    candidate whose fit (or prediction) raises is named in a warning, left out of the remaining
    fits and of the choice, and reported as failed; features that are not finite stop everything
    (:class:`NonFiniteFeatures`: no candidate could be compared on them).
    """
    from .progress import progress
    from .task import FitView

    started = time.perf_counter()
    out = _Nested(pooled={}, groups={k: [] for k in plan.shots}, keys={k: [] for k in plan.shots},
                  fit_seconds={(k, p): [] for k in plan.shots for p in plan.pairs}, failed={}, notes=[], seconds=0.0)
    bar = progress(total=sum(map(len, plan.designs.values())) * len(plan.pairs), desc="nested selection",
                   unit="fit", leave=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for (k, s), parts in plan.designs.items():
            split = plan.splits[(k, s)]
            view = FitView(plan.dataset, split)     # knows support + validation ids only
            pool = split.train(plan.dataset) + split.val(plan.dataset)
            for bi in range(len(plan.backbones)):
                out.pooled[(bi, k, s)] = PooledCache(plan.caches[bi], view, pool)
            for r, inner, held in parts:
                preds, truth = {}, None
                for i, (bi, m) in enumerate(plan.pairs):
                    bar.update(1)
                    if i in out.failed:
                        continue
                    try:
                        pred, y, seconds = _fit_candidate(plan, i, k, s, inner, held, out.pooled[(bi, k, s)], view)
                    except NonFiniteFeatures:
                        raise
                    except Exception as err:  # this candidate is out; the others go on
                        out.failed[i] = f"{type(err).__name__}: {err} (K={k}, seed {s}, re-split {r})"
                        continue
                    out.fit_seconds[(k, (bi, m))].append(seconds)
                    if truth is not None and not np.array_equal(truth, y):
                        raise DataError("held-out images differ between candidates (an unreadable image?); "
                                        "cannot pair the comparison.")
                    truth = y
                    preds[i] = pred
                if truth is not None:
                    out.groups[k].append((truth, preds))
                    out.keys[k].append((s, r // folds_for(plan.holdout)))
    bar.close()
    for w in caught:
        text = str(w.message)
        if text not in out.notes:
            out.notes.append(text)
            warnings.warn(f"(during nested selection) {text}", w.category, stacklevel=3)
    for i, error in out.failed.items():
        warnings.warn(f"recommend: candidate {plan.name(i)!r} failed during nested selection — {error}; it is left "
                      "out of the choice and reported as failed in the ranking.", stacklevel=3)
    if len(out.failed) == len(plan.pairs):
        raise DataError("recommend: every candidate failed during nested selection, so there is nothing to choose:\n  "
                        + "\n  ".join(f"{plan.name(i)}: {e}" for i, e in out.failed.items()))
    out.seconds = time.perf_counter() - started
    return out


# -- the evidence: bootstrap, selection rules, the choice ------------------------------------------

@dataclass
class _Evidence:
    table: pd.DataFrame            # one row per (candidate, K); ``_i`` the candidate index
    alive: list                    # the candidate indices that were scored (not failed), in order
    boots: dict                    # K -> (point [A], replicates [n_boot, A]) over ``alive``
    choice_by_rule: dict           # rule -> chosen candidate's name
    best: int                      # the chosen candidate's index
    pairwise: pd.DataFrame


def _held_out_groups(nested: _Nested, k: int, alive: list) -> list:
    """K's groups as ``(y_true, y_pred [A, n])`` over the candidates that were scored."""
    return [(y, np.stack([preds[i] for i in alive])) for y, preds in nested.groups[k]]


def weigh_evidence(plan: _Plan, nested: _Nested) -> _Evidence:
    """The bootstrap per K, every rule's selection scores, the choice at the largest K, each
    candidate's rank and P(chosen beats it); failed candidates are listed last, unscored."""
    alive = [i for i in range(len(plan.pairs)) if i not in nested.failed]
    names = [plan.name(i) for i in range(len(plan.pairs))]
    rows, boots, by_rule = [], {}, {}
    for k in plan.shots:
        groups = _held_out_groups(nested, k, alive)
        point, reps = bootstrap(groups, plan.dataset.n_classes, plan.metric, plan.n_boot, plan.boot_seed)
        boots[k] = (point, reps)
        by_rule[k] = {r_: selection_scores(r_, point, reps, groups, nested.keys[k], plan.dataset.n_classes,
                                           plan.metric) for r_ in RULES}
        low, high = interval(reps, plan.confidence)
        for i, (bi, m) in enumerate(plan.pairs):
            j = alive.index(i) if i in alive else None
            seconds = nested.fit_seconds[(k, (bi, m))]
            rows.append({"backbone": plan.labels[bi], "method": m, "candidate": names[i], "shots": k,
                         "estimate": point[j] if j is not None else np.nan,
                         "ci_low": low[j] if j is not None else np.nan,
                         "ci_high": high[j] if j is not None else np.nan,
                         "selection_score": by_rule[k][plan.rule][j] if j is not None else np.nan,
                         "nested_fit_seconds": float(np.mean(seconds)) if seconds else np.nan,
                         "cost_tier": cost_tier(m, plan.device_type), "error": nested.failed.get(i, ""), "_i": i})
    table = pd.DataFrame(rows)
    target = plan.target
    tiers = [BUDGETS.index(cost_tier(plan.pairs[i][1], plan.device_type)) for i in alive]
    choice_by_rule = {r_: names[alive[choose(by_rule[target][r_], boots[target][0], tiers, alive)]] for r_ in RULES}
    best = names.index(choice_by_rule[plan.rule])
    best_j = alive.index(best)
    scored = table["error"] == ""
    for k in plan.shots:   # per K: the rank and P(chosen pair beats each) on that K's replicates
        reps = boots[k][1]
        sel = (table["shots"] == k) & scored
        table.loc[sel, "rank"] = table.loc[sel, "estimate"].rank(ascending=False, method="min").astype(int)
        table.loc[sel, "p_chosen_beats"] = [p_beats(reps, best_j, alive.index(i)) if i != best else np.nan
                                            for i in table.loc[sel, "_i"]]
    table.loc[~scored, "rank"] = len(alive) + 1   # failed: after every scored candidate
    table.loc[~scored, "p_chosen_beats"] = np.nan
    table["chosen"] = (table["_i"] == best)
    reps = boots[target][1]
    alive_names = [names[i] for i in alive]
    pairwise = pd.DataFrame([[p_beats(reps, a, b) if a != b else np.nan for b in range(len(alive))]
                             for a in range(len(alive))], index=alive_names, columns=alive_names)
    for m in plan.methods:   # the registry's estimate checked against what was measured here
        seconds = table.loc[table["method"] == m, "nested_fit_seconds"].max()
        if seconds > BUDGET_SECONDS[plan.budget]:
            warnings.warn(f"recommend: {m!r} took {seconds:.0f} s per fit here, more than the budget {plan.budget!r} "
                          "allows (the registry's estimate was lower on this machine).", stacklevel=3)
    return _Evidence(table=table, alive=alive, boots=boots, choice_by_rule=choice_by_rule, best=best,
                     pairwise=pairwise)


# -- phase 2: refit on the full K-shot split, score the test split once ------------------------------

@dataclass
class _Final:
    predictions: dict              # (K, seed, candidate) -> (y_true, y_pred) on the test split
    fit_seconds: dict              # (K, candidate) -> [seconds]
    failed: dict                   # (K, candidate) -> "Error: message" of a refit that raised
    model_dir: Path | None
    chosen_run: Any                # the chosen candidate's ExperimentResult (its saved model)
    seconds: float


def refit_and_test(plan: _Plan, nested: _Nested, evidence: _Evidence, out: Path, score_test: bool) -> _Final:
    """Only after the choice: refit the scored candidates on the full K-shot splits (``run_experiment``)
    and predict the test split once each; the chosen one's model is saved. ``score_test=False``: the
    chosen one at the largest K and first seed only. A non-chosen candidate whose refit raises is
    named in a warning and left unscored; the chosen one's error is raised."""
    from .experiment import run_experiment
    from .progress import progress

    started = time.perf_counter()
    best = plan.pairs[evidence.best]
    alive = [plan.pairs[i] for i in evidence.alive]
    final = _Final(predictions={}, fit_seconds={}, failed={}, model_dir=None, chosen_run=None, seconds=0.0)
    todo = [(k, s, p) for k in plan.shots for s in plan.seeds for p in alive
            if score_test or (k == plan.target and s == plan.seeds[0] and p == best)]
    bar = progress(total=len(todo), desc="refit + test (once)", unit="run", leave=True)
    for k, s, (bi, m) in todo:
        save = k == plan.target and s == plan.seeds[0] and (bi, m) == best
        try:
            res = run_experiment(plan.dataset, plan.backbones[bi], m, k, s, cache=nested.pooled[(bi, k, s)],
                                 templates=plan.templates, method_params=plan.method_params.get(m),
                                 split_dir=plan.split_dir, out_dir=out, save_model=save)
        except Exception as err:
            if (bi, m) == best:
                raise
            final.failed.setdefault((k, (bi, m)), f"{type(err).__name__}: {err} (refit, seed {s})")
            warnings.warn(f"recommend: candidate {m} · {plan.labels[bi]} failed when refitted at K={k}, seed {s} "
                          f"({type(err).__name__}: {err}); its test score is left out.", stacklevel=3)
            bar.update(1)
            continue
        final.fit_seconds.setdefault((k, (bi, m)), []).append(res.row["fit_seconds"])
        final.predictions[(k, s, (bi, m))] = (res.labels.cpu().numpy(), res.logits.argmax(-1).cpu().numpy())
        if save:
            final.model_dir, final.chosen_run = res.model_dir, res
        bar.update(1)
    bar.close()
    final.seconds = time.perf_counter() - started
    return final


def score_test_split(plan: _Plan, table: pd.DataFrame, final: _Final) -> None:
    """The test metric with its bootstrap interval per (candidate, K), over the seeds, in place; a
    candidate without a test prediction for every seed stays NaN."""
    for col in ("test", "test_ci_low", "test_ci_high"):
        table[col] = np.nan
    for k in plan.shots:
        have = [i for i, p in enumerate(plan.pairs) if all((k, s, p) in final.predictions for s in plan.seeds)]
        if not have:
            continue
        groups = [(final.predictions[(k, s, plan.pairs[have[0]])][0],
                   np.stack([final.predictions[(k, s, plan.pairs[i])][1] for i in have])) for s in plan.seeds]
        point, treps = bootstrap(groups, plan.dataset.n_classes, plan.metric, plan.n_boot, plan.boot_seed)
        low, high = interval(treps, plan.confidence)
        for j, i in enumerate(have):
            sel = (table["shots"] == k) & (table["_i"] == i)
            table.loc[sel, "test"] = point[j]
            table.loc[sel, "test_ci_low"] = low[j]
            table.loc[sel, "test_ci_high"] = high[j]
    for (k, (bi, m)), error in final.failed.items():
        sel = (table["shots"] == k) & (table["candidate"] == f"{m} · {plan.labels[bi]}")
        table.loc[sel, "error"] = error


# -- the report ---------------------------------------------------------------------------------------

def _report(plan: _Plan, nested: _Nested, evidence: _Evidence, final: _Final, out: Path) -> Recommendation:
    """The final table (sorted: per K, best rank first), the design record and the plain-language summary."""
    table = evidence.table
    table["fit_seconds"] = [float(np.mean(final.fit_seconds[(k, plan.pairs[i])]))
                            if (k, plan.pairs[i]) in final.fit_seconds else np.nan
                            for k, i in zip(table["shots"], table["_i"])]
    table = table.drop(columns=["_i"]).sort_values(["shots", "rank", "chosen", "candidate"],
                                                   ascending=[True, True, False, True]).reset_index(drop=True)
    table["rank"] = table["rank"].astype(int)
    target = plan.target
    best_bi, best_m = plan.pairs[evidence.best]
    record = final.chosen_run.record["method"]
    fit_choices = {k: v for k, v in record.get("fit_info", {}).items()
                   if isinstance(v, (int, float, str, bool)) or v is None}
    chosen_row = table[(table["shots"] == target) & table["chosen"]].iloc[0]
    n_pool = int(np.mean([len(sp.train_ids) + len(sp.val_ids) for (k, _), sp in plan.splits.items() if k == target]))
    design = {"rule": plan.rule, "choice_by_rule": evidence.choice_by_rule, "seeds": plan.seeds,
              "resplits": plan.resplits, "holdout": plan.holdout, "n_boot": plan.n_boot,
              "boot_seed": plan.boot_seed, "n_classes": plan.dataset.n_classes, "labelled_images": n_pool,
              "held_out_images": int(np.mean([len(y) for y, _ in nested.groups[target]])),
              "groups_label": f"{len(plan.seeds)} seed(s) × {plan.resplits} re-split(s) "
                              f"({folds_for(plan.holdout)}-fold)",
              "notes": nested.notes,
              "out_dir": str(out), "selection_seconds": nested.seconds, "refit_test_seconds": final.seconds}
    result = Recommendation(
        dataset=plan.dataset.name, metric=plan.metric, shots=target, budget=plan.budget,
        backbone=plan.labels[best_bi], method=best_m, params=dict(record.get("config", {})), fit_choices=fit_choices,
        estimate=float(chosen_row["estimate"]), ci_low=float(chosen_row["ci_low"]),
        ci_high=float(chosen_row["ci_high"]), confidence=plan.confidence, table=table, pairwise=evidence.pairwise,
        model_dir=final.model_dir, summary="", excluded=plan.excluded, design=design,
        failed={plan.name(i): e for i, e in nested.failed.items()})
    result.summary = summary_text(result)
    return result


def recommend(dataset, backbones, methods: Sequence[str] | None = None, shots: int | Sequence[int] = 4,
              seeds: Sequence[int] = (1, 2, 3), budget: str = "minutes", metric: str | None = None, *,
              method_params: dict | None = None, resplits: int = 3, holdout: float = 1 / 3, n_boot: int = 2000,
              confidence: float = 0.95, boot_seed: int = 0, out_dir=None, split_dir=None, cache_dir=None,
              templates: Sequence[str] | None = None, device: str = "auto", score_test: bool = True,
              rule: str = "mean") -> Recommendation:
    """Recommend a (backbone, method) for ``dataset`` from its labelled K-shot data (see the module docstring).

    ``dataset``: a :class:`~workbench.data.Dataset` or anything ``wb.load_dataset`` takes.
    ``backbones``: one or several :class:`~workbench.backbones.Backbone` objects or names
    (``"name"`` or ``("name", "pretrained")``). ``methods``: candidate names (default: every
    registered method whose expected cost fits ``budget``). ``shots``: one K or several (the
    choice is made at the largest; the others draw the curve). ``metric``: default the dataset's
    primary metric. ``out_dir``: where the runs' provenance and the chosen model go (default: a
    new temporary folder). ``score_test=False`` skips phase 2 for the non-chosen candidates.
    ``rule``: how the held-out evidence decides, one of :data:`RULES` (see
    :func:`selection_scores`); every rule's choice is also computed and kept in
    ``design["choice_by_rule"]`` (cheap: the fits are shared).

    A candidate whose fit raises is named in a warning, left out of the choice and listed last
    in the ranking with its error (``table["error"]``, ``Recommendation.failed``); features that
    are NaN or inf stop with :class:`NonFiniteFeatures` naming the images.
    """
    plan = _plan(dataset, backbones, methods, shots, seeds, budget, metric, method_params=method_params,
                 resplits=resplits, holdout=holdout, n_boot=n_boot, confidence=confidence, boot_seed=boot_seed,
                 split_dir=split_dir, cache_dir=cache_dir, templates=templates, device=device, rule=rule)
    nested = nested_selection(plan)                  # phase 1: support + validation only
    evidence = weigh_evidence(plan, nested)          # the choice is fixed here
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="workbench-recommend-"))
    final = refit_and_test(plan, nested, evidence, out, score_test)   # phase 2: the test split, once
    if score_test:
        score_test_split(plan, evidence.table, final)
    else:
        for col in ("test", "test_ci_low", "test_ci_high"):
            evidence.table[col] = np.nan
    return _report(plan, nested, evidence, final, out)


def summary_text(rec: Recommendation) -> str:
    """One plain-language paragraph: the choice, its interval, who is tied with it and at what cost, test once."""
    from .report import metric_label

    name = metric_label(rec.metric).replace(" (%)", "")
    at_k = rec.table[rec.table["shots"] == rec.shots]
    chosen = at_k[at_k["chosen"]].iloc[0]
    conf = int(round(100 * rec.confidence))
    rule = rec.design.get("rule", "mean")
    how = {"mean": "the held-out estimate",
           "pooled": f"the held-out estimate pooled over each cross-validation's folds "
                     f"({100 * chosen['selection_score']:.1f}%)",
           "p_best": f"the held-out estimate's bootstrap probability of being the best "
                     f"(P = {chosen['selection_score']:.2f})"}[rule]
    parts = [f"With {rec.shots} image{'s' if rec.shots != 1 else ''} per class of {rec.dataset}, {rec.method} on "
             f"{rec.backbone} is the best choice by {how}; held-out {name} {100 * rec.estimate:.1f}% "
             f"({conf}% CI {100 * rec.ci_low:.1f}–{100 * rec.ci_high:.1f}), from {rec.design['groups_label']} of the "
             f"~{rec.design['labelled_images']} labelled images (support + validation; the test split was not used "
             "to choose)."]
    others = at_k[~at_k["chosen"]]
    tied = others[others["p_chosen_beats"] < SIGNIFICANT]
    worse = others[others["p_chosen_beats"] >= SIGNIFICANT]

    def cost(row) -> str:
        a, b = row["fit_seconds"], chosen["fit_seconds"]
        if not (a > 0 and b > 0):
            return ""
        ratio = a / b
        if ratio >= 1.5:
            return f" and costs {ratio:.0f}× more"
        return f" and costs {1 / ratio:.0f}× less" if ratio <= 1 / 1.5 else " at a similar cost"

    if len(tied):
        descr = "; ".join(f"{r['method']} on {r['backbone']} ({100 * r['estimate']:.1f}%, P(chosen better) = "
                          f"{r['p_chosen_beats']:.2f}){cost(r)}" for _, r in tied.head(3).iterrows())
        parts.append(f"Not significantly worse (paired bootstrap, P < {SIGNIFICANT}): {descr}.")
    else:
        parts.append("Every other candidate is significantly worse (paired bootstrap, P ≥ "
                     f"{SIGNIFICANT}).")
    if len(worse) and len(tied):
        parts.append(f"{len(worse)} other candidate(s) are significantly worse.")
    if rec.failed:
        parts.append("Failed, so left out of the choice: " + "; ".join(f"{c} ({e})" for c, e in rec.failed.items())
                     + ".")
    if not np.isnan(chosen["test"]):
        best_test = at_k.sort_values("test", ascending=False).iloc[0]
        parts.append(f"On the test split, scored once after the choice, it reaches {100 * chosen['test']:.1f}%"
                     + (" — the best of all candidates there." if best_test["candidate"] == chosen["candidate"] else
                        f"; the best candidate by test was {best_test['method']} on {best_test['backbone']} "
                        f"({100 * best_test['test']:.1f}%) — choosing by test scores would overstate what to "
                        "expect on new images."))
    return " ".join(parts)
