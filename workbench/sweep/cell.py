"""Running one cell, in whichever process runs it: the process's backbones, feature caches, datasets and
encoded pools (kept in ``_STATE`` across the cells it runs), and the pools the parent encodes once.

Part of :mod:`workbench.sweep`.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import ConfigError
from .spec import check_name, notebook_path
from .worker import _worker_device, _worker_name, apply_decoder_budget

if TYPE_CHECKING:
    from .spec import SweepSpec

#: what this process has loaded, kept across the cells it runs: backbones, feature caches, datasets, pools
_STATE: dict[str, Any] = {}


def _backbone_and_cache(cell: dict, settings: dict, device: str | None = None):
    from ..backbones import load_backbone
    from ..features import FeatureCache

    key = ("backbone", cell["backbone"], cell["pretrained"], device or settings["device"])
    if key not in _STATE:
        _STATE[key] = load_backbone(cell["backbone"], cell["pretrained"] or None, device=key[3])
    backbone = _STATE[key]
    # one cache per (backbone, sweep folder): a later sweep in this process writes into its own folder
    features = Path(settings["output_dir"]) / "features"
    cache_key = ("cache", *key[1:], str(features))
    if cache_key not in _STATE:
        _STATE[cache_key] = FeatureCache(backbone, features, show_progress=False)
    return backbone, _STATE[cache_key]


def _dataset(name: str):
    from ..domains import load_dataset
    from .spec import is_pair_entry

    key = ("dataset", name)
    if key not in _STATE:
        if is_pair_entry(name):   # an image–text pair YAML: its cells run the retrieval protocol
            from ..data.pairs import load_pairs

            _STATE[key] = load_pairs(name)
        else:
            _STATE[key] = load_dataset(name)  # a YAML name, or a folder / CSV / .npz / YAML path
    return _STATE[key]


def pool_samples(dataset, shots, seeds, split_dir) -> list:
    """The images the cells read through the eval transform: every (K, seed) split's support and
    validation images, plus the test split — in the dataset's split order.

    The splits are drawn here (and saved in ``split_dir``), so the cells reuse the same files. A
    (K, seed) whose split cannot be drawn is left out: its cells meet the same error and record it.
    """
    from ..data.multilabel import is_multi_label, sample_multilabel_few_shot
    from ..data.sampling import sample_few_shot
    from ..errors import DataError

    # a multi-label dataset's cells draw the greedy K-positives split (the same files run_experiment reads)
    sample = sample_multilabel_few_shot if is_multi_label(dataset) else sample_few_shot
    wanted = {s.id for s in dataset.splits.get("test", [])}
    for k in shots:
        for seed in seeds:
            try:
                split = sample(dataset, k, seed, split_dir=split_dir)
            except (DataError, ConfigError):
                continue
            wanted.update(split.train_ids)
            wanted.update(split.val_ids)
    return [s for name in sorted(dataset.splits) for s in dataset.splits[name] if s.id in wanted]


def _pool(cache, dataset, settings: dict):
    """Encode (or load from the cache folder) the sweep's pool of ``dataset``: what its cells need."""
    if settings.get("protocol", "default") != "default" or dataset_kind(dataset) == "retrieval":
        return None  # see encode_pools; a pair dataset's cells encode their own images and captions
    key = ("pooled", id(cache), dataset.fingerprint())
    if key not in _STATE:  # once per process: the split files are read once, not once per cell
        samples = pool_samples(dataset, settings["shots"], settings["seeds"], Path(settings["output_dir"]) / "splits")
        _STATE[key] = cache.pool(dataset, samples)
    return _STATE[key]


def dataset_kind(dataset) -> str:
    """The task kind of a loaded dataset (:mod:`workbench.task_kinds`): its ``task``, single-label if none."""
    from ..task_kinds import task_kind

    return task_kind(getattr(dataset, "task", None) or "single_label").name


def check_task_kinds(spec: SweepSpec, load_errors: dict | None = None) -> dict:
    """Before any encoding: every method of the spec against the task kind of every dataset
    (:func:`~workbench.methods.registry.check_method_task`); returns {dataset: kind}.

    Loads the datasets (kept for the cells); one that cannot be loaded goes into ``load_errors``
    (its cells are recorded as failures by the driver). A method that does not support a dataset's
    kind is a ConfigError naming each such (dataset, method) pair and the methods that support the
    kind: a multi-label set needs multi-label methods, a pair set the retrieval ones.
    """
    from ..methods.registry import check_method_task

    load_errors = {} if load_errors is None else load_errors
    kinds, problems = {}, []
    for d in spec.datasets:
        if d in load_errors:
            continue
        try:
            dataset = _dataset(d)
        except Exception as err:
            load_errors[d] = f"{type(err).__name__}: dataset could not be loaded: {err}"
            continue
        kinds[d] = dataset_kind(dataset)
        if spec.protocol == "retrieval" and kinds[d] != "retrieval":
            problems.append(f"dataset {d!r} ({kinds[d]}): protocol 'retrieval' needs an image–text pair dataset "
                            "(a YAML under domains/*/pairs/, or one with task: retrieval).")
            continue
        for m in dict.fromkeys(m["name"] for m in spec.methods):
            if kinds[d] == "retrieval" and m == "zero_shot":
                continue   # the backbone as it is: scored on the pairs' retrieval
            try:
                check_method_task(m, kinds[d])
            except ConfigError as err:
                problems.append(f"dataset {d!r} ({kinds[d]}): {err}")
    if problems:
        raise ConfigError("sweep: some methods cannot run on some datasets' task kind (nothing was encoded); give "
                          "each kind its own sweep, or drop these methods:\n  " + "\n  ".join(problems))
    return kinds


def encode_pools(spec: SweepSpec, settings: dict, load_errors: dict | None = None) -> dict:
    """Encode every (backbone, dataset) pool once (the cells' K-shot images plus test); returns images
    encoded per pool.

    A dataset that cannot be loaded is not fatal: its reason goes into ``load_errors``
    (dataset -> "Error: message") and its cells are recorded as failures by the driver.
    """
    counts = {}
    load_errors = {} if load_errors is None else load_errors
    for d in spec.datasets:
        try:
            _dataset(d)
        except Exception as err:
            load_errors[d] = f"{type(err).__name__}: dataset could not be loaded: {err}"
    if settings.get("protocol", "default") != "default":
        return counts  # its cells read re-split or class-subset datasets, which a pool of this one cannot serve
    for b in spec.backbones:
        for d in spec.datasets:
            if d in load_errors or dataset_kind(_dataset(d)) == "retrieval":
                continue
            cell = {"backbone": b["name"], "pretrained": b.get("pretrained") or ""}
            backbone, cache = _backbone_and_cache(cell, settings)
            before = cache.stats["images_encoded"]
            _pool(cache, _dataset(d), settings)
            counts[(b["name"], d)] = cache.stats["images_encoded"] - before
    return counts


def run_cell(cell: dict, settings: dict) -> dict:
    """Run one cell; never raises: returns {"cell_id", "status", "row" | "error", "encoded"}.

    The row records the ``device`` the cell ran on and the ``worker`` (host:pid) that ran it.
    """
    started = time.time()
    try:
        apply_decoder_budget()   # a pool worker's share of the cores for DataLoader decoders
        device, label = _worker_device(settings)
        if cell["runner"] == "notebook":
            row = _run_cell_notebook(cell, {**settings, "device": device})
            encoded = None
        else:
            from ..experiment import run_experiment

            backbone, cache = _backbone_and_cache(cell, settings, device)
            label = label or str(backbone.device)
            dataset = _dataset(cell["dataset"])
            check_name(dataset.name, f"dataset {cell['dataset']!r}: its name")   # run folders are named by it
            _pool(cache, dataset, settings)  # a disk hit after encode_pools: slices serve every request below
            before = cache.stats["images_encoded"]
            try:
                if cell.get("protocol") == "retrieval":   # one row of the same results table (workbench.record)
                    from ..retrieval_runs import check_retrieval_methods, retrieval_run

                    check_retrieval_methods(dataset, [cell["method"]])
                    row = retrieval_run(dataset, backbone, cell["method"], cell["seed"], params=cell["params"],
                                        cache=cache, out_dir=settings["output_dir"])
                elif cell.get("protocol") == "base_to_new":
                    from ..protocols import base_to_new_row

                    row = base_to_new_row(dataset, backbone, cell["method"], cell["shots"], cell["seed"], cache=cache,
                                          templates=cell["templates"], method_params=cell["params"] or None,
                                          split_dir=Path(settings["output_dir"]) / "splits",
                                          out_dir=settings["output_dir"])
                else:
                    row = run_experiment(dataset, backbone, cell["method"], cell["shots"], cell["seed"], cache=cache,
                                         templates=cell["templates"], method_params=cell["params"] or None,
                                         split_dir=Path(settings["output_dir"]) / "splits", out_dir=settings["output_dir"],
                                         protocol=cell.get("protocol", "default"), unlabeled=cell.get("unlabeled")).row
            finally:
                cache.clear_views()   # augmented views are this cell's alone; eval features and pools stay
            encoded = cache.stats["images_encoded"] - before
        row = {**row, "method_label": cell["method_label"], "cell_id": cell["cell_id"], "device": label or device,
               "worker": _worker_name()}
        return {"cell_id": cell["cell_id"], "status": "done", "row": row, "encoded": encoded,
                "seconds": time.time() - started}
    except Exception as err:  # recorded, and the sweep goes on
        return {"cell_id": cell["cell_id"], "status": "failed", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=6), "cell": cell, "seconds": time.time() - started}


def _run_cell_notebook(cell: dict, settings: dict) -> dict:
    import papermill as pm

    run_dir = Path(settings["output_dir"]) / "notebook_runs" / cell["cell_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = notebook_path(settings["notebook"], settings.get("allow_notebook_outside", False))
    pm.execute_notebook(str(notebook), str(run_dir / notebook.name), cwd=str(run_dir), progress_bar=False,
                        parameters={"dataset": cell["dataset"], "backbone": cell["backbone"],
                                    "pretrained": cell["pretrained"], "shots": [cell["shots"]],
                                    "seeds": [cell["seed"]], "methods": [cell["method"]],
                                    "device": settings["device"], "output_dir": str(run_dir / "results")})
    table = pd.read_csv(run_dir / "results" / "results.csv")
    if len(table) != 1:
        raise RuntimeError(f"notebook run wrote {len(table)} rows, expected 1")
    return table.iloc[0].to_dict()



def _release_models() -> None:
    """Drop this process's backbones and pools once the cells run in workers: the GPU memory the
    pools were encoded with goes back to the worker pinned to that GPU."""
    for key in [k for k in _STATE if k[0] in ("backbone", "cache", "pooled")]:
        del _STATE[key]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
