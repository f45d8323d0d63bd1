"""What every run's record shares, whichever protocol made it: the result columns, the K-shot
validation scores and the environment (versions, hardware, git revision) of the provenance record.

It sits below :mod:`workbench.experiment` and :mod:`workbench.protocols`, which both build rows
and records from these pieces (before, each imported the other: the only import circle).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .features import FeatureCache
from .unlabeled import UNLABELED_COLUMNS
from .metrics import SCALAR_METRICS, compute_metrics

if TYPE_CHECKING:
    from .data.dataset import Dataset
    from .methods.base import Method
    from .task import FewShotTask

#: columns only some protocols fill (empty / NaN in the others; see workbench.protocols)
PROTOCOL_COLUMNS = ["eval_dataset", "eval_classes", "budget", "allocation", "base_accuracy", "new_accuracy", "hm",
                    "note",
                    # retrieval (image–text pairs, workbench.retrieval): recalls x100 and caption counts
                    "mean_recall", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "n_captions",
                    "captions_truncated"]


# ``metric`` is the dataset's primary metric (its YAML's ``metric:``), which summaries use by default.
# ``val_*``: the same scores on the run's K-shot validation images (what wb.report.choose_on_validation uses).
# ``val_tuned``: the method read those images while fitting (chose β/α, C, epochs, WiSE-FT α on them), so its
# ``val_*`` scores are optimistic — the "validation illusion"; ``recommend`` estimates out of fold instead.
VAL_COLUMNS = [f"val_{m}" for m in SCALAR_METRICS if m != "ece"]
# ``protocol``: "default" (leak-free) or "paper" (the dataset YAML's paper_protocol, see run_settings),
# "base_to_new" or "cross_dataset" (see workbench.protocols).
RESULT_COLUMNS = ["dataset", "domain", "backbone", "pretrained", "method", "shots", "seed", "protocol", "metric",
                  *SCALAR_METRICS,
                  *VAL_COLUMNS, "val_tuned", "n_classes", "n_test", "fit_seconds", "predict_seconds", "skipped_images", "run_id"]
# PROTOCOL_COLUMNS: what only some protocols fill (base-to-new scores, the cross-dataset target, the budget
# mode), see workbench.protocols; empty / NaN in the other rows and in tables written before they existed.
# A results table (compare, sweep): each run's row plus the key it is resumed by (see results.py).
# UNLABELED_COLUMNS: which unlabeled images the method used and whether it was transductive (workbench.unlabeled).
TABLE_COLUMNS = [*RESULT_COLUMNS, *PROTOCOL_COLUMNS, *UNLABELED_COLUMNS, "method_label", "cell_id"]


@functools.lru_cache(maxsize=1)
def _git_revision() -> str | None:
    """HEAD and whether tracked files differ from it; once per process (every run records it).

    The nbstripout clean filter is bypassed (``cat``): committed notebooks are stripped, so the
    raw file equals the index blob unless it really changed, and starting Python for every
    notebook on every ``git status`` cost seconds per run.
    """
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-c", "filter.nbstripout.clean=cat", "-c", "filter.nbstripout.smudge=cat",
                                "status", "--porcelain", "--untracked-files=no"], cwd=here,
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


def _validation_logits(method: Method, task: FewShotTask, dataset: Dataset, adapted_encoder,
                       cache: FeatureCache, samples=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fitted method's logits on the K-shot validation images (None when the split has none).

    Fitting may have used these images to choose hyper-parameters, so scores on them are
    optimistic (the row's ``val_tuned`` says so); they are still blind to the test split, which
    makes them a test-free basis for choosing *between* methods. ``samples`` (default: the
    task's validation images) are the calibration images held out of fitting, for conformal sets.
    A method that adapted the image encoder is scored on its own features.
    """
    held_out = samples is not None
    samples = task.val_samples() if samples is None else samples
    if not samples:
        return None
    if adapted_encoder is None:
        val = cache.get(dataset, samples, desc="calibration") if held_out else task.validation()
    else:
        val = FeatureCache(adapted_encoder, None, batch_size=cache.batch_size, num_workers=cache.num_workers,
                           show_progress=False).get(dataset, samples, desc="validation (adapted)")
    with torch.no_grad():
        logits = method.predict_logits(val.x if method.normalized_input else val.raw.mean(0)).float()
    return logits, val.labels


def _validation_scores(val: tuple[torch.Tensor, torch.Tensor] | None, n_classes: int) -> dict:
    if val is None:
        return {c: float("nan") for c in VAL_COLUMNS}
    scores = compute_metrics(val[0], val[1], n_classes)
    return {c: scores[c[len("val_"):]] for c in VAL_COLUMNS}


@dataclass
class RunResult:
    row: dict
    record: dict
    method: Method
    logits: torch.Tensor
    labels: torch.Tensor
    model_dir: Path | None = None   # where save_model=True wrote the predictor (workbench.load(model_dir))
    test_ids: list | None = None    # the test images of logits' rows, in order (subgroup audits: workbench.audit)

    def __repr__(self) -> str:
        r = self.row
        metric = r.get("metric") or "accuracy"
        val = r.get(f"val_{metric}")
        val_text = f", K-shot val {100 * val:.1f}%" if isinstance(val, (int, float)) and val == val else ""
        saved = f"; model in {self.model_dir}" if self.model_dir else ""
        return (f"RunResult({r['method']} on {r['dataset']} with {r['backbone']} "
                f"({r.get('pretrained') or 'random weights'}), K={r['shots']}, seed={r['seed']}: test "
                f"{metric.replace('_', ' ')} {100 * r.get(metric, float('nan')):.1f}%{val_text}{saved})")
