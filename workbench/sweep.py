"""Sweeps: a grid of experiments (datasets × backbones × methods × shots × seeds), resumable.

``workbench sweep SPEC.yaml`` or ``workbench.sweep(spec)``::

    datasets: [pneumoniamnist_mini, whu_rs19_mini]
    backbones: [workbench-tiny]            # aliases, open_clip names, or {name: ..., pretrained: ...}
    methods: [zero_shot, linear_probe, {name: tip_adapter, params: {preset: eurosat}}]
    shots: [1, 4, 16]
    seeds: [1, 2, 3]
    output_dir: outputs/sweep
    workers: 2                             # local process pool (one torch thread per worker)
    engine: local                          # or dask (a LocalCluster, or dask_address of a running one)
    runner: function                       # or notebook: each cell is a papermill run of `notebook`

How it behaves:

* **One results table.** Each finished cell appends one tidy row (with its ``cell_id``) to
  ``output_dir/results.csv``; a failed cell goes to ``failures.csv`` with its error and does
  not stop the others. The parent process is the only writer, under a file lock, with a
  temporary file renamed into place, so a reader never sees half a table and two sweeps
  sharing a table do not clobber each other.
* **Resume.** Cells whose ``cell_id`` is already in the table are skipped, so a sweep killed
  midway continues where it stopped, with no duplicate and no lost row. Failed cells are
  retried.
* **Encode once.** Before any cell runs, every (backbone, dataset) pool — train, val and test
  images through the eval transform — is encoded once into the shared feature cache; every
  cell's support, validation and test features are slices of it. Augmented views are encoded
  per split (they depend on the split's seed), as the reference methods do.
* **Workers.** ``workers: 1`` runs in this process. More workers: a local process pool, each
  worker pinned to one torch thread so they do not oversubscribe the cores. For more than one
  machine, ``engine: dask`` sends the same cells to a Dask cluster (``dask_address``) or a
  ``LocalCluster``; Dask was chosen over Ray because it installs as a small pure-Python
  package, starts a local cluster in seconds (so CI tests it) and needs no separate runtime.
  Multi-GPU training of a single run (torchrun/accelerate) is not implemented: it would need
  the training loop to wrap the trainable module in DistributedDataParallel and shard the
  support batches, which few-shot runs rarely need.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .errors import ConfigError, did_you_mean
from .paths import resolve
from .progress import progress

SPEC_KEYS = {"datasets", "backbones", "methods", "shots", "seeds", "output_dir", "workers", "engine", "dask_address",
             "runner", "notebook", "device", "templates"}


@dataclass
class SweepSpec:
    datasets: list
    methods: list
    shots: list
    seeds: list
    backbones: list = field(default_factory=lambda: ["workbench-tiny"])
    output_dir: str = "outputs/sweep"
    workers: int = 1
    engine: str = "local"
    dask_address: str | None = None
    runner: str = "function"
    notebook: str = "00_quickstart.ipynb"
    device: str = "auto"
    templates: list | None = None

    def __post_init__(self):
        from .domains import spec_path
        from .methods import method_class

        for key in ("datasets", "methods", "shots", "seeds", "backbones"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value:
                raise ConfigError(f"sweep: '{key}' must be a non-empty list, got {value!r}.")
        self.methods = [m if isinstance(m, dict) else {"name": m} for m in self.methods]
        for m in self.methods:
            extra = sorted(set(m) - {"name", "params", "label"})
            if extra or "name" not in m:
                raise ConfigError(f"sweep: a method entry is a name or {{name, params, label}}; got {m!r}.")
            method_class(m["name"])
            if m.get("params"):
                method_class(m["name"])(**m["params"])  # unknown hyper-parameter -> clear error now
        self.backbones = [b if isinstance(b, dict) else {"name": b, "pretrained": ""} for b in self.backbones]
        for d in self.datasets:
            spec_path(d)
        if any(not isinstance(k, int) or k < 1 for k in self.shots):
            raise ConfigError(f"sweep: shots must be positive integers, got {self.shots!r}.")
        if self.engine not in ("local", "dask"):
            raise ConfigError(f"sweep: engine must be 'local' or 'dask', got {self.engine!r}.")
        if self.runner not in ("function", "notebook"):
            raise ConfigError(f"sweep: runner must be 'function' or 'notebook', got {self.runner!r}.")
        if self.runner == "notebook" and any(m.get("params") for m in self.methods):
            raise ConfigError("sweep: runner 'notebook' passes no method parameters; use runner 'function'.")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"sweep: workers must be a positive integer, got {self.workers!r}.")

    @classmethod
    def from_yaml(cls, path) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep spec {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sweep settings.")
        unknown = sorted(set(data) - SPEC_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {sorted(SPEC_KEYS)}."
                              + did_you_mean(unknown[0], SPEC_KEYS))
        for key in ("datasets", "methods", "shots", "seeds"):
            if key not in data:
                raise ConfigError(f"{path}: missing required key {key!r}.")
        return cls(**data)


def cells(spec: SweepSpec) -> list[dict]:
    """Every (dataset, backbone, method, K, seed) of the grid, each with a stable ``cell_id``."""
    out = []
    for d in spec.datasets:
        for b in spec.backbones:
            for m in spec.methods:
                for k in spec.shots:
                    for s in spec.seeds:
                        cell = {"dataset": d, "backbone": b["name"], "pretrained": b.get("pretrained") or "",
                                "method": m["name"], "method_label": m.get("label") or m["name"],
                                "params": m.get("params") or {}, "shots": k, "seed": s, "templates": spec.templates,
                                "runner": spec.runner}
                        key = json.dumps({k2: v for k2, v in cell.items()}, sort_keys=True, default=str)
                        cell["cell_id"] = hashlib.sha1(key.encode()).hexdigest()[:16]
                        out.append(cell)
    return out


# -- worker side --------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _worker_init(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")


def _backbone_and_cache(cell: dict, settings: dict):
    import workbench as wb

    key = (cell["backbone"], cell["pretrained"])
    if key not in _STATE:
        backbone = wb.load_backbone(cell["backbone"], cell["pretrained"] or None, device=settings["device"])
        cache = wb.FeatureCache(backbone, Path(settings["output_dir"]) / "features", show_progress=False)
        _STATE[key] = (backbone, cache)
    return _STATE[key]


def _dataset(name: str):
    from .domains import load_dataset

    key = ("dataset", name)
    if key not in _STATE:
        _STATE[key] = load_dataset(name)
    return _STATE[key]


def encode_pools(spec: SweepSpec, settings: dict) -> dict:
    """Encode every (backbone, dataset) pool once; returns images encoded per pool."""
    counts = {}
    for b in spec.backbones:
        for d in spec.datasets:
            cell = {"backbone": b["name"], "pretrained": b.get("pretrained") or ""}
            backbone, cache = _backbone_and_cache(cell, settings)
            before = cache.stats["images_encoded"]
            cache.pool(_dataset(d))
            counts[(b["name"], d)] = cache.stats["images_encoded"] - before
    return counts


def run_cell(cell: dict, settings: dict) -> dict:
    """Run one cell; never raises: returns {"cell_id", "status", "row" | "error", "encoded"}."""
    started = time.time()
    try:
        if cell["runner"] == "notebook":
            row = _run_cell_notebook(cell, settings)
            encoded = None
        else:
            from .experiment import run_experiment

            backbone, cache = _backbone_and_cache(cell, settings)
            dataset = _dataset(cell["dataset"])
            cache.pool(dataset)  # a disk hit after encode_pools: slices serve every request below
            before = cache.stats["images_encoded"]
            res = run_experiment(dataset, backbone, cell["method"], cell["shots"], cell["seed"], cache=cache,
                                 templates=cell["templates"], method_params=cell["params"] or None,
                                 split_dir=Path(settings["output_dir"]) / "splits", out_dir=settings["output_dir"])
            row = res.row
            encoded = cache.stats["images_encoded"] - before
        row = {**row, "method_label": cell["method_label"], "cell_id": cell["cell_id"]}
        return {"cell_id": cell["cell_id"], "status": "done", "row": row, "encoded": encoded,
                "seconds": time.time() - started}
    except Exception as err:  # recorded, and the sweep goes on
        return {"cell_id": cell["cell_id"], "status": "failed", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=6), "cell": cell, "seconds": time.time() - started}


def _run_cell_notebook(cell: dict, settings: dict) -> dict:
    import papermill as pm

    run_dir = Path(settings["output_dir"]) / "notebook_runs" / cell["cell_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = resolve("notebooks") / settings["notebook"]
    pm.execute_notebook(str(notebook), str(run_dir / notebook.name), cwd=str(run_dir), progress_bar=False,
                        parameters={"dataset": cell["dataset"], "backbone": cell["backbone"],
                                    "pretrained": cell["pretrained"], "shots": [cell["shots"]],
                                    "seeds": [cell["seed"]], "methods": [cell["method"]],
                                    "device": settings["device"], "output_dir": str(run_dir / "results")})
    table = pd.read_csv(run_dir / "results" / "results.csv")
    if len(table) != 1:
        raise RuntimeError(f"notebook run wrote {len(table)} rows, expected 1")
    return table.iloc[0].to_dict()


# -- the results table ------------------------------------------------------------------------

class ResultsTable:
    """``results.csv`` (+ ``failures.csv``) under a file lock, rewritten atomically."""

    def __init__(self, folder: Path):
        from filelock import FileLock

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "results.csv"
        self.failures = self.folder / "failures.csv"
        self.lock = FileLock(str(self.folder / ".results.lock"))

    def read(self) -> pd.DataFrame:
        return pd.read_csv(self.path) if self.path.exists() and self.path.stat().st_size else pd.DataFrame()

    def done_ids(self) -> set[str]:
        table = self.read()
        return set(table["cell_id"]) if "cell_id" in table else set()

    def _write(self, table: pd.DataFrame, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".table.", suffix=".tmp", dir=self.folder)
        with os.fdopen(fd, "w") as f:
            table.to_csv(f, index=False)
        os.replace(tmp, path)

    def append(self, row: dict) -> None:
        with self.lock:
            table = self.read()
            if "cell_id" in table and row["cell_id"] in set(table["cell_id"]):
                return  # another sweep sharing this table finished the same cell
            self._write(pd.concat([table, pd.DataFrame([row])], ignore_index=True), self.path)
            self._drop_failure(row["cell_id"])

    def record_failure(self, result: dict) -> None:
        with self.lock:
            old = pd.read_csv(self.failures) if self.failures.exists() else pd.DataFrame()
            cell = result["cell"]
            row = {"cell_id": result["cell_id"], "dataset": cell["dataset"], "backbone": cell["backbone"],
                   "method": cell["method_label"], "shots": cell["shots"], "seed": cell["seed"],
                   "error": result["error"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if "cell_id" in old:
                old = old[old["cell_id"] != row["cell_id"]]
            self._write(pd.concat([old, pd.DataFrame([row])], ignore_index=True), self.failures)

    def _drop_failure(self, cell_id: str) -> None:
        if self.failures.exists():
            old = pd.read_csv(self.failures)
            if "cell_id" in old and cell_id in set(old["cell_id"]):
                self._write(old[old["cell_id"] != cell_id], self.failures)


# -- the driver -------------------------------------------------------------------------------

@dataclass
class SweepSummary:
    table: pd.DataFrame
    done: int
    skipped: int
    failed: int
    errors: dict
    pool_encoded: int
    cell_encoded: int
    output_dir: Path

    def __repr__(self) -> str:
        return (f"SweepSummary(done={self.done}, skipped={self.skipped}, failed={self.failed}, "
                f"rows={len(self.table)}, images encoded={self.pool_encoded + self.cell_encoded}, "
                f"output_dir={str(self.output_dir)!r})")


def sweep(spec: SweepSpec | dict | str | os.PathLike, *, workers: int | None = None, engine: str | None = None,
          show_progress: bool = True, max_cells: int | None = None) -> SweepSummary:
    """Run (or resume) a sweep; see the module docstring. ``max_cells`` stops after that many new cells."""
    if isinstance(spec, (str, os.PathLike)):
        spec = SweepSpec.from_yaml(spec)
    elif isinstance(spec, dict):
        spec = SweepSpec(**spec)
    if workers is not None:
        spec = dataclasses.replace(spec, workers=workers)
    if engine is not None:
        spec = dataclasses.replace(spec, engine=engine)
    out = resolve(spec.output_dir)
    settings = {"output_dir": str(out), "device": spec.device, "notebook": spec.notebook}
    results = ResultsTable(out)
    (out / "sweep_spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1, default=str))
    grid = cells(spec)
    done_before = results.done_ids()
    todo = [c for c in grid if c["cell_id"] not in done_before]
    if max_cells is not None:
        todo = todo[:max_cells]
    skipped = len(grid) - len([c for c in grid if c["cell_id"] not in done_before])
    pool_encoded = sum(encode_pools(spec, settings).values()) if (todo and spec.runner == "function") else 0
    done = failed = cell_encoded = 0
    errors = {}
    bar = progress(total=len(todo), desc="sweep", unit="cell", disable=not show_progress)

    def collect(result):
        nonlocal done, failed, cell_encoded
        if result["status"] == "done":
            results.append(result["row"])
            done += 1
            cell_encoded += result.get("encoded") or 0
        else:
            results.record_failure(result)
            failed += 1
            errors[result["cell_id"]] = result["error"]
        bar.update(1)
        bar.set_postfix(done=done, failed=failed, refresh=False)

    if spec.engine == "dask":
        _run_dask(spec, todo, settings, collect)
    elif spec.workers == 1:
        for cell in todo:
            collect(run_cell(cell, settings))
    else:
        _run_pool(spec, todo, settings, collect)
    bar.close()
    summary = SweepSummary(table=results.read(), done=done, skipped=skipped, failed=failed, errors=errors,
                           pool_encoded=pool_encoded, cell_encoded=cell_encoded, output_dir=out)
    if show_progress:
        print(f"sweep: {done} done, {skipped} skipped (already in {results.path.name}), {failed} failed"
              + (f" — see {results.failures}" if failed else ""))
    return summary


def _run_pool(spec, todo, settings, collect) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // spec.workers)
    with ProcessPoolExecutor(max_workers=spec.workers, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(run_cell, cell, settings) for cell in todo]
        for fut in as_completed(futures):
            collect(fut.result())


def _run_dask(spec, todo, settings, collect) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("engine 'dask' needs dask.distributed: pip install -e '.[cluster]'.") from None
    cluster = None
    if spec.dask_address:
        client = Client(spec.dask_address)
    else:
        cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        client.run(_worker_init, 1)
        futures = client.map(run_cell, todo, settings=settings, pure=False)
        for fut in as_completed(futures):
            collect(fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
