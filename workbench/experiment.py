"""Run one experiment — (dataset, backbone, method, K, seed) — and record it honestly.

A result is one tidy row (dataset, domain, backbone, method, K, seed, metrics, timings,
skipped-image count) plus a provenance record saved as JSON beside it: package versions,
torch/CUDA, device, git revision, the split file's hash and ids, templates, the method's
configuration and what its fitting chose.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .data.dataset import Dataset
from .data.sampling import sample_few_shot
from .errors import ConfigError
from .features import FeatureCache
from .methods import get_method, method_class
from .methods.base import Method
from .metrics import SCALAR_METRICS, compute_metrics
from .progress import progress
from .task import FewShotTask

RESULT_COLUMNS = ["dataset", "domain", "backbone", "pretrained", "method", "shots", "seed", *SCALAR_METRICS,
                  "n_test", "fit_seconds", "predict_seconds", "skipped_images", "run_id"]


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment_info(device: torch.device | None = None) -> dict:
    """Versions and hardware, for the provenance record."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("workbench", "torch", "torchvision", "open_clip_torch", "numpy", "scikit-learn", "pandas", "peft",
                "datasets", "transformers"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "git_revision": _git_revision(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
    return info


@dataclass
class RunResult:
    row: dict
    record: dict
    method: Method
    logits: torch.Tensor
    labels: torch.Tensor
    model_dir: Path | None = None   # where save_model=True wrote the predictor (workbench.load(model_dir))

    def __repr__(self) -> str:
        return f"RunResult({self.row['method']}, K={self.row['shots']}, seed={self.row['seed']}, acc={self.row['accuracy']:.4f})"


def _as_method(method: str | Method, params: dict | None) -> Method:
    if isinstance(method, Method):
        if params:
            raise ConfigError("pass method parameters either in the Method object or in method_params, not both.")
        return method
    return get_method(method, **(params or {}))


def run_experiment(dataset: Dataset, backbone, method: str | Method, shots: int, seed: int, *,
                   cache: FeatureCache | None = None, templates: Sequence[str] | None = None,
                   method_params: dict | None = None, split_dir=None, out_dir=None, domain: str | None = None,
                   save_model: bool = False) -> RunResult:
    """Sample (or reuse) the K-shot split, fit on it, evaluate on the whole test split."""
    method = _as_method(method, method_params)
    cache = cache or FeatureCache(backbone)
    split = sample_few_shot(dataset, shots, seed, split_dir=split_dir)
    templates = list(templates or dataset.templates or ["a photo of a {}."])
    task = FewShotTask(dataset, split, backbone, cache, templates=templates)

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    method.fit(task)
    fit_seconds = time.perf_counter() - t0

    encoder = method.image_backbone(backbone)
    if encoder is backbone:
        test = cache.get(dataset, dataset.split("test"), desc="test")
    else:  # the method adapted the image encoder: its features are its own (kept in memory only)
        test = FeatureCache(encoder, None, batch_size=cache.batch_size, num_workers=cache.num_workers,
                            show_progress=cache.show_progress).get(dataset, dataset.split("test"), desc="test (adapted)")
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = method.predict_logits(test.x).float()
    predict_seconds = time.perf_counter() - t0
    metrics = compute_metrics(logits, test.labels, dataset.n_classes)

    skipped = dataset.skipped + task.skipped + test.skipped
    run_id = f"{dataset.name}-{method.name}-K{shots}-s{seed}-" + hashlib.sha1(
        json.dumps([backbone.provenance_id, split.sha, method.describe()["config"], templates],
                   sort_keys=True, default=str).encode()).hexdigest()[:8]
    row = {"dataset": dataset.name, "domain": domain or dataset.domain or "", "backbone": backbone.name,
           "pretrained": backbone.pretrained or "", "method": method.name, "shots": shots, "seed": seed,
           **{k: metrics[k] for k in SCALAR_METRICS}, "n_test": len(test), "fit_seconds": fit_seconds,
           "predict_seconds": predict_seconds, "skipped_images": len(skipped), "run_id": run_id}
    record = {
        "run_id": run_id, "row": row, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "source": dataset.source,
                    "class_ids": dataset.class_ids, "class_names": dataset.class_names, "notes": dataset.notes,
                    "sizes": {k: len(v) for k, v in dataset.splits.items()}},
        "split": {"sha": split.sha, "shots": shots, "seed": seed, "val_shots": split.val_shots,
                  "val_source": split.val_source, "train_ids": split.train_ids, "val_ids": split.val_ids,
                  "shortfalls": split.shortfalls},
        "templates": templates, "backbone": backbone.provenance(), "method": method.describe(),
        "metrics": metrics, "skipped": skipped, "environment": environment_info(backbone.device),
    }
    model_dir = None
    if save_model and out_dir is None:
        raise ConfigError("save_model=True needs an out_dir to save the model in.")
    if out_dir is not None:
        run_dir = Path(out_dir) / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "provenance.json").write_text(json.dumps(record, indent=1, default=str))
        if save_model:
            from .predictor import Predictor

            model_dir = Predictor(backbone, method, templates=templates,
                                  metrics={k: metrics[k] for k in SCALAR_METRICS}).save(run_dir / "model")
    return RunResult(row=row, record=record, method=method, logits=logits, labels=test.labels, model_dir=model_dir)


def compare(dataset: Dataset, backbone, methods: Sequence[str], shots: Sequence[int], seeds: Sequence[int], *,
            cache: FeatureCache | None = None, templates: Sequence[str] | None = None,
            method_params: dict | None = None, split_dir=None, out_dir=None, domain: str | None = None) -> pd.DataFrame:
    """Every (method, K, seed) on one dataset; returns the tidy results table (one row per run).

    ``method_params`` maps a method name to its parameters. Rows are also appended to
    ``out_dir/results.csv`` when ``out_dir`` is given.
    """
    for m in methods:
        method_class(m)  # fail on a misspelt name before any work
    unknown = sorted(set(method_params or {}) - set(methods))
    if unknown:
        raise ConfigError(f"method_params names {unknown}, which are not among the methods {list(methods)}.")
    cache = cache or FeatureCache(backbone)
    rows = []
    cells = [(m, k, s) for k in shots for s in seeds for m in methods]
    for m, k, s in progress(cells, desc=f"{dataset.name}: runs", unit="run"):
        res = run_experiment(dataset, backbone, m, k, s, cache=cache, templates=templates,
                             method_params=(method_params or {}).get(m), split_dir=split_dir, out_dir=out_dir,
                             domain=domain)
        rows.append(res.row)
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if out_dir is not None:
        append_results(table, Path(out_dir) / "results.csv")
    return table


def append_results(table: pd.DataFrame, path: Path) -> None:
    """Merge rows into a CSV results table: a rerun of the same run (same ``run_id``) replaces its row.

    Written to a temporary file and renamed, so a reader never sees half a table.
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        old = pd.read_csv(path)
        table = pd.concat([old[~old["run_id"].isin(table["run_id"])], table], ignore_index=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        table.to_csv(f, index=False)
    os.replace(tmp, path)


def summarize(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Mean ± std over seeds per (dataset, method, K), as percentages."""
    if metric not in table.columns:
        raise ConfigError(f"metric {metric!r} is not a column of the results; columns: {list(table.columns)}.")
    g = table.groupby(["dataset", "method", "shots"])[metric]
    out = pd.DataFrame({"mean": g.mean() * 100, "std": g.std(ddof=0).fillna(0.0) * 100, "runs": g.size()})
    return out.round(2).reset_index()

