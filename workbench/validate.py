"""Checks of user-given parameters, shared by the experiment runner, sampling and every method.

Each check raises :class:`~workbench.errors.ConfigError` naming the parameter, the value it got
and what is allowed, and returns the value in a plain Python type (``np.int64(4)`` → ``4``), so
configs stay JSON-serialisable. They run before any image is encoded or any step trained.

:func:`check_config` validates a method's ``Config`` dataclass from its type annotations
(``int``, ``float``, ``bool``, ``str``, ``list``/``tuple``, ``X | None``) plus simple bounds
looked up by field name (:data:`POSITIVE_INTS`, :data:`PROBABILITIES`, ...). A method with other
bounds passes its own ``bounds`` mapping.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError

#: integer fields that must be >= 1 wherever they appear in a method's Config
POSITIVE_INTS = frozenset({"batch_size", "epochs", "iterations", "iterations_per_shot", "max_iter", "max_steps",
                           "r", "checkpoint_every", "eval_every", "augment_views", "search_steps",
                           "views", "shots"})
#: integer fields that must be >= 0 (``n_ctx=0``: the hand-crafted prompt, no learned context)
NON_NEGATIVE_INTS = frozenset({"warmup_epochs", "seed", "n_ctx"})
#: float fields that must be > 0
POSITIVE_FLOATS = frozenset({"lr", "eps", "grad_clip"})
#: float fields that must be >= 0
NON_NEGATIVE_FLOATS = frozenset({"weight_decay", "eta_min", "warmup_lr", "init_std"})
#: float fields that are probabilities: 0 <= p < 1
PROBABILITIES = frozenset({"dropout", "momentum"})


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_int(value, name: str, *, minimum: int | None = None, where: str = "") -> int:
    """A Python or numpy integer (not a bool, not a float) >= ``minimum``, returned as ``int``."""
    prefix = f"{where}: " if where else ""
    if not _is_int(value):
        hint = " (a bool is not a number here)" if isinstance(value, bool) else ""
        raise ConfigError(f"{prefix}{name} must be an integer, got {value!r} ({type(value).__name__}){hint}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{prefix}{name} must be an integer >= {minimum}, got {value}.")
    return value


def check_float(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
                exclusive_min: bool = False, exclusive_max: bool = False, where: str = "") -> float:
    """A finite real number within the bounds, returned as ``float``."""
    prefix = f"{where}: " if where else ""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ConfigError(f"{prefix}{name} must be a finite number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    low_bad = minimum is not None and (value <= minimum if exclusive_min else value < minimum)
    high_bad = maximum is not None and (value >= maximum if exclusive_max else value > maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{minimum} {'<' if exclusive_min else '<='} "
        hi = "" if maximum is None else f" {'<' if exclusive_max else '<='} {maximum}"
        raise ConfigError(f"{prefix}{name} must satisfy {lo}{name}{hi}, got {value}.")
    return value


def check_shots(shots, where: str = "") -> int:
    """K, the number of support images per class: a positive integer (``np.int64`` accepted)."""
    return check_int(shots, "shots", minimum=1, where=where)


def check_seed(seed, where: str = "") -> int:
    """A few-shot / training seed: a non-negative integer (``None`` is refused: runs must be reproducible)."""
    if seed is None:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}seed must be a non-negative integer, got None; pass e.g. seed=1 so the run "
                          "can be reproduced.")
    return check_int(seed, "seed", minimum=0, where=where)


# -- method configs ---------------------------------------------------------------------------

def _bounds_for(name: str, bounds: Mapping[str, dict] | None) -> dict:
    if bounds and name in bounds:
        return dict(bounds[name])
    if name in POSITIVE_INTS:
        return {"minimum": 1}
    if name in NON_NEGATIVE_INTS:
        return {"minimum": 0}
    if name in POSITIVE_FLOATS:
        return {"minimum": 0.0, "exclusive_min": True}
    if name in NON_NEGATIVE_FLOATS:
        return {"minimum": 0.0}
    if name in PROBABILITIES:
        return {"minimum": 0.0, "maximum": 1.0, "exclusive_max": True}
    return {}


def _allowed(annotation) -> tuple[list, bool]:
    """(the non-None alternatives of an annotation, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = list(typing.get_args(annotation))
    else:
        args = [annotation]
    none_ok = type(None) in args
    return [a for a in args if a is not type(None)], none_ok


def _coerce(value, kind, name: str, where: str, bounds: dict):
    """``value`` converted for one alternative ``kind``, or raise ConfigError/TypeError if it does not fit."""
    base = typing.get_origin(kind) or kind
    if base is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        raise TypeError
    if base is int:
        if not _is_int(value):
            raise TypeError
        return check_int(value, name, where=where, **{k: v for k, v in bounds.items() if k == "minimum"})
    if base is float:
        if not _is_real(value):
            raise TypeError
        return check_float(value, name, where=where, **bounds)
    if base is str:
        if isinstance(value, os.PathLike):  # checkpoint_dir=Path(...): kept as text, JSON-serialisable
            return os.fspath(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return value
    if base is dict:
        if not isinstance(value, Mapping):
            raise TypeError
        return value
    return value  # an annotation we do not check (a class, Any, ...)


def _type_name(kinds, none_ok) -> str:
    names = []
    for k in kinds:
        base = typing.get_origin(k) or k
        names.append({list: "list", tuple: "list", dict: "dict"}.get(base, getattr(base, "__name__", str(base))))
    return " or ".join(dict.fromkeys(names + (["None"] if none_ok else [])))


def check_config(config: Any, where: str, bounds: Mapping[str, dict] | None = None) -> Any:
    """Validate a Config dataclass in place from its annotations and the bounds by field name.

    Numpy scalars become Python scalars. Raises ConfigError naming ``where`` (the method), the
    field, the value and what is allowed.
    """
    if not dataclasses.is_dataclass(config):
        return config
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # an annotation that cannot be resolved: nothing to check against
        return config
    for f in dataclasses.fields(config):
        if f.name not in hints:
            continue
        value = getattr(config, f.name)
        kinds, none_ok = _allowed(hints[f.name])
        if value is None:
            if none_ok:
                continue
            raise ConfigError(f"{where}: {f.name} must be {_type_name(kinds, none_ok)}, got None.")
        field_bounds = _bounds_for(f.name, bounds)
        for kind in kinds:
            try:
                new = _coerce(value, kind, f.name, where, field_bounds)
            except TypeError:
                continue
            if new is not value:
                setattr(config, f.name, new)
            break
        else:
            raise ConfigError(f"{where}: {f.name} must be {_type_name(kinds, none_ok)}, got {value!r} "
                              f"({type(value).__name__}).")
        _check_not_emptied(config, f, where)
    return config


def _check_not_emptied(config, f: dataclasses.Field, where: str) -> None:
    """A list setting whose default holds values (a search grid, a range) may not be given empty:
    the method would fall back to something silently while its fit_info claims a search happened."""
    value = getattr(config, f.name)
    if not isinstance(value, (list, tuple)) or len(value):
        return
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    if isinstance(default, (list, tuple)) and len(default):
        raise ConfigError(f"{where}: {f.name} is empty; it needs at least one value (default {list(default)}).")


__all__ = ["check_int", "check_float", "check_shots", "check_seed", "check_config", "POSITIVE_INTS",
           "NON_NEGATIVE_INTS", "POSITIVE_FLOATS", "NON_NEGATIVE_FLOATS", "PROBABILITIES"]
