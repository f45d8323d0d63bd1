"""Base-to-new evaluation: fit on the first half of the classes, test on both halves.

The class split follows CoOp's ``subsample_classes`` (KaiyangZhou/CoOp ``datasets/oxford_pets.py``,
used by CoCoOp, MaPLe, KgCoOp, CLIP-LoRA, CLIP-SVD): base = the first ⌈C/2⌉ classes (in the
dataset's class order), new = the rest, 16 shots by default. Shots come only from base classes;
base accuracy is measured on base-class test images among base classes, new accuracy on
new-class test images among new classes, and the harmonic mean HM = 2·base·new / (base + new)
summarises both.

How each registered method classifies classes it never saw (:data:`NEW_CLASS_RULES`):

* ``zero_shot``: the text classifier of the new class names.
* prompt learners (CoOp, KgCoOp, CoCoOp, BiomedCoOp, MaPLe, IVLP, VPT-deep): their learned
  prompts with the new class names (``for_classes``), as in the CoCoOp/MaPLe base-to-new tables.
* CLIP-LoRA, CLIP-SVD: the adapted text encoder encodes the new class names and the adapted image
  encoder the images (their papers' base-to-new tables).
* CLIP-Adapter: its adapter acts on image features, whatever the class; the new classes' text
  classifier replaces the base one.
* Tip-Adapter(-F): the cache holds base-class keys and one-hot base labels only, so new classes
  get the zero-shot term alone (the fallback used when Tip-Adapter appears in base-to-new tables).
* ZS-LP, CLAP: a class never seen in training keeps its initial prototype, its text embedding:
  zero-shot on new classes.
* GDA follows ``mrflogs/ICLR24 main_base2new.py``: the base classifier uses the pooled covariance
  ``pinv(mean_k cov_k)``, α is chosen on the (K-shot) validation set of the base classes, and the
  new classes get a classifier synthesised from the nearest base-support features of their text
  embeddings (:meth:`workbench.methods.features.gda.GDA.new_class_head`).
* ProKeR: the kernel correction is fitted to base-class residuals: new classes get zero-shot.
* TransCLIP, TDA: they use unlabeled / test-stream images, which these protocols do not provide.
* linear probe, LP++: a weight vector per class learnt (LP++: initialised) from that class's
  support images; with no image of a new class there is no weight, so they cannot. A table gets
  a row saying so (``note``) instead of a crash.

A user's own method takes part when it offers ``for_classes(class_names, backbone)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .data.dataset import Dataset, Sample
from .data.sampling import sample_few_shot
from .errors import ConfigError, DataError
from .features import FeatureCache
from .methods import get_method
from .metrics import compute_metrics
from .task import FewShotTask

#: 2 base + 2 new: accuracy among a single class is always 100 %, which would make HM meaningless
MIN_CLASSES = 4


@dataclass(frozen=True)
class NewClassRule:
    """How a method classifies classes it was not fitted on (``how`` None: it cannot; ``note`` says why)."""
    how: str | None
    note: str


_PROMPTS = NewClassRule("prompts", "new classes: the learned prompts with the new class names")
NEW_CLASS_RULES: dict[str, NewClassRule] = {
    "zero_shot": NewClassRule("text", "new classes: the text classifier of their names"),
    "coop": _PROMPTS, "kgcoop": _PROMPTS, "cocoop": _PROMPTS, "biomedcoop": _PROMPTS,
    "maple": _PROMPTS, "ivlp": _PROMPTS, "vpt_deep": _PROMPTS,
    "clip_lora": NewClassRule("adapted_encoders", "new classes: their names through the adapted text encoder"),
    "clip_svd": NewClassRule("adapted_encoders", "new classes: their names through the adapted text encoder"),
    "clip_adapter": NewClassRule("image_adapter", "new classes: adapted image features with the new classes' "
                                                  "text classifier"),
    "tip_adapter": NewClassRule("zero_shot_fallback", "new classes: zero-shot (the cache holds base classes only)"),
    "tip_adapter_f": NewClassRule("zero_shot_fallback", "new classes: zero-shot (the cache holds base classes only)"),
    "zs_lp": NewClassRule("zero_shot_fallback", "new classes: zero-shot (an untrained prototype is its text "
                                                "embedding)"),
    "clap": NewClassRule("zero_shot_fallback", "new classes: zero-shot (an untrained prototype is its text "
                                               "embedding)"),
    "gda": NewClassRule("gda", "new classes: classifier synthesised from the nearest support features "
                               "(main_base2new.py)"),
    "linear_probe": NewClassRule(None, "cannot: one weight vector per class, learnt from that class's images; "
                                       "a new class has none"),
    "lp_plus_plus": NewClassRule(None, "cannot: the linear head of a class starts from its support images' mean; "
                                       "a new class has none"),
    **{m: NewClassRule(None, "cannot: fits on image–text pairs and yields a backbone; load it and use a "
                             "classification method") for m in ("pairs_lora", "pairs_svd", "pairs_full")},
    "proker": NewClassRule("zero_shot_fallback", "new classes: zero-shot (the kernel correction fits base-class "
                                                 "residuals only)"),
    "transclip": NewClassRule(None, "cannot: it uses unlabeled images, which the base-to-new and cross-dataset "
                                    "protocols do not provide (run it with unlabeled= under the standard protocol)"),
    "tda": NewClassRule(None, "cannot: it adapts on the test stream, which the base-to-new and cross-dataset "
                              "protocols do not provide (run it with unlabeled='test' under the standard protocol)"),
    **{m: NewClassRule(None, "cannot: a multi-label method; base-to-new is a single-label protocol")
       for m in ("chexzero", "ovr_linear_probe")},
}


def new_class_rule(method: str) -> NewClassRule:
    """The rule for ``method``; a user's method qualifies when its class has ``for_classes``."""
    from .methods import method_class

    cls = method_class(method)   # unknown name: ConfigError with did-you-mean
    if method in NEW_CLASS_RULES:
        return NEW_CLASS_RULES[method]
    if hasattr(cls, "for_classes"):
        return _PROMPTS
    return NewClassRule(None, "cannot: the method has no for_classes(class_names, backbone) to name new classes")


def split_classes(dataset: Dataset) -> tuple[Dataset, Dataset]:
    """(base, new) datasets: the first ⌈C/2⌉ classes and the rest, relabelled from 0."""
    c = dataset.n_classes
    if c < MIN_CLASSES:
        raise ConfigError(
            f"base-to-new needs at least {MIN_CLASSES} classes (2 base and 2 new: accuracy among one class is "
            f"always 100 %); dataset {dataset.name!r} has {c} ({', '.join(dataset.class_names)}). Use the standard "
            "few-shot protocol (protocol='default') for it, or protocol='cross_dataset' to test on another dataset.")
    m = math.ceil(c / 2)
    return _subset(dataset, range(0, m), "base"), _subset(dataset, range(m, c), "new")


def _subset(dataset: Dataset, classes: Sequence[int], tag: str) -> Dataset:
    remap = {old: new for new, old in enumerate(classes)}
    splits = {name: [Sample(s.id, remap[s.label], s.ref) for s in samples if s.label in remap]
              for name, samples in dataset.splits.items()}
    sub = replace(dataset, name=f"{dataset.name}-{tag}", class_ids=[dataset.class_ids[i] for i in classes],
                  class_names=[dataset.class_names[i] for i in classes], splits=splits,
                  source=dict(dataset.source, subset=tag), notes=list(dataset.notes))
    # attributes the YAML loader adds (description bank, presets) follow the classes they name
    names = set(sub.class_names)
    descriptions = getattr(dataset, "descriptions", None)
    sub.descriptions = {k: v for k, v in descriptions.items() if k in names} if descriptions else descriptions
    sub.method_presets = getattr(dataset, "method_presets", {})
    return sub


def retarget(fitted, method: str, backbone, class_names: Sequence[str], templates: Sequence[str]
             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], object]:
    """``(logits_fn, image_backbone)`` classifying ``class_names`` with a method fitted on other classes.

    ``logits_fn`` takes L2-normalised features from ``image_backbone``. Raises ConfigError for a
    method that cannot (see :data:`NEW_CLASS_RULES`). Used by base-to-new and by cross-dataset
    evaluation on all of a target's classes.
    """
    from .prompts import text_classifier

    rule = new_class_rule(method)
    if rule.how is None:
        raise ConfigError(f"method {method!r} cannot classify classes it was not trained on ({rule.note}); use "
                          "'gda', 'zero_shot', Tip-Adapter, ZS-LP/CLAP, CLIP-Adapter, CLIP-LoRA/SVD or a prompt "
                          "learner (coop, kgcoop, cocoop, maple, ivlp, vpt_deep, biomedcoop).")
    names = list(class_names)
    # the templates the method fitted with (its own choice, e.g. CLIP-LoRA's), else the task's
    used = list((getattr(fitted, "fit_info", None) or {}).get("templates") or templates)

    def text_head(encoder, scale, bias):
        text = text_classifier(encoder, names, used)
        return lambda f: float(scale) * f.float() @ text.T + float(bias)

    if rule.how == "prompts":
        other = fitted.for_classes(names, backbone)
        return other.predict_logits, other.image_backbone(backbone)
    if rule.how == "adapted_encoders":
        encoder = fitted.image_backbone(backbone)
        return text_head(encoder, fitted.scale, fitted.bias), encoder
    if rule.how == "image_adapter":
        other = type(fitted)(fitted.config)
        other.load_state({**fitted.state(), "text_weights": text_classifier(backbone, names, used)})
        other.class_names = names
        return other.predict_logits, backbone
    if rule.how in ("text", "zero_shot_fallback"):
        return text_head(backbone, backbone.logit_scale, backbone.logit_bias or 0.0), backbone
    if rule.how == "gda":
        new_text = text_classifier(backbone, names, used)
        w_new, b_new = fitted.new_class_head(new_text)

        def gda_logits(f):
            f = f.double()
            return (fitted.scale.double() * f @ new_text.double().T + fitted.bias.double()
                    + fitted.alpha * (f @ w_new + b_new)).float()
        return gda_logits, backbone
    raise AssertionError(rule.how)


def _features(cache: FeatureCache, encoder, backbone, dataset: Dataset, desc: str):
    """Test features of ``dataset`` from ``encoder`` (the cache's own when it is the frozen backbone)."""
    if encoder is backbone:
        return cache.get(dataset, dataset.split("test"), desc=desc)
    return FeatureCache(encoder, None, batch_size=cache.batch_size, show_progress=cache.show_progress).get(
        dataset, dataset.split("test"), desc=f"{desc} (adapted)")


def harmonic_mean(base: float, new: float) -> float:
    """HM of base and new accuracy; 0 when both are 0, NaN when either is."""
    if math.isnan(base) or math.isnan(new):
        return float("nan")
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def prepare_base_to_new(dataset: Dataset, backbone, shots: int, seed: int, *, cache: FeatureCache,
                        templates: Sequence[str] | None = None, split_dir=None):
    """(base, new, split, task, templates): the base classes' K-shot task, shared by every method."""
    base, new = split_classes(dataset)
    templates = list(templates or dataset.templates or ["a photo of a {}."])
    counts = [sum(1 for s in base.split("train") if s.label == c) for c in range(base.n_classes)]
    if isinstance(shots, int) and not isinstance(shots, bool) and shots > min(counts):
        n, c = min(zip(counts, range(base.n_classes)))
        raise DataError(f"base-to-new on dataset {dataset.name!r}: shots={shots} per base class, but base class "
                        f"{base.class_ids[c]!r} has only {n} training image(s). Use shots <= {n} (the papers use 16; "
                        "this set is too small for that).")
    split = sample_few_shot(base, shots, seed, split_dir=split_dir)
    task = FewShotTask(base, split, backbone, cache, templates=templates)
    return base, new, split, task, templates


def fit_and_score(method: str, params: dict | None, prepared, backbone, cache: FeatureCache) -> dict:
    """Fit ``method`` on the base task and score it on base and new classes.

    Returns the fitted method, base/new accuracy, HM, the rule's note and the fit/predict seconds.
    """
    import time

    base, new, split, task, templates = prepared
    rule = new_class_rule(method)
    if rule.how is None:   # refused before any fitting
        retarget(None, method, backbone, new.class_names, templates)
    if rule.how == "gda":
        params = {"covariance": "pooled", **(params or {})}
    fitted = get_method(method, **(params or {}))
    torch.manual_seed(task.seed)
    t0 = time.perf_counter()
    fitted.fit(task)
    fit_seconds = time.perf_counter() - t0
    accs, n_test, t_pred = {}, 0, 0.0
    heads = (("base", base, (fitted.predict_logits, fitted.image_backbone(backbone))),
             ("new", new, None))
    for tag, subset, head in heads:
        logits_fn, encoder = head or retarget(fitted, method, backbone, subset.class_names, templates)
        test = _features(cache, encoder, backbone, subset, f"{tag} test")
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = logits_fn(test.x).float()
        t_pred += time.perf_counter() - t0
        accs[tag] = compute_metrics(logits, test.labels, subset.n_classes)["accuracy"]
        n_test += len(test)
    return {"fitted": fitted, "base_accuracy": accs["base"], "new_accuracy": accs["new"],
            "hm": harmonic_mean(accs["base"], accs["new"]), "note": rule.note, "fit_seconds": fit_seconds,
            "predict_seconds": t_pred, "n_test": n_test, "split": split, "task": task, "templates": templates}


def run_base_to_new(dataset: Dataset, backbone, shots: int = 16, seed: int = 1, *, cache: FeatureCache | None = None,
                    templates: Sequence[str] | None = None, method_params: dict | None = None,
                    split_dir=None, method: str = "gda") -> dict:
    """Base-to-new on one (method, K, seed): base / new accuracy and their harmonic mean.

    A method that cannot classify new classes (linear probe, LP++) raises ConfigError before
    any fitting; :func:`compare_base_to_new` and ``compare(..., protocol="base_to_new")`` give it
    a row with the reason instead.
    """
    cache = cache or FeatureCache(backbone)
    prepared = prepare_base_to_new(dataset, backbone, shots, seed, cache=cache, templates=templates,
                                   split_dir=split_dir)
    base, new = prepared[0], prepared[1]
    out = fit_and_score(method, method_params, prepared, backbone, cache)
    row = {"dataset": dataset.name, "method": method, "shots": shots, "seed": seed, "base_classes": base.n_classes,
           "new_classes": new.n_classes, "base_accuracy": out["base_accuracy"], "new_accuracy": out["new_accuracy"],
           "hm": out["hm"], "note": out["note"], "split_sha": out["split"].sha, "templates": out["templates"],
           "backbone": backbone.provenance_id}
    if method == "gda":
        row["alpha"] = out["fitted"].fit_info["alpha"]
    return row


def compare_base_to_new(dataset: Dataset, backbone, methods: Sequence[str], shots: int = 16, seed: int = 1, *,
                        cache: FeatureCache | None = None, templates: Sequence[str] | None = None,
                        common_params: dict | None = None, method_params: dict | None = None, split_dir=None):
    """:func:`run_base_to_new` for several methods on the same base/new split: one row per method
    (base and new accuracy, harmonic mean, ``note``, seconds).

    ``common_params`` go to every method that has them (e.g. ``{"epochs": 10}``: zero-shot has no
    epochs); ``method_params`` maps a method name to its own parameters, which win. Entries for
    registered methods that are not run are ignored, so one mapping serves any choice of
    ``methods``. A method that cannot classify new classes gets a row with NaN scores and the
    reason in ``note``.
    """
    import dataclasses
    import time

    import pandas as pd

    from .methods import method_class

    for m in list(methods) + list(method_params or {}):
        method_class(m)  # a misspelt name fails before any work
    cache = cache or FeatureCache(backbone)
    split_classes(dataset)   # too few classes: refused before any work
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        fields = {f.name for f in dataclasses.fields(method_class(m).Config)}
        params = {**{k: v for k, v in (common_params or {}).items() if k in fields}, **(method_params or {}).get(m, {})}
        base_n = math.ceil(dataset.n_classes / 2)
        rule = new_class_rule(m)
        if rule.how is None:
            row = {"dataset": dataset.name, "method": m, "shots": shots, "seed": seed, "base_classes": base_n,
                   "new_classes": dataset.n_classes - base_n, "base_accuracy": float("nan"),
                   "new_accuracy": float("nan"), "hm": float("nan"), "note": rule.note}
        else:
            row = run_base_to_new(dataset, backbone, shots, seed, cache=cache, templates=templates,
                                  split_dir=split_dir, method=m, method_params=params)
        rows.append({k: row[k] for k in ("dataset", "method", "shots", "seed", "base_classes", "new_classes",
                                         "base_accuracy", "new_accuracy", "hm", "note")}
                    | {"seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows)


__all__ = ["split_classes", "run_base_to_new", "compare_base_to_new", "new_class_rule", "retarget",
           "NEW_CLASS_RULES", "harmonic_mean"]
