"""Run one experiment — (dataset, backbone, method, K, seed) — and record it honestly.

A result is one tidy row (dataset, domain, backbone, method, K, seed, metrics, timings,
skipped-image count) plus a provenance record saved as JSON beside it: package versions,
torch/CUDA, device, git revision, the split file's hash and ids, templates, the method's
configuration and what its fitting chose.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .data.dataset import Dataset
from .data.sampling import sample_few_shot
from .domains import run_settings
from .errors import ConfigError
from .features import FeatureCache
from .methods import get_method, method_class
from .methods.base import Method
from .metrics import SCALAR_METRICS, compute_metrics
from .paths import safe_name
from .progress import progress
from .record import (PROTOCOL_COLUMNS, RunResult, RESULT_COLUMNS, TABLE_COLUMNS, VAL_COLUMNS,  # noqa: F401 (re-exported)
                     _validation_logits, _validation_scores, environment_info)
from .task import FewShotTask
from .unlabeled import (UNLABELED_COLUMNS, check_unlabeled, default_unlabeled, method_unlabeled_source,
                        resolve_unlabeled)
from .validate import check_seed, check_shots

def _as_method(method: str | Method, params: dict | None) -> Method:
    if isinstance(method, Method):
        if params:
            raise ConfigError("pass method parameters either in the Method object or in method_params, not both.")
        return method
    return get_method(method, **(params or {}))


def _conformal_summary(val, test_logits: torch.Tensor, test_labels: torch.Tensor, coverage: float = 0.9, *,
                       held_out: bool = False, selection_read: bool = True, seed: int = 0) -> dict | None:
    """Conformal sets calibrated on ``val``, scored on test (report only), for each score (LAC, APS, RAPS).

    ``certified`` is True only when the calibration images were held out of fitting and selection
    (``held_out``, see ``run_experiment(calibration_fraction=...)``) or the method never read its
    validation images (``selection_read`` False), and there are enough of them for the coverage.
    The top-level ``coverage`` / ``mean_set_size`` / ``class_coverage_gap`` are the LAC score's;
    ``scores`` holds every score's.
    """
    import warnings

    from .conformal import SCORES, ConformalCalibrator, set_metrics

    if val is None:
        return None
    cal_probs, test_probs = torch.softmax(val[0].double(), -1), torch.softmax(test_logits.double(), -1)
    notes, by_score, uncertified = [], {}, False
    for score in SCORES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cal = ConformalCalibrator(coverage, score=score, seed=seed).fit(cal_probs, val[1])
            except ConfigError as err:   # RAPS tuning with too few images: say so, keep the other scores
                notes.append(f"{score}: {err}")
                continue
        notes += [f"{score}: {w.message}" for w in caught]
        uncertified |= bool(cal.uncertified_classes)
        by_score[score] = {"n_calibration": cal.n_calibration,
                           **set_metrics(cal.predict_sets(test_probs), test_labels, coverage)}
        if score == "raps":
            by_score[score].update(k_reg=cal.fitted_k_reg, lam=cal.fitted_lam)
    valid = held_out or not selection_read
    if not valid:
        notes.insert(0, "not certified: the calibration images are the K-shot validation images the method read while "
                        "fitting (it may have chosen hyper-parameters or epochs on them), so they are not exchangeable "
                        "with test and the sets tend to under-cover. Rerun with calibration_fraction=0.5 to hold "
                        "calibration images out of selection.")
    lac = by_score["lac"]
    return {"target_coverage": coverage, "calibration": "held_out" if held_out else "kshot_validation",
            "n_calibration": lac["n_calibration"], "coverage": lac["coverage"], "mean_set_size": lac["mean_set_size"],
            "class_coverage_gap": lac["class_coverage_gap"], "certified": valid and not uncertified,
            "scores": by_score, "notes": notes}


def run_experiment(dataset: Dataset, backbone, method: str | Method, shots: int, seed: int, *,
                   cache: FeatureCache | None = None, templates: Sequence[str] | None = None,
                   method_params: dict | None = None, split_dir=None, out_dir=None, domain: str | None = None,
                   save_model: bool = False, protocol: str = "default", budget: int | None = None,
                   allocation: str = "proportional", language: dict | None = None,
                   calibration_fraction: float | None = None, val_shots: int | None = None, unlabeled=None) -> RunResult:
    """Sample (or reuse) the K-shot split, fit on it, evaluate on the whole test split.

    The dataset YAML's ``method_presets`` for the method apply unless ``method_params`` say
    otherwise; ``protocol="paper"`` follows the YAML's ``paper_protocol`` (the reference's single
    template, split file and full-validation selection) instead of the leak-free default.
    ``budget=N`` (with ``shots=None``) draws N support images in total, shared out over the classes
    by ``allocation`` ("proportional" or "uniform", see :mod:`workbench.data.sampling`); the row's
    ``shots`` is then the mean per class and ``budget`` / ``allocation`` say how it was drawn.
    ``language`` (``{"descriptions": ..., "weighting": ..., "seed": ...}``, see
    :class:`~workbench.task.FewShotTask`) changes the text classifier every method starts from;
    it is part of the run's id and provenance.

    ``val_shots``: K-shot validation images per class (default ``min(K, 4)``, the same for every
    method, see :func:`~workbench.data.sample_few_shot`); ``val_shots=K`` reproduces references
    that select on K validation images per class (LP++).

    Conformal prediction sets (provenance ``conformal``; the saved model's ``predict(coverage=)``)
    are calibrated on the K-shot validation images. Their guarantee needs images that fitting and
    selection never saw: ``calibration_fraction=0.5`` holds that share of each class's validation
    images out of the task (the method selects on the rest — that is the cost) and calibrates on
    them (:func:`workbench.conformal.split_calibration`; a ConfigError when a class has fewer than 2).
    With it, the row's ``val_*`` scores come from the selection part only. Without it, the sets of
    a method that read its validation images are reported ``certified: false`` with a note.

    ``unlabeled`` (see :mod:`workbench.unlabeled`): images nobody labelled — ``"test"`` (transductive:
    the test images themselves), a split name, a folder, a CSV or an ``.npz``; methods that use them
    (``transclip``, ``tda``) need it, the others ignore it. The row's ``unlabeled_source`` and
    ``transductive`` say what the method saw.
    """
    # Bad input is refused here, before any image is encoded or any step trained.
    from .protocols import check_protocol

    check_protocol(protocol)   # a misspelt name: the list and a did-you-mean
    check_unlabeled(unlabeled, protocol, "run_experiment")
    if protocol not in ("default", "paper"):
        raise ConfigError(f"run_experiment runs protocol 'default' or 'paper'; for {protocol!r} use "
                          f"compare(..., protocol={protocol!r}) (see workbench.protocols).")
    if budget is None:
        shots = check_shots(shots, "run_experiment")
    elif shots is not None:
        raise ConfigError("run_experiment: pass either shots (images per class) or budget (images in total), "
                          "not both.")
    seed = check_seed(seed, "run_experiment")
    if save_model and out_dir is None:
        raise ConfigError("save_model=True needs an out_dir to save the model in.")
    if out_dir is not None:
        from .results import ensure_writable

        ensure_writable(out_dir, "out_dir")
    settings = run_settings(dataset, method, method_params, protocol)
    dataset = settings.dataset   # re-split by the paper's split file when it applies
    if settings.resplit and split_dir is not None:   # its few-shot draws must not meet the default splits' files
        split_dir = Path(split_dir) / "paper_protocol"
    method = _as_method(method, settings.params or None)
    check_unlabeled(unlabeled, protocol, "run_experiment", method=method)
    unlabeled = default_unlabeled(unlabeled, method)
    if getattr(dataset, "task", "single_label") == "multi_label":   # its own run: workbench/multilabel.py
        if budget is not None or language:
            raise ConfigError("run_experiment on a multi-label dataset takes shots (positives per finding); "
                              "budget= and language= are single-label options.")
        from .multilabel import run_multilabel_experiment

        return run_multilabel_experiment(dataset, backbone, method, shots, seed, cache=cache, templates=templates,
                                         split_dir=split_dir, out_dir=out_dir, domain=domain, save_model=save_model,
                                         settings=settings, protocol=protocol)
    from .methods.registry import check_method_task, method_names

    if method.name in method_names():   # a registered method that declares no single-label support is refused
        check_method_task(method.name, "single_label")
    cache = cache or FeatureCache(backbone)
    split = sample_few_shot(dataset, shots, seed, split_dir=split_dir, budget=budget, allocation=allocation,
                            val_shots=val_shots)
    shots = split.shots   # budget mode: the mean per class
    fit_split, calibration_samples = split, None
    if calibration_fraction is not None:   # calibration images the method never sees
        import dataclasses

        from .conformal import split_calibration

        val_samples = split.val(dataset)
        keep, held = split_calibration([s.label for s in val_samples], calibration_fraction, seed)
        fit_split = dataclasses.replace(split, val_ids=[val_samples[i].id for i in keep])
        calibration_samples = [val_samples[i] for i in held]
    templates = list(templates or settings.templates or dataset.templates or ["a photo of a {}."])
    # descriptions join the prompts only when the language options ask for them (else plain templates)
    descriptions = getattr(dataset, "descriptions", None) if (language or {}).get("descriptions", "none") != "none" \
        else None
    # the pool is encoded only for a method that uses it; its labels are never read
    pool = resolve_unlabeled(unlabeled, dataset, split, cache, protocol) if method.uses_unlabeled else None
    task = FewShotTask(dataset, fit_split, backbone, cache, templates=templates, descriptions=descriptions,
                       language=language, unlabeled=pool)

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    method.fit(task)
    fit_seconds = time.perf_counter() - t0
    val_tuned = task.read_validation   # before the runner itself reads them below

    encoder = method.image_backbone(backbone)
    if encoder is backbone:
        test = cache.get(dataset, dataset.split("test"), desc="test")
    else:  # the method adapted the image encoder: its features are its own (kept in memory only)
        test = FeatureCache(encoder, None, batch_size=cache.batch_size, num_workers=cache.num_workers,
                            show_progress=cache.show_progress).get(dataset, dataset.split("test"), desc="test (adapted)")
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = method.predict_logits(test.x if method.normalized_input else test.raw.mean(0)).float()
    predict_seconds = time.perf_counter() - t0
    metrics = compute_metrics(logits, test.labels, dataset.n_classes)
    val = _validation_logits(method, task, dataset, None if encoder is backbone else encoder, cache)
    val_scores = _validation_scores(val, dataset.n_classes)
    calibration = val if calibration_samples is None else _validation_logits(
        method, task, dataset, None if encoder is backbone else encoder, cache, samples=calibration_samples)

    skipped = dataset.skipped + task.skipped + test.skipped + (pool.skipped if pool is not None else [])
    unlabeled_cols = method_unlabeled_source(method, pool)
    # names are not paths: the run id names the run's folder, so its parts are safe path components
    run_id = f"{safe_name(dataset.name, 'dataset name')}-{safe_name(method.name, 'method name')}-{f'N{budget}' if budget else f'K{shots}'}-s{seed}-" + hashlib.sha1(
        json.dumps([backbone.provenance_id, split.sha, method.describe()["config"], templates]
                   + ([task.fingerprint().get("language")] if language else [])
                   + ([{"calibration_fraction": calibration_fraction}] if calibration_fraction is not None else [])
                   + ([unlabeled_cols["unlabeled_source"]] if unlabeled_cols["unlabeled_source"] else []),
                   sort_keys=True, default=str).encode()).hexdigest()[:8]
    row = {"dataset": dataset.name, "domain": domain or dataset.domain or "", "backbone": backbone.name,
           "pretrained": backbone.pretrained or "", "method": method.name, "shots": shots, "seed": seed,
           "protocol": protocol, "metric": getattr(dataset, "metric", None) or "accuracy", **{k: metrics[k] for k in SCALAR_METRICS}, **val_scores, "val_tuned": bool(val_tuned and val is not None), "n_classes": dataset.n_classes, "n_test": len(test), "fit_seconds": fit_seconds,
           "predict_seconds": predict_seconds, "skipped_images": len(skipped), "run_id": run_id, **unlabeled_cols}
    if budget is not None:
        row.update(budget=budget, allocation=allocation)
    record = {
        "run_id": run_id, "row": row, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "source": dataset.source,
                    "class_ids": dataset.class_ids, "class_names": dataset.class_names, "notes": dataset.notes,
                    "sizes": {k: len(v) for k, v in dataset.splits.items()}},
        "split": {"sha": split.sha, "shots": shots, "seed": seed, "val_shots": split.val_shots,
                  "val_source": split.val_source, "train_ids": split.train_ids, "val_ids": split.val_ids,
                  "shortfalls": split.shortfalls, "budget": split.budget, "allocation": split.allocation,
                  "per_class": split.per_class, "calibration_fraction": calibration_fraction,
                  "calibration_ids": [s.id for s in calibration_samples or []]},
        "protocol": settings.record, "templates": templates, "backbone": backbone.provenance(),
        "language": {**task.fingerprint().get("language", {}), **task.language_info} if language else None,
        "method": method.describe(),
        "unlabeled": {**unlabeled_cols, **(pool.describe() if pool is not None else {})},
        "metrics": metrics, "conformal": _conformal_summary(calibration, logits, test.labels, held_out=calibration_samples is not None,
                                        selection_read=val_tuned, seed=seed), "skipped": skipped,
        "environment": environment_info(backbone.device),
    }
    model_dir = None
    if save_model and out_dir is None:
        raise ConfigError("save_model=True needs an out_dir to save the model in.")
    from .distributed import is_main_process

    if out_dir is not None and is_main_process():  # under torchrun process 0 alone writes the run's files
        run_dir = Path(out_dir) / "runs" / safe_name(run_id, "run id")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "provenance.json").write_text(json.dumps(record, indent=1, default=str))
        if save_model:
            from .predictor import Predictor

            model_dir = Predictor(backbone, method, templates=templates,
                                  metrics={k: metrics[k] for k in SCALAR_METRICS},
                                  calibration=None if calibration is None else
                                  (torch.softmax(calibration[0], -1), calibration[1]),
                                  calibration_certified=calibration_samples is not None or not val_tuned,
                                  ).save(run_dir / "model")
    return RunResult(row=row, record=record, method=method, logits=logits, labels=test.labels, model_dir=model_dir,
                     test_ids=list(test.ids))


def compare(dataset: Dataset, backbone, methods: Sequence[str], shots: Sequence[int], seeds: Sequence[int], *,
            cache: FeatureCache | None = None, templates: Sequence[str] | None = None,
            method_params: dict | None = None, split_dir=None, out_dir=None, domain: str | None = None,
            resume: bool = True, protocol: str = "default", targets: Sequence | None = None,
            eval_classes: str = "shared", class_map: dict | None = None, budgets: Sequence[int] | None = None,
            allocation: str = "proportional", language: dict | None = None, unlabeled=None) -> pd.DataFrame:
    """Every (method, K, seed) on one dataset; returns the tidy results table (one row per run).

    ``method_params`` maps a method name to its parameters. With ``out_dir``, each run is
    appended to ``out_dir/results.csv`` as soon as it finishes, and a rerun skips the runs
    already there (``resume=False`` recomputes and replaces them): runs are keyed like sweep
    cells (see :mod:`workbench.results`). Ctrl-C raises :class:`~workbench.errors.Interrupted`
    with the count done; the finished runs stay saved.

    ``protocol`` (the rows' ``protocol`` column, see :mod:`workbench.protocols`): ``"default"``
    (leak-free few-shot), ``"paper"`` (the YAML's paper protocol), ``"retrieval"`` (a pair dataset from
    ``wb.load_pairs``: R@1/5/10 and mean recall, ``shots`` ignored; :mod:`workbench.retrieval`), ``"base_to_new"`` (fit on the
    first ⌈C/2⌉ classes; ``base_accuracy``, ``new_accuracy``, ``hm``) or ``"cross_dataset"`` (fit
    on ``dataset``, evaluate on each of ``targets`` — datasets or names — among their shared
    classes, ``eval_classes="shared"``, or all their classes by name, ``"all"``; ``class_map``
    maps a target name to {its class: the source class}). ``budgets=[N, ...]`` (standard
    protocols) adds runs drawing N support images in total, by ``allocation``. ``language``
    (standard protocols): the text classifier's description / weighting options for every run
    (:func:`run_experiment`), part of each run's key. ``unlabeled`` (standard protocols): the pool of
    unlabeled images for the methods that use them (:mod:`workbench.unlabeled`), part of their runs' keys.
    """
    from .errors import Interrupted
    from .protocols import EVAL_CLASSES, check_protocol
    from .results import ResultsTable, backbone_weights_key, make_cell

    check_protocol(protocol)
    if protocol == "retrieval" or getattr(dataset, "task", None) == "retrieval":   # image–text pairs
        from .retrieval_runs import compare_retrieval

        return compare_retrieval(dataset, backbone, methods, seeds, cache=cache, method_params=method_params,
                                 out_dir=out_dir, domain=domain, resume=resume)
    from .methods.registry import check_method_task

    for m in methods:
        method_class(m)  # fail on a misspelt name before any work
        check_method_task(m, getattr(dataset, "task", "single_label"))   # and on a method of another task kind
    shots = [check_shots(k, "compare") for k in shots]
    seeds = [check_seed(s, "compare") for s in seeds]
    if protocol in ("default", "cross_dataset"):
        from .data.sampling import check_shots_fit

        for k in shots:  # every K against the classes' training images, before any encoding
            check_shots_fit(dataset, k)
    for m in methods:  # types and bounds of every method's parameters, before the first run
        get_method(m, **((method_params or {}).get(m) or {}))
    unknown = sorted(set(method_params or {}) - set(methods))
    if unknown:
        raise ConfigError(f"method_params names {unknown}, which are not among the methods {list(methods)}.")
    if unlabeled is not None and protocol not in ("default", "paper"):
        raise ConfigError(f"unlabeled= applies to the standard few-shot protocols, not {protocol!r}.")
    check_unlabeled(unlabeled, protocol, "compare")
    per_method = {}
    for m in methods:   # a method given the wrong kind of pool: refused now; one given none: "test", warned once
        check_unlabeled(unlabeled, protocol, "compare", method=method_class(m))
        per_method[m] = default_unlabeled(unlabeled, method_class(m), "compare")
    if language:
        from .task import _check_language

        if protocol not in ("default", "paper"):
            raise ConfigError(f"language= applies to the standard few-shot protocols, not {protocol!r}: "
                              "base-to-new and cross-dataset heads use plain templates.")
        language = _check_language(language)
        if "prior_features" in language:
            raise ConfigError("compare(language=...) takes 'descriptions', 'weighting' and 'seed'; pass "
                              "prior_features through run_experiment or a FewShotTask.")
    budgets = list(budgets or [])
    if budgets and protocol not in ("default", "paper"):
        raise ConfigError(f"budgets= applies to the standard few-shot protocols, not {protocol!r}.")
    if budgets:
        from .data.sampling import ALLOCATIONS

        if allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    if protocol == "cross_dataset":
        if not targets:
            raise ConfigError("protocol='cross_dataset' needs targets=[dataset or name, ...] to evaluate on.")
        if eval_classes not in EVAL_CLASSES:
            raise ConfigError(f"eval_classes must be one of {list(EVAL_CLASSES)}, got {eval_classes!r}.")
        from .domains import load_dataset

        targets = [load_dataset(t) if isinstance(t, str) else t for t in targets]
        if eval_classes == "shared":
            from .protocols import shared_classes

            for t in targets:   # a bad or empty class mapping is refused before any work
                shared_classes(dataset, t, (class_map or {}).get(t.name))
    elif targets:
        raise ConfigError(f"targets= is for protocol='cross_dataset', not {protocol!r}.")
    if protocol == "base_to_new":
        from .base2new import split_classes

        split_classes(dataset)   # fewer than 4 classes: refused now
    results = ResultsTable(out_dir) if out_dir is not None else None  # unwritable folder: refused now

    weights_key = backbone_weights_key(backbone)   # a saved (fine-tuned) folder: its weights, not just its path

    def cell(m, k, s, **extra):
        uses = method_class(m).uses_unlabeled and per_method.get(m) is not None   # inductive runs keep their keys
        return make_cell(dataset.name, backbone.name, backbone.pretrained, m, k, s,
                         params=(method_params or {}).get(m), templates=templates, protocol=protocol,
                         extra={**extra, "language": language or None,
                                "unlabeled": str(per_method[m]) if uses else None,
                                "backbone_weights": weights_key})

    if protocol == "cross_dataset":
        grid = [cell(m, k, s, eval_dataset=t.name, eval_classes=eval_classes, class_map=(class_map or {}).get(t.name))
                for k in shots for s in seeds for m in methods for t in targets]
    else:
        grid = [cell(m, k, s) for k in shots for s in seeds for m in methods]
        grid += [cell(m, None, s, budget=n, allocation=allocation) for n in budgets for s in seeds for m in methods]
    finished = results.done_rows() if (results is not None and resume) else {}
    todo = [c for c in grid if c["cell_id"] not in finished]
    cache = cache or FeatureCache(backbone)
    rows = dict(finished)
    bar = progress(total=len(grid), initial=len(grid) - len(todo), desc=f"{dataset.name}: runs", unit="run",
                   leave=True)

    def keep(c, row):
        row = {**row, "method_label": c["method_label"], "cell_id": c["cell_id"]}
        if results is not None:
            results.append(row, replace=not resume)
        rows[c["cell_id"]] = row
        bar.update(1)

    try:
        if protocol == "cross_dataset":
            _compare_cross_dataset(todo, dataset, backbone, targets, cache, templates, split_dir, out_dir, domain,
                                   eval_classes, class_map, keep)
        for c in todo if protocol != "cross_dataset" else []:
            if protocol == "base_to_new":
                from .protocols import base_to_new_row

                row = base_to_new_row(dataset, backbone, c["method"], c["shots"], c["seed"], cache=cache,
                                      templates=templates, method_params=c["params"] or None, split_dir=split_dir,
                                      out_dir=out_dir, domain=domain)
            else:
                row = run_experiment(dataset, backbone, c["method"], c["shots"], c["seed"], cache=cache,
                                     templates=templates, method_params=c["params"] or None, split_dir=split_dir,
                                     out_dir=out_dir, domain=domain, protocol=protocol, budget=c.get("budget"),
                                     allocation=c.get("allocation", allocation), language=language or None,
                                     unlabeled=per_method.get(c["method"], unlabeled)).row
            keep(c, row)
    except KeyboardInterrupt:
        done = sum(c["cell_id"] in rows for c in grid)
        if results is not None:
            msg = (f"interrupted — rerun the same command to resume ({done} of {len(grid)} runs done, "
                   f"saved in {results.path}).")
        else:
            msg = (f"interrupted after {done} of {len(grid)} runs; nothing was saved (pass out_dir to keep "
                   "finished runs and resume).")
        raise Interrupted(msg, done, len(grid), results.path if results is not None else None) from None
    finally:
        bar.close()
    # multi-label rows add their own scalars (micro_auroc, mAP, ...: workbench/multilabel.py) after the shared columns
    extra = list(dict.fromkeys(k for c in grid for k in rows[c["cell_id"]] if k not in TABLE_COLUMNS))
    table = pd.DataFrame([rows[c["cell_id"]] for c in grid], columns=TABLE_COLUMNS + extra)
    # rows of results files written before the protocol column existed are standard few-shot runs
    table["protocol"] = table["protocol"].fillna("").astype(str).replace("", "default")
    # rows written before the unlabeled columns existed used no unlabeled image
    table["unlabeled_source"] = table["unlabeled_source"].fillna("").astype(str)
    table["transductive"] = table["transductive"].fillna(False).astype(bool)
    return table


def _compare_cross_dataset(todo, dataset, backbone, targets, cache, templates, split_dir, out_dir, domain,
                           eval_classes, class_map, keep) -> None:
    """Fit each (method, K, seed) once and evaluate it on every target still to do."""
    from .protocols import cross_dataset_rows

    by_name = {t.name: t for t in targets}
    groups: dict = {}
    for c in todo:
        groups.setdefault((c["method"], c["shots"], c["seed"], json.dumps(c["params"], sort_keys=True)), []).append(c)
    for (m, k, s, _), cells in groups.items():
        rows = cross_dataset_rows(dataset, [by_name[c["eval_dataset"]] for c in cells], backbone, m, k, s,
                                  cache=cache, eval_classes=eval_classes, templates=templates,
                                  method_params=cells[0]["params"] or None, split_dir=split_dir, out_dir=out_dir,
                                  domain=domain, class_map=class_map)
        for c, row in zip(cells, rows):
            keep(c, row)


def _primary_metric(rows: pd.DataFrame) -> str:
    """The metric a dataset's rows name (its YAML's ``metric:``); for rows that name none, their task kind's
    primary metric (a ``task`` column, or the ``retrieval`` protocol: :mod:`workbench.task_kinds`), else accuracy."""
    named = rows["metric"].dropna().astype(str) if "metric" in rows else pd.Series([], dtype=str)
    named = named[named != ""]
    if len(named):
        return str(named.mode().iloc[0])
    from .task_kinds import task_kind

    kinds = rows["task"].dropna().astype(str) if "task" in rows else pd.Series([], dtype=str)
    kinds = kinds[kinds != ""]
    if not len(kinds) and "protocol" in rows and (rows["protocol"].astype(str) == "retrieval").any():
        kinds = pd.Series(["retrieval"])
    return task_kind(str(kinds.mode().iloc[0])).primary_metric if len(kinds) else "accuracy"


def summarize(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Mean ± std over seeds per (dataset, method, K), as percentages.

    By default each dataset is summarised by its own primary metric (the ``metric`` column of
    its rows, e.g. balanced accuracy for PneumoniaMNIST); ``metric=`` names one for all. The
    ``metric`` column of the summary says which was used.
    """
    if metric is not None and metric not in table.columns:
        raise ConfigError(f"metric {metric!r} is not a column of the results; columns: {list(table.columns)}.")
    from .unlabeled import mark_transductive

    table = mark_transductive(table)   # transductive rows are their own group: "transclip [transductive]"
    # A table holding base-to-new or cross-dataset rows is summarised per protocol (and target dataset):
    # their scores are not comparable with the standard runs'. Standard tables keep their columns.
    keys = ["dataset"]
    if "protocol" in table.columns and table["protocol"].fillna("").isin(["base_to_new", "cross_dataset"]).any():
        table = table.assign(protocol=table["protocol"].fillna("").replace("", "default"))
        keys = ["dataset", "protocol"]
        if "eval_dataset" in table.columns:
            keys.append("eval_dataset")
            table = table.assign(eval_dataset=table["eval_dataset"].fillna(""))
    parts = []
    for key, rows in table.groupby(keys, sort=True):
        name = metric or _primary_metric(rows)
        if name not in rows.columns:
            raise ConfigError(f"dataset {key!r}: its primary metric {name!r} is not a column of the results; "
                              f"pass metric= one of {[c for c in SCALAR_METRICS if c in rows.columns]}.")
        g = rows.groupby([*keys, "method", "shots"])[name]
        part = pd.DataFrame({"mean": g.mean() * 100, "std": g.std(ddof=0).fillna(0.0) * 100, "runs": g.size()})
        part.insert(0, "metric", name)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*keys, "method", "shots", "metric", "mean", "std", "runs"])
    return pd.concat(parts).round(2).reset_index()

