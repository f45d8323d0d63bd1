"""The sweep driver: checks the spec and the devices, skips finished cells, encodes the pools once, runs
the rest here, on the local pool or on Dask, and is the only writer of the results table.

Part of :mod:`workbench.sweep`. It calls the other parts through their modules (``cell.encode_pools``,
``local._run_pool``, ...), so a test can replace one part alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, Interrupted
from ..paths import resolve
from ..progress import progress
from ..results import ResultsTable
from . import cell as _cell, dask as _dask, devices as _devices, local as _local, probe as _probe
from .devices import WorkerSlot
from .spec import SweepSpec, cells


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
          devices: list | str | None = None, show_progress: bool = True,
          max_cells: int | None = None, allow_notebook_outside: bool = False) -> SweepSummary:
    """Run (or resume) a sweep; see the module docstring. ``max_cells`` stops after that many new cells;
    ``workers``, ``engine`` and ``devices`` override the spec's. ``allow_notebook_outside``: run a
    ``runner: notebook`` sweep's notebook although it is not in ``notebooks/`` (never set by a spec file).

    Ctrl-C stops the workers and raises :class:`~workbench.errors.Interrupted` ("interrupted —
    rerun the same command to resume", with the count done); finished cells stay saved.
    """
    opt_in = {"allow_notebook_outside": True} if allow_notebook_outside else {}
    if isinstance(spec, (str, os.PathLike)):
        spec = SweepSpec.from_yaml(spec, **opt_in)
    elif isinstance(spec, dict):
        spec = SweepSpec(**{**spec, **opt_in})
    elif opt_in:
        spec = dataclasses.replace(spec, **opt_in)
    if workers is not None:
        spec = dataclasses.replace(spec, workers=workers)
    if engine is not None:
        spec = dataclasses.replace(spec, engine=engine)
    if devices is not None:
        spec = dataclasses.replace(spec, devices=devices)
    slots = _devices.device_slots(spec.devices) if spec.devices is not None else None  # a missing GPU fails here
    if slots is None and not spec.dask_address:   # workers: N on a GPU machine -> spread over its GPUs
        slots = _devices.spread_workers(spec.workers, spec.device)
    if slots and spec.dask_address:
        raise ConfigError("sweep: 'devices' pins the workers this sweep starts; a running cluster (dask_address) "
                          "has its own: start one worker per GPU there (e.g. dask-cuda-worker), and leave 'devices' "
                          "out.")
    out = resolve(spec.output_dir)
    # the parent encodes the pools: on the first listed device (not cuda:0, which may belong to someone else)
    parent_device = spec.device if not slots else (slots[0].label if slots[0].device != "cpu" else "cpu")
    settings = {"output_dir": str(out), "device": parent_device, "notebook": spec.notebook, "shots": spec.shots,
                "seeds": spec.seeds, "protocol": spec.protocol, "allow_notebook_outside": spec.allow_notebook_outside}
    results = ResultsTable(out)  # a folder that cannot be written fails here, before any work
    (out / "sweep_spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1, default=str))
    grid = cells(spec)
    done_before = results.done_ids()
    todo = [c for c in grid if c["cell_id"] not in done_before]
    if max_cells is not None:
        todo = todo[:max_cells]
    skipped = len(grid) - len([c for c in grid if c["cell_id"] not in done_before])
    done = failed = cell_encoded = 0
    errors = {}
    bar = progress(total=len(todo), desc="sweep", unit="cell", disable=not show_progress, leave=True)

    def collect(result):
        nonlocal done, failed, cell_encoded
        if result["status"] == "done":
            results.append(result["row"])
            done += 1
            cell_encoded += result.get("encoded") or 0
        else:
            results.record_failure(result["cell"], result["error"])
            failed += 1
            errors[result["cell_id"]] = result["error"]
        bar.update(1)
        bar.set_postfix(done=done, failed=failed, refresh=False)

    stack = contextlib.ExitStack()
    try:
        client = None
        if spec.engine == "dask" and todo:
            client = stack.enter_context(_dask._dask_client(spec, slots, settings))
            if spec.dask_address:  # before any encoding: a worker that cannot see the folders fails the sweep now
                _probe.check_shared_folders(client, _probe.shared_folders(spec, out),
                                     read_only=[d for d in spec.datasets if os.path.isabs(d)])
        load_errors: dict = {}
        if todo and spec.runner == "function":   # a method of another task kind: refused before any encoding
            _cell.check_task_kinds(spec, load_errors)
        pool_encoded = (sum(_cell.encode_pools(spec, settings, load_errors).values())
                        if (todo and spec.runner == "function") else 0)
        for cell in [c for c in todo if c["dataset"] in load_errors]:  # recorded, not run
            collect({"cell_id": cell["cell_id"], "status": "failed", "error": load_errors[cell["dataset"]],
                     "cell": cell})
        todo = [c for c in todo if c["dataset"] not in load_errors]
        if client is not None:
            _cell._release_models()
            _dask._run_dask(client, todo, settings, collect)
        elif slots is None and spec.workers == 1:
            for cell in todo:
                collect(_cell.run_cell(cell, settings))
        elif todo:
            _cell._release_models()
            _local._run_pool(slots or [WorkerSlot()] * spec.workers, todo, settings, collect)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted — rerun the same command to resume ({skipped + done} of {len(grid)} cells "
                          f"done, saved in {results.path}; {failed} failed).", skipped + done, len(grid),
                          results.path) from None
    finally:
        bar.close()
        stack.close()
    summary = SweepSummary(table=results.read(), done=done, skipped=skipped, failed=failed, errors=errors,
                           pool_encoded=pool_encoded, cell_encoded=cell_encoded, output_dir=out)
    if show_progress:
        print(f"sweep: {done} done, {skipped} skipped (already in {results.path.name}), {failed} failed"
              + (f" — see {results.failures}" if failed else ""))
    return summary
