"""The shared-folder probe: before a multi-machine Dask sweep encodes anything, prove that every worker
reads and writes the sweep's folders at the same path as this machine.

Part of :mod:`workbench.sweep`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .worker import _worker_name

if TYPE_CHECKING:
    from .spec import SweepSpec


def shared_folders(spec: SweepSpec, out: Path) -> dict[str, Path]:
    """The folders every worker of a multi-machine cluster must see, read and write, at the same path."""
    return {"results folder (output_dir)": out, "feature cache (output_dir/features)": out / "features",
            "split files (output_dir/splits)": out / "splits"}


PROBE_PREFIX = ".workbench-probe-"


def _probe_folder(folder: str, token: str) -> tuple[str | None, str | None]:
    """On a worker: read the client's marker in ``folder`` and write this worker's own.

    Returns (problem or None, the name of the marker this worker wrote or None).
    """
    path = Path(folder)
    marker = path / f"{PROBE_PREFIX}{token}"
    try:
        if marker.read_text() != token:
            return "sees another file where the client's marker should be (not the same storage)", None
    except OSError as err:
        return f"cannot read the client's marker file there ({type(err).__name__}: {err.strerror or err})", None
    mine = f"{PROBE_PREFIX}{token}-{_worker_name().replace(':', '-')}"
    try:
        (path / mine).write_text(token)
    except OSError as err:
        return f"cannot write there ({type(err).__name__}: {err.strerror or err})", None
    return None, mine


def _probe_worker(folders: dict[str, str], token: str, read_only: list[str] = ()) -> dict:
    report = {name: _probe_folder(folder, token) for name, folder in folders.items()}
    for path in read_only:  # dataset paths: read by the workers only
        report[f"dataset {path!r}"] = (None if os.path.exists(path) else "does not exist on this worker", None)
    return report


def check_shared_folders(client, folders: dict[str, Path], read_only: list[str] = ()) -> None:
    """Prove that every worker reads and writes ``folders`` as this process does; else a ConfigError
    naming each folder and worker, before any work (see the module docstring)."""
    import uuid

    token = uuid.uuid4().hex
    written = []
    try:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{PROBE_PREFIX}{token}").write_text(token)
            written.append(folder / f"{PROBE_PREFIX}{token}")
        answers = client.run(_probe_worker, {n: str(f) for n, f in folders.items()}, token, list(read_only))
        problems = []
        for worker, report in sorted(answers.items()):
            for name, (problem, mine) in report.items():
                if mine is not None:
                    back = folders[name] / mine
                    written.append(back)
                    try:
                        ok = back.read_text() == token
                    except OSError:
                        ok = False
                    if not ok:
                        problem = "writes files there that this machine does not see (not the same storage)"
                if problem:
                    where = f"{name} {str(folders[name])!r}" if name in folders else name
                    problems.append(f"worker {worker}: {where}: {problem}")
    finally:
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
    if problems:
        raise ConfigError("sweep: the Dask workers must see the sweep's folders at the same path as this machine — "
                          "the feature cache (output_dir/features), the split files (output_dir/splits) and the "
                          "results folder (output_dir, with runs/) — on storage every worker mounts (NFS, a shared "
                          "volume); set output_dir to such a path (and give dataset paths that exist on every "
                          "worker). Nothing was run. Problems:\n  "
                          + "\n  ".join(problems))
