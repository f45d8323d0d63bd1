"""The one CSV reader of the data sources (single-label, multi-label and image–text pair manifests).

:func:`read_csv` returns the header and the rows (``csv.DictReader``) with the errors a user can act
on: a file that is not valid text in ``encoding`` (with the offending byte and the usual fix, latin-1
for files saved by older Excel versions), an encoding name Python does not know, a file that does not
parse as CSV. :func:`require_columns` names a missing column, the parameter that asked for it and the
columns the file has.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError, DataError, did_you_mean


def read_csv(path: Path, encoding: str, what: str = "CSV") -> tuple[list[str], list[dict]]:
    """``(columns, rows)`` of the CSV at ``path``; ``what`` names the file in errors ("CSV", "pair CSV")."""
    try:
        with Path(path).open(newline="", encoding=encoding) as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {str(path)!r} is not valid {encoding} text (byte {err.start} is "
                        f"{err.object[err.start:err.start + 1]!r}). It was probably saved as latin-1 / Windows-1252 "
                        "(Excel does this): pass encoding='latin-1' (or the file's real encoding).") from None
    except LookupError:
        raise ConfigError(f"encoding={encoding!r} is not a text encoding Python knows (e.g. 'utf-8', "
                          "'latin-1', 'cp1252').") from None
    except csv.Error as err:
        raise DataError(f"{what} {str(path)!r} cannot be parsed: {err}. Is it a CSV file?") from None


def require_columns(columns: list[str], needed, where: str) -> None:
    """A DataError for the first ``(column, parameter)`` of ``needed`` (None columns skipped) that ``columns`` lacks."""
    for col, what in needed:
        if col is not None and col not in columns:
            raise DataError(f"{where} has no column {col!r} (set by {what}); its columns are {columns}."
                            + did_you_mean(col, columns))
