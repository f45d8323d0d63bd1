"""The results table shared by ``compare`` and ``sweep``: one key per run, append as it finishes, resume.

Both entry points describe a run by the same *cell* — (dataset, backbone, pretrained, method,
label, params, K, seed, templates, runner) — and key it by :func:`cell_id`, a hash of that
cell. A finished run is appended to ``results.csv`` at once (under a file lock, written to a
temporary file and renamed, so a reader never sees half a table); a rerun skips the cells whose
``cell_id`` is already there. A compare and a sweep of the same settings therefore share keys
and can share one table.

Faults handled here:

* a malformed line (cut short by a crash, a row added by hand with an unquoted comma) is left out
  with a warning naming the file and line and moved to ``results.rejected.csv`` at the next write,
  never deleted; a last row missing its final newline is kept and the newline restored; a table
  re-saved with ``;`` separators is refused with a clear error, never silently recomputed;
* a results folder that cannot be written is refused up front (:func:`ensure_writable`), before
  any encoding or training;
* ``failures.csv`` that cannot be written (full disk) is a warning, not the end of the sweep.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from .errors import ConfigError

# Columns that hold text: read back as "" rather than NaN when empty (e.g. ``pretrained``).
TEXT_COLUMNS = ("dataset", "domain", "backbone", "pretrained", "method", "metric", "run_id", "method_label",
                "cell_id", "protocol", "eval_dataset", "eval_classes", "allocation", "note", "unlabeled_source")


def cell_id(cell: dict) -> str:
    """The key of one run: a hash of its cell (``cell_id`` itself excluded), stable across processes."""
    key = json.dumps({k: v for k, v in cell.items() if k != "cell_id"}, sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def backbone_weights_key(backbone) -> str | None:
    """What run keys add for a saved backbone folder (a ``Backbone`` loaded from one, or its path in a
    sweep spec): its weights' fingerprint, so that refitting into the same folder makes new keys.
    None for every other backbone (their keys are unchanged)."""
    from .paths import saved_weights_fingerprint

    source = getattr(backbone, "source", None)
    if source is not None:
        return saved_weights_fingerprint(source["folder"]) if source.get("kind") == "saved-backbone" else None
    return saved_weights_fingerprint(backbone) if isinstance(backbone, str) else None


def make_cell(dataset: str, backbone: str, pretrained: str | None, method: str, shots: int, seed: int, *,
              label: str | None = None, params: dict | None = None, templates=None, runner: str = "function",
              protocol: str = "default", extra: dict | None = None) -> dict:
    """One run's cell with its ``cell_id`` (the same fields and hash in compare and sweep).

    ``extra``: what else tells runs apart under some protocols (``eval_dataset``, ``eval_classes``,
    ``budget``, ``allocation``...); None values are left out.
    """
    cell = {"dataset": dataset, "backbone": backbone, "pretrained": pretrained or "", "method": method,
            "method_label": label or method, "params": params or {}, "shots": shots, "seed": seed,
            "templates": list(templates) if templates is not None else None, "runner": runner}
    if protocol != "default":   # only then, so the keys of existing (default-protocol) results stay valid
        cell["protocol"] = protocol
    cell.update({k: v for k, v in (extra or {}).items() if v is not None})
    cell["cell_id"] = cell_id(cell)
    return cell


def ensure_writable(folder: str | os.PathLike, what: str = "results folder") -> Path:
    """Create ``folder`` and prove a file can be written in it; else a ConfigError naming it, before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{what} {str(folder)!r} is not writable ({err.strerror or err}); choose another "
                          "output folder or fix its permissions. Nothing was run.") from None
    return folder


#: where malformed lines of ``results.csv`` / ``failures.csv`` are moved: ``<stem>.rejected.csv`` beside it
REJECTED_SUFFIX = ".rejected.csv"


def rejected_path(path: Path) -> Path:
    """The sibling file that receives a table's malformed lines (never deleted)."""
    path = Path(path)
    return path.with_name(path.stem + REJECTED_SUFFIX)


def _refuse_other_separator(path: Path, header: list[str]) -> None:
    if len(header) == 1 and any(sep in header[0] for sep in (";", "\t")):
        name, arg = (";", "';'") if ";" in header[0] else ("tab", "'\\t'")
        raise ConfigError(
            f"{path} is {name}-separated (re-saved by a spreadsheet program?), not the ','-separated table the "
            "workbench writes. It is not read, so no finished run is recomputed or mixed up. Convert it back, "
            f"e.g. pandas.read_csv(path, sep={arg}, decimal=',').to_csv(path, index=False), or restore the "
            "original file.")


def read_table(path: Path, warned: set | None = None, rejected: list | None = None) -> pd.DataFrame:
    """Read a results/failures CSV; malformed lines are left out with a warning naming file and line.

    A line is malformed when its field count differs from the header's (cut short by a crash, a
    row added by hand with an unquoted comma). Such lines are never deleted: pass ``rejected`` (a
    list) to receive their raw text, which :class:`ResultsTable` moves to ``<stem>.rejected.csv``
    at its next write. A complete last row without its final newline is kept (the newline is
    restored at the next write). A ``;``- or tab-separated table is a ConfigError.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    text = path.read_text(encoding="utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return pd.DataFrame()
    except csv.Error as err:
        raise ConfigError(f"{path}: its header line cannot be read as CSV ({err}); is it a results table?") from None
    _refuse_other_separator(path, header)
    raw_lines = text.splitlines(keepends=True)
    good, broken = [], []
    prev_end = reader.line_num
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:   # e.g. a NUL byte: the rest of the line is unreadable
            record = None
        start, prev_end = prev_end, reader.line_num
        if record is not None and (len(record) == len(header) or not record):
            if record:
                good.append(record)
            continue
        broken.append((prev_end, "".join(raw_lines[start:prev_end])))
    for line, _ in broken:
        if warned is None or (str(path), line) not in warned:
            warnings.warn(f"{path}, line {line}: malformed row (not {len(header)} fields: cut short by a crash, or "
                          "added by hand with an unquoted comma?). It is left out of the table and moved, not "
                          f"deleted, to {rejected_path(path).name} at the next write; fix it there and paste it back "
                          "if it is a finished run.", stacklevel=3)
            if warned is not None:
                warned.add((str(path), line))
    if rejected is not None:
        rejected.extend(raw for _, raw in broken)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(good)
    table = pd.read_csv(io.StringIO(buf.getvalue()))
    for col in TEXT_COLUMNS:
        if col in table.columns:
            table[col] = table[col].astype(object).fillna("").astype(str)
    return table


def _move_rejected(path: Path, lines: list[str]) -> None:
    """Append malformed raw lines to the sibling rejected file (before the table is rewritten without them)."""
    if not lines:
        return
    target = rejected_path(path)
    with open(target, "a", encoding="utf-8") as f:
        for raw in lines:
            f.write(raw if raw.endswith("\n") else raw + "\n")
        f.flush()
        os.fsync(f.fileno())
    warnings.warn(f"{path}: moved {len(lines)} malformed line(s) to {target} (kept there, never deleted).",
                  stacklevel=3)


def _write_atomically(table: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            table.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsTable:
    """``results.csv`` (+ ``failures.csv``) in one folder, under a file lock, rewritten atomically."""

    def __init__(self, folder: str | os.PathLike):
        from filelock import FileLock

        self.folder = ensure_writable(folder)
        self.path = self.folder / "results.csv"
        self.failures = self.folder / "failures.csv"
        self.lock = FileLock(str(self.folder / ".results.lock"))
        self._warned: set = set()

    def read(self) -> pd.DataFrame:
        return read_table(self.path, self._warned)

    def done_rows(self) -> dict[str, dict]:
        """Finished runs by ``cell_id`` (rows without one, from older versions, are not resumable)."""
        table = self.read()
        if "cell_id" not in table:
            return {}
        table = table[table["cell_id"] != ""]
        return {row["cell_id"]: row for row in table.to_dict("records")}

    def done_ids(self) -> set[str]:
        return set(self.done_rows())

    def append(self, row: dict, replace: bool = False) -> None:
        """Add one finished run. Its cell already there: kept (another process finished it) unless ``replace``.

        Rows of older versions with the same ``run_id`` and no ``cell_id`` are replaced, not duplicated.
        """
        from .distributed import is_main_process

        if not is_main_process():  # under torchrun every process holds the same row: process 0 writes it
            return
        with self.lock:
            rejected: list[str] = []
            table = read_table(self.path, self._warned, rejected)
            _move_rejected(self.path, rejected)   # before the rewrite: a malformed line is moved, never lost
            if "cell_id" in table and row["cell_id"] in set(table["cell_id"]):
                if not replace:
                    return
                table = table[table["cell_id"] != row["cell_id"]]
            if "run_id" in table and "cell_id" in table:
                table = table[~((table["run_id"] == row["run_id"]) & (table["cell_id"] == ""))]
            elif "run_id" in table:
                table = table[table["run_id"] != row["run_id"]]
            new = pd.DataFrame([row])
            _write_atomically(pd.concat([table, new], ignore_index=True) if len(table) else new, self.path)
            try:
                self._drop_failure(row["cell_id"])
            except OSError as err:  # the row is saved; a stale failure line is harmless
                warnings.warn(f"could not update {self.failures}: {err}", stacklevel=2)

    def record_failure(self, cell: dict, error: str) -> bool:
        """Note a failed cell in ``failures.csv``; a write that fails (full disk) warns and returns False."""
        row = {"cell_id": cell["cell_id"], "dataset": cell["dataset"], "backbone": cell["backbone"],
               "method": cell["method_label"], "shots": cell["shots"], "seed": cell["seed"], "error": error,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            with self.lock:
                rejected: list[str] = []
                old = read_table(self.failures, self._warned, rejected)
                _move_rejected(self.failures, rejected)
                if "cell_id" in old:
                    old = old[old["cell_id"] != row["cell_id"]]
                new = pd.DataFrame([row])
                _write_atomically(pd.concat([old, new], ignore_index=True) if len(old) else new, self.failures)
            return True
        except OSError as err:
            warnings.warn(f"could not record the failure of cell {cell['cell_id']} ({cell['dataset']}, "
                          f"{cell['method_label']}, K={cell['shots']}, seed {cell['seed']}) in {self.failures}: "
                          f"{err}. The run goes on; the failure was: {error}", stacklevel=2)
            return False

    def _drop_failure(self, cell_id: str) -> None:
        if self.failures.exists():
            rejected: list[str] = []
            old = read_table(self.failures, self._warned, rejected)
            _move_rejected(self.failures, rejected)
            if "cell_id" in old and cell_id in set(old["cell_id"]):
                _write_atomically(old[old["cell_id"] != cell_id], self.failures)
