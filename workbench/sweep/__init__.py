"""Sweeps: a grid of experiments (datasets × backbones × methods × shots × seeds), resumable.

``workbench sweep SPEC.yaml`` or ``workbench.sweep(spec)``::

    datasets: [pneumoniamnist_mini, data/my_images/, my_set.csv]   # YAML names, or folder/CSV/.npz/YAML paths
    backbones: [workbench-tiny-scenes]     # aliases, open_clip names, or {name: ..., pretrained: ...}
    methods: [zero_shot, linear_probe, {name: tip_adapter, params: {init_alpha: 2.0}}]  # + the YAML's method_presets
    shots: [1, 4, 16]
    seeds: [1, 2, 3]
    output_dir: outputs/sweep
    workers: 2                             # local worker processes (one torch thread per worker)
    devices: [0, 1]                        # or "all": one worker per GPU, each pinned to its GPU
    engine: local                          # or dask (a LocalCluster, or dask_address of a running one)
    runner: function                       # or notebook: each cell is a papermill run of `notebook`
    unlabeled: test                        # images nobody labelled, for transclip / tda (see workbench.unlabeled)
    protocol: default                      # or paper, base_to_new, retrieval (pair datasets run it anyway)

Task kinds: every method is checked against every dataset's kind (:mod:`workbench.task_kinds`) before
any encoding; a multi-label dataset's cells use its greedy K-positives splits and keep its columns; a pair
dataset (``domains/*/pairs/*.yaml``) runs one ``retrieval`` row per (backbone, method, seed) in the same table.

How it behaves:

* **One results table.** Each finished cell appends one tidy row (with its ``cell_id``) to
  ``output_dir/results.csv``; a failed cell goes to ``failures.csv`` with its error and does
  not stop the others. The parent process is the only writer, under a file lock, with a
  temporary file renamed into place, so a reader never sees half a table and two sweeps
  sharing a table do not clobber each other.
* **Resume.** Cells whose ``cell_id`` is already in the table are skipped, so a sweep killed
  midway continues where it stopped, with no duplicate and no lost row. Failed cells are
  retried. ``compare()`` keys its runs the same way (:mod:`workbench.results`), so the two
  share a table.
* **Faults.** The whole spec is checked before any cell runs (names, YAML schemas, paths that
  exist, integer seeds, positive integer shots, method parameters), and so is the results
  folder's writability. A dataset that cannot be loaded fails its own cells (with the reason
  in ``failures.csv``), not the sweep; a ``failures.csv`` that cannot be written (full disk)
  is a warning; a row cut short in ``results.csv`` is dropped with a warning and recomputed.
  Ctrl-C stops the workers and raises :class:`~workbench.errors.Interrupted` ("interrupted —
  rerun the same command to resume"); worker processes die with the sweep even on SIGKILL.
* **Encode once, only what the cells need.** Before any cell runs, the K-shot splits of the
  grid's shots × seeds are drawn (and saved in ``output_dir/splits``), and for every
  (backbone, dataset) the union of their support and validation images plus the test split is
  encoded once into the shared feature cache — not every image of every split. Every cell's
  support, validation and test features are slices of it. Augmented views are encoded per
  split (they depend on the split's seed), as the reference methods do.
* **Workers.** ``workers: 1`` runs in this process. More workers: local worker processes, each
  pinned to one torch thread so they do not oversubscribe the cores. A worker process that dies
  mid-cell (killed, out of host memory) is replaced; its cell is retried once on the new worker,
  and if that worker dies too the cell is recorded in ``failures.csv`` ("worker process lost");
  only the parent writes rows, so a lost worker never leaves a duplicate or half row. Each local
  worker may start DataLoader decoder processes up to its share of the cores this process may use
  (its CPU affinity, not ``os.cpu_count()``; see :func:`workbench.distributed.decoder_budget`).
* **GPUs.** ``devices: [0, 1]`` (or ``"all"``) runs one worker per GPU, each pinned to its GPU
  (``CUDA_VISIBLE_DEVICES`` set in the worker before torch initialises CUDA, and the backbone
  loaded on ``cuda:0`` of what it sees); every row records its ``device`` (``cuda:1``: the index
  in this process's numbering) and ``worker`` (host:pid). A GPU that is not visible is a
  ConfigError listing the visible ones, before any work. ``engine: dask`` with ``devices`` uses
  dask-cuda's ``LocalCUDACluster`` when installed, else starts one local Dask worker per GPU
  with its own ``CUDA_VISIBLE_DEVICES``. Entries ``cpu`` / ``cpu:N`` make CPU workers with
  distinct labels (a machine without GPUs can rehearse a GPU sweep; the tests do). ``workers: N``
  without ``devices`` on several visible GPUs spreads the workers over them (one GPU: shared, with
  a warning). A worker whose pinning cannot take, because CUDA started in it before
  ``CUDA_VISIBLE_DEVICES`` was set (a top-level ``torch.cuda`` call in the script every spawned
  worker re-imports), stops the sweep with a ConfigError saying so.
* **Nothing from the spec runs or writes outside.** ``runner: notebook`` runs only notebooks in
  ``notebooks/`` unless the user opts in (``allow_notebook_outside=True``; a spec file cannot), and
  names that become paths (a dataset YAML's ``name``, a method ``label``) must be one path
  component, so no written file leaves ``output_dir``.
* **Clusters.** ``engine: dask`` sends the cells to a ``LocalCluster`` or, with
  ``dask_address``, to a running cluster. Its workers read and write the feature cache
  (``output_dir/features``), the split files (``output_dir/splits``) and the per-run records
  (``output_dir/runs``), and read dataset paths, so on several machines these must be on
  storage every worker sees at the same path (NFS, a shared volume). The sweep checks that
  first: the client writes a marker in each folder, every worker reads it and writes its own,
  the client reads those back; a worker that cannot is a ConfigError naming the folder and the
  worker, before any encoding. A lost Dask worker's cell is rescheduled by Dask (up to its
  ``allowed-failures``), then recorded as failed. Dask was chosen over Ray because it installs
  as a small pure-Python package, starts a local cluster in seconds (so CI tests it) and needs
  no separate runtime.

The parts, each a module of this package: :mod:`.spec` (the spec and its grid), :mod:`.devices` (which
device each worker gets), :mod:`.worker` (a worker process's setup), :mod:`.cell` (running one cell and
the pools it reads), :mod:`.local` (the local process pool), :mod:`.dask` (the Dask engine),
:mod:`.probe` (the shared-folder check) and :mod:`.driver` (:func:`sweep` itself). The names below
are re-exported for ``from workbench.sweep import ...``; to replace a part (in a test), patch it in
its own module (``workbench.sweep.cell.encode_pools``), which is where the driver looks it up.
"""
from __future__ import annotations

from .cell import encode_pools, pool_samples, run_cell
from .devices import WorkerSlot, device_slots, visible_gpus
from .driver import SweepSummary, sweep
from .local import worker_pool
from .probe import PROBE_PREFIX, check_shared_folders, shared_folders
from .spec import DATA_SUFFIXES, SPEC_KEYS, SweepSpec, cells
from .worker import DEVICE_ENV, LABEL_ENV, die_with_parent

__all__ = ["DATA_SUFFIXES", "DEVICE_ENV", "LABEL_ENV", "PROBE_PREFIX", "SPEC_KEYS", "SweepSpec", "SweepSummary",
           "WorkerSlot", "cells", "check_shared_folders", "device_slots", "die_with_parent", "encode_pools",
           "pool_samples", "run_cell", "shared_folders", "sweep", "visible_gpus", "worker_pool"]
