"""Run one multi-label experiment: the ``task: multi_label`` branch of :func:`workbench.run_experiment`.

Same contract as the single-label run (greedy K-positives split written to a file, fit on the
support + K-shot validation images only, test encoded separately, one results row plus a
provenance record), with the multi-label metrics of :func:`workbench.metrics.compute_multilabel_metrics`:
the row's ``macro_auroc`` (the kind's primary metric), ``macro_f1`` and ``ece`` fill the shared
columns, ``micro_auroc`` / ``mAP`` / ``macro_sensitivity`` / ``macro_specificity`` are added, and
``accuracy`` / ``balanced_accuracy`` are NaN (a set of findings has no single "correct" label).
Per-finding lists (AUROC, AP, F1, sensitivity, specificity, ECE, the thresholds chosen on the K-shot
validation set) go to ``record["metrics"]``. ``group_audit`` rows come from :mod:`workbench.audit`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .metrics import MULTILABEL_SCALARS, SCALAR_METRICS, compute_multilabel_metrics

#: the shared row columns a multi-label run leaves empty (they need one label per image)
SINGLE_LABEL_ONLY = ("accuracy", "balanced_accuracy")


def run_multilabel_experiment(dataset, backbone, method, shots: int, seed: int, *, cache, templates, split_dir,
                              out_dir, domain, save_model: bool, settings, protocol: str = "default"):
    from .data.multilabel import sample_multilabel_few_shot
    from .record import RunResult, VAL_COLUMNS, environment_info
    from .features import FeatureCache
    from .methods.registry import check_method_task
    from .task import FewShotTask

    check_method_task(method.name, "multi_label")
    cache = cache or FeatureCache(backbone)
    split = sample_multilabel_few_shot(dataset, shots, seed, split_dir=split_dir)
    templates = list(templates or settings.templates or dataset.templates or ["a photo of a {}."])
    task = FewShotTask(dataset, split, backbone, cache, templates=templates)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    method.fit(task)
    fit_seconds = time.perf_counter() - t0
    test_samples = dataset.split("test")
    test = cache.get(dataset, test_samples, desc="test")
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = method.predict_logits(test.x).float()
    predict_seconds = time.perf_counter() - t0
    by_id = {s.id: s.targets for s in test_samples}
    targets = torch.tensor([by_id[i] for i in test.ids], dtype=torch.long)
    thresholds = method.fit_info.get("thresholds")
    metrics = compute_multilabel_metrics(logits, targets, thresholds, finding_names=dataset.class_names)
    val_feats = task.validation()
    val_scores = {c: float("nan") for c in VAL_COLUMNS}
    if val_feats is not None and len(val_feats):
        with torch.no_grad():
            vm = compute_multilabel_metrics(method.predict_logits(val_feats.x).float(),
                                            task.targets_for(val_feats.ids), thresholds)
        val_scores.update({c: vm[c[4:]] for c in VAL_COLUMNS if c[4:] in vm})
    skipped = dataset.skipped + task.skipped + test.skipped
    run_id = f"{dataset.name}-{method.name}-K{shots}-s{seed}-" + hashlib.sha1(json.dumps(
        [backbone.provenance_id, split.sha, method.describe()["config"], templates], sort_keys=True,
        default=str).encode()).hexdigest()[:8]
    scalars = {k: (float("nan") if k in SINGLE_LABEL_ONLY else metrics[k]) for k in SCALAR_METRICS}
    row = {"dataset": dataset.name, "domain": domain or dataset.domain or "", "backbone": backbone.name,
           "pretrained": backbone.pretrained or "", "method": method.name, "shots": shots, "seed": seed,
           "protocol": protocol, "metric": getattr(dataset, "metric", None) or "macro_auroc", **scalars,
           **{k: metrics[k] for k in MULTILABEL_SCALARS if k not in scalars}, **val_scores,
           "task": "multi_label", "n_classes": dataset.n_classes, "n_test": len(test), "fit_seconds": fit_seconds,
           "predict_seconds": predict_seconds, "skipped_images": len(skipped), "run_id": run_id}
    record = {
        "run_id": run_id, "row": row, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "task": "multi_label",
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "source": dataset.source,
                    "class_ids": dataset.class_ids, "class_names": dataset.class_names, "notes": dataset.notes,
                    "sizes": {k: len(v) for k, v in dataset.splits.items()}},
        "split": {"sha": split.sha, "shots": shots, "seed": seed, "val_shots": split.val_shots,
                  "val_source": split.val_source, "train_ids": split.train_ids, "val_ids": split.val_ids,
                  "sampling": "greedy: >= K positives per finding", "positives_per_finding": split.per_class,
                  "shortfalls": split.shortfalls},
        "protocol": settings.record, "templates": templates, "backbone": backbone.provenance(),
        "method": method.describe(), "metrics": metrics, "skipped": skipped,
        "environment": environment_info(backbone.device),
    }
    model_dir = None
    from .distributed import is_main_process

    if out_dir is not None and is_main_process():
        run_dir = Path(out_dir) / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "provenance.json").write_text(json.dumps(record, indent=1, default=str))
        if save_model:
            from .predictor import Predictor

            model_dir = Predictor(backbone, method, templates=templates,
                                  metrics={k: metrics[k] for k in MULTILABEL_SCALARS}).save(run_dir / "model")
    return RunResult(row=row, record=record, method=method, logits=logits, labels=targets, model_dir=model_dir,
                     test_ids=list(test.ids))
