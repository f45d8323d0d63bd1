"""Evaluation protocols beyond the standard few-shot run, as rows of the one results table.

``compare(..., protocol=...)`` runs any of them; every row says which in its ``protocol`` column:

* ``"default"`` / ``"paper"``: K shots per class (or a total budget), the dataset's own test split
  (:func:`workbench.experiment.run_experiment`).
* ``"base_to_new"``: fit on the first ⌈C/2⌉ classes, test on base and new classes
  (:mod:`workbench.base2new`); the row's ``metric`` is ``"hm"`` and ``base_accuracy`` /
  ``new_accuracy`` / ``hm`` hold the scores. A method that cannot classify new classes gets a
  row with NaN scores and the reason in ``note``.
* ``"retrieval"``: image–text pairs (:mod:`workbench.retrieval`): image→text and text→image
  R@1/5/10 and ``mean_recall`` on the test split of a :class:`~workbench.data.pairs.PairDataset`,
  for the backbone as it is (``zero_shot``) or fine-tuned by a ``pairs`` method.
* ``"cross_dataset"``: fit on one dataset (``dataset``), evaluate on the test split of another
  (``eval_dataset``) without further training — domain shift, e.g. RESISC45 → WHU-RS19.
  ``eval_classes="shared"`` keeps the target's test images of the classes both datasets share
  and predicts among those classes (every method can); ``"all"`` re-targets the method to all of
  the target's class names through its text classifier (CoCoOp's cross-dataset transfer; only
  the methods that can name new classes, see :data:`workbench.base2new.NEW_CLASS_RULES`).

Shared classes (:func:`shared_classes`): readable class names equal up to case, ``_``/``-`` and
spaces, plus the pairs a dataset YAML lists under ``class_map: {other dataset: {name here: name
there}}`` (in either dataset's YAML; ``null`` there means "not the same class").
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Mapping, Sequence

import torch

from .errors import ConfigError, did_you_mean
from .record import PROTOCOL_COLUMNS

#: every value of the ``protocol`` column (``default`` = the standard leak-free few-shot protocol)
PROTOCOLS = ("default", "paper", "base_to_new", "cross_dataset", "retrieval")
EVAL_CLASSES = ("shared", "all")
def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}."
                          + did_you_mean(str(protocol), PROTOCOLS))
    return protocol


# -- shared classes ------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def _yaml_of(dataset) -> str:
    src = dataset.source if isinstance(dataset.source, dict) else {}
    return src.get("spec") or f"dataset {dataset.name!r}"


def _map_entries(owner, other) -> dict:
    """``owner``'s ``class_map`` entries for ``other`` (by name; a ``*_mini`` subset answers for its full set)."""
    cmap = getattr(owner, "class_map", None) or {}
    for key in (other.name, re.sub(r"_mini$", "", other.name)):
        if key in cmap:
            return dict(cmap[key])
    return {}


def shared_classes(source, target, class_map: Mapping[str, str | None] | None = None) -> list[tuple[int, int]]:
    """``[(source label, target label), ...]`` of the classes both datasets hold, in target order.

    ``class_map`` ({target class name: source class name or None}) adds to, and wins over, the
    YAMLs' ``class_map`` entries and the equal-name rule. Names that are not classes of their
    dataset are a ConfigError naming the file.
    """
    src_names, tgt_names = list(source.class_names), list(target.class_names)
    src_by_norm = {_norm(n): i for i, n in enumerate(src_names)}
    pairs: dict[int, int | None] = {}
    for j, name in enumerate(tgt_names):           # equal names
        if _norm(name) in src_by_norm:
            pairs[j] = src_by_norm[_norm(name)]

    def apply(mapping: dict, target_side_first: bool, where: str):
        for a, b in mapping.items():
            tgt_name, src_name = (a, b) if target_side_first else (b, a)
            if tgt_name is None:   # a source class marked "not shared" from the source's YAML
                continue
            if tgt_name not in tgt_names:
                raise ConfigError(f"{where}: class_map names {tgt_name!r}, not a class of {target.name!r}; its "
                                  f"classes are {tgt_names}." + did_you_mean(str(tgt_name), tgt_names))
            if src_name is not None and src_name not in src_names:
                raise ConfigError(f"{where}: class_map names {src_name!r}, not a class of {source.name!r}; its "
                                  f"classes are {src_names}." + did_you_mean(str(src_name), src_names))
            pairs[tgt_names.index(tgt_name)] = None if src_name is None else src_names.index(src_name)

    apply(_map_entries(source, target), False, _yaml_of(source))
    apply(_map_entries(target, source), True, _yaml_of(target))
    apply(dict(class_map or {}), True, "class_map argument")
    out = [(s, t) for t, s in sorted(pairs.items()) if s is not None]
    if len({s for s, _ in out}) != len(out):
        twice = sorted({src_names[s] for s, _ in out if sum(1 for x, _ in out if x == s) > 1})
        raise ConfigError(f"{source.name!r} → {target.name!r}: source class(es) {twice} are mapped from several "
                          "target classes; map each target class to a different source class (or null).")
    return out


# -- rows ------------------------------------------------------------------------------------------

def _run_id(prefix: str, parts) -> str:
    from .paths import safe_name

    # names are not paths: the id names the run's folder (a dataset name may hold "/" or "..")
    return safe_name(prefix, "run id") + "-" + hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _blank_row(dataset, backbone, method: str, shots: int, seed: int, protocol: str, domain: str | None) -> dict:
    from .metrics import SCALAR_METRICS
    from .record import VAL_COLUMNS

    nan = float("nan")
    return {"dataset": dataset.name, "domain": domain or dataset.domain or "", "backbone": backbone.name,
            "pretrained": backbone.pretrained or "", "method": method, "shots": shots, "seed": seed,
            "protocol": protocol, "metric": getattr(dataset, "metric", None) or "accuracy",
            **{k: nan for k in SCALAR_METRICS}, **{k: nan for k in VAL_COLUMNS}, "n_classes": dataset.n_classes,
            "n_test": 0, "fit_seconds": nan, "predict_seconds": nan, "skipped_images": 0, "run_id": "",
            **{k: "" for k in ("eval_dataset", "eval_classes", "allocation", "note")},
            **{k: nan for k in ("budget", "base_accuracy", "new_accuracy", "hm")}}


def _save_record(out_dir, row: dict, record: dict, device=None) -> None:
    from pathlib import Path

    from .record import environment_info

    if out_dir is None:
        return
    from .paths import safe_name

    run_dir = Path(out_dir) / "runs" / safe_name(row["run_id"], "run id")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"run_id": row["run_id"], "row": row, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record,
              "environment": environment_info(device)}
    (run_dir / "provenance.json").write_text(json.dumps(record, indent=1, default=str))


def base_to_new_row(dataset, backbone, method: str, shots: int, seed: int, *, cache, templates=None,
                    method_params: dict | None = None, split_dir=None, out_dir=None, domain: str | None = None) -> dict:
    """One ``protocol="base_to_new"`` row: HM of base and new accuracy, or the reason the method cannot."""
    from . import base2new
    from .domains import run_settings
    from .record import _validation_logits, _validation_scores

    row = _blank_row(dataset, backbone, method, shots, seed, "base_to_new", domain)
    row["metric"] = "hm"
    rule = base2new.new_class_rule(method)
    row["note"] = rule.note
    base_n = -(-dataset.n_classes // 2)
    row["run_id"] = _run_id(f"{dataset.name}-{method}-K{shots}-s{seed}-b2n",
                            [backbone.provenance_id, method_params, templates])
    if rule.how is None:
        return row
    settings = run_settings(dataset, method, method_params, "default")   # the YAML's presets apply
    prepared = base2new.prepare_base_to_new(dataset, backbone, shots, seed, cache=cache,
                                            templates=templates or settings.templates, split_dir=split_dir)
    out = base2new.fit_and_score(method, settings.params or None, prepared, backbone, cache)
    base, fitted, task, split = prepared[0], out["fitted"], out["task"], out["split"]
    encoder = fitted.image_backbone(backbone)
    val = _validation_logits(fitted, task, base, None if encoder is backbone else encoder, cache)
    row.update({k: out[k] for k in ("base_accuracy", "new_accuracy", "hm", "fit_seconds", "predict_seconds",
                                    "n_test")})
    row.update(_validation_scores(val, base_n))   # on the base classes' K-shot validation images
    row["run_id"] = _run_id(f"{dataset.name}-{method}-K{shots}-s{seed}-b2n",
                            [backbone.provenance_id, split.sha, fitted.describe()["config"], out["templates"]])
    _save_record(out_dir, row, {"protocol": {"protocol": "base_to_new", "base_classes": base.class_names,
                                             "new_classes": prepared[1].class_names, "rule": rule.note},
                                "split": {"sha": split.sha, "train_ids": split.train_ids, "val_ids": split.val_ids},
                                "templates": out["templates"], "method": fitted.describe(),
                                "backbone": backbone.provenance()}, backbone.device)
    return row


def cross_dataset_rows(source, targets: Sequence, backbone, method: str, shots: int, seed: int, *, cache,
                       eval_classes: str = "shared", templates=None, method_params: dict | None = None,
                       split_dir=None, out_dir=None, domain: str | None = None,
                       class_map: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Fit ``method`` once on ``source`` (K shots, seed), then one ``protocol="cross_dataset"`` row per target.

    ``class_map`` maps a target name to its {target class: source class} overrides.
    """
    from .base2new import new_class_rule, retarget
    from .data.sampling import sample_few_shot
    from .domains import run_settings
    from .record import _validation_logits, _validation_scores
    from .features import FeatureCache
    from .metrics import SCALAR_METRICS, compute_metrics
    from .methods import get_method
    from .task import FewShotTask

    if eval_classes not in EVAL_CLASSES:
        raise ConfigError(f"eval_classes must be one of {list(EVAL_CLASSES)}, got {eval_classes!r}.")
    rule = new_class_rule(method)
    plans = []
    for target in targets:   # every mapping checked before any fitting
        pairs = shared_classes(source, target, (class_map or {}).get(target.name)) if eval_classes == "shared" else None
        if pairs is not None and len(pairs) < 2:
            raise ConfigError(f"{source.name!r} and {target.name!r} share {len(pairs)} class(es) by name or "
                              f"class_map; evaluating among shared classes needs 2. Add a 'class_map: "
                              f"{{{source.name}: {{...}}}}' to {_yaml_of(target)}, or use eval_classes='all'.")
        plans.append((target, pairs))
    rows = []
    for target, pairs in plans:
        row = _blank_row(source, backbone, method, shots, seed, "cross_dataset", domain)
        row.update(eval_dataset=target.name, eval_classes=eval_classes,
                   metric=getattr(target, "metric", None) or "accuracy")
        rows.append(row)
    if eval_classes == "all" and rule.how is None:
        for row in rows:
            row["note"] = rule.note
            row["run_id"] = _run_id(f"{source.name}-{method}-K{shots}-s{seed}-xd", [row["eval_dataset"]])
        return rows

    settings = run_settings(source, method, method_params, "default")
    split = sample_few_shot(source, shots, seed, split_dir=split_dir)
    used = list(templates or settings.templates or source.templates or ["a photo of a {}."])
    task = FewShotTask(source, split, backbone, cache, templates=used)
    fitted = get_method(method, **(settings.params or {}))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fitted.fit(task)
    fit_seconds = time.perf_counter() - t0
    own_encoder = fitted.image_backbone(backbone)
    val_scores = _validation_scores(_validation_logits(fitted, task, source, None if own_encoder is backbone
                                                       else own_encoder, cache), source.n_classes)
    for row, (target, pairs) in zip(rows, plans):
        if pairs is not None:   # the source's classifier, among the shared classes
            logits_fn, encoder = fitted.predict_logits, own_encoder
            keep_src = torch.tensor([s for s, _ in pairs])
            relabel = {t: i for i, (_, t) in enumerate(pairs)}
            samples = [s for s in target.split("test") if s.label in relabel]
            n_classes = len(pairs)
            row["note"] = (f"{len(pairs)} shared classes of {target.n_classes}: "
                           + ", ".join(f"{target.class_names[t]}={source.class_names[s]}" for s, t in pairs))
        else:                   # re-targeted to all of the target's class names
            logits_fn, encoder = retarget(fitted, method, backbone, target.class_names, target.templates or used)
            keep_src, relabel, samples = None, None, list(target.split("test"))
            n_classes = target.n_classes
            row["note"] = rule.note.replace("new classes", "target classes")
        feats = (cache if encoder is backbone else FeatureCache(encoder, None, batch_size=cache.batch_size,
                                                                show_progress=cache.show_progress)
                 ).get(target, samples, desc=f"{target.name} test")
        x = feats.x if (pairs is None or fitted.normalized_input) else feats.raw.mean(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = logits_fn(x).float()
        predict_seconds = time.perf_counter() - t0
        labels = feats.labels
        if keep_src is not None:
            logits = logits[:, keep_src]
            labels = torch.tensor([relabel[int(y)] for y in labels])
        metrics = compute_metrics(logits, labels, n_classes)
        row.update({k: metrics[k] for k in SCALAR_METRICS}, **val_scores, n_classes=n_classes, n_test=len(feats),
                   fit_seconds=fit_seconds, predict_seconds=predict_seconds, skipped_images=len(feats.skipped))
        row["run_id"] = _run_id(f"{source.name}-{method}-K{shots}-s{seed}-xd-{target.name}",
                                [backbone.provenance_id, split.sha, fitted.describe()["config"], used, eval_classes,
                                 pairs])
        _save_record(out_dir, row, {"protocol": {"protocol": "cross_dataset", "eval_dataset": target.name,
                                                 "eval_classes": eval_classes, "shared": pairs},
                                    "split": {"sha": split.sha, "train_ids": split.train_ids,
                                              "val_ids": split.val_ids},
                                    "templates": used, "method": fitted.describe(), "metrics": metrics,
                                    "backbone": backbone.provenance()}, backbone.device)
    return rows


__all__ = ["PROTOCOLS", "EVAL_CLASSES", "PROTOCOL_COLUMNS", "shared_classes", "base_to_new_row",
           "cross_dataset_rows", "check_protocol"]
