"""The one home of the *task kind*: what question a dataset asks, and who can answer it.

A task kind says what a dataset holds per image (one class id; a set of findings; captions),
which metric a results row is ranked by, and which methods can be fitted on it. Everything
else (loaders, the training loop, the feature cache, sweeps, the recommender) is written once
and asks this module, so a new kind is one :class:`TaskKind` registered here plus the data
source, the metrics and the methods that opt in — not a fork of every module.

Methods opt in through their registry entry (``MethodEntry.tasks``, shown by
``workbench methods``); datasets declare theirs with ``task:`` in the YAML (or the loader
infers it from the source when that is unambiguous).

This module imports nothing from the rest of the package but :mod:`workbench.errors`, so any
room may import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class TaskKind:
    """One kind of task.

    ``name`` is the value a YAML's ``task:`` takes; ``aliases`` are spellings also accepted
    (the YAMLs of version 2 wrote ``single-label``). ``primary_metric`` is the results column a
    dataset of this kind is ranked by unless its YAML names another in ``metrics``.
    """

    name: str
    description: str
    primary_metric: str
    metrics: tuple[str, ...]
    aliases: tuple[str, ...] = field(default=())


_KINDS: dict[str, TaskKind] = {}
_ALIASES: dict[str, str] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add a task kind (its name and aliases must be new)."""
    for spelling in (kind.name, *kind.aliases):
        if spelling in _ALIASES and _ALIASES[spelling] != kind.name:
            raise ValueError(f"task kind spelling {spelling!r} is already taken by {_ALIASES[spelling]!r}")
    _KINDS[kind.name] = kind
    for spelling in (kind.name, *kind.aliases):
        _ALIASES[spelling] = kind.name
    return kind


SINGLE_LABEL = register_kind(TaskKind(
    name="single_label",
    description="one class per image",
    primary_metric="accuracy",
    metrics=("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"),
    aliases=("single-label",),
))

RETRIEVAL = register_kind(TaskKind(
    name="retrieval",
    description="image–text pairs: one or more captions per image (no class labels)",
    primary_metric="mean_recall",
    metrics=("mean_recall", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"),
    aliases=("pairs", "image-text"),
))


MULTI_LABEL = register_kind(TaskKind(
    name="multi_label",
    description="a set of findings per image (each present / absent / uncertain)",
    primary_metric="macro_auroc",
    metrics=("macro_auroc", "micro_auroc", "mAP", "macro_f1", "ece"),
    aliases=("multi-label", "multilabel"),
))


def kind_names() -> list[str]:
    return sorted(_KINDS)


def task_kind(name: str | TaskKind) -> TaskKind:
    """The registered kind called ``name`` (or one of its aliases); a clear error otherwise."""
    if isinstance(name, TaskKind):
        return name
    if name not in _ALIASES:
        raise ConfigError(f"unknown task kind {name!r}; known kinds: {kind_names()}." + did_you_mean(str(name), _ALIASES))
    return _KINDS[_ALIASES[name]]


def check_supported(method: str, method_kinds, kind: str | TaskKind, supporters: list[str] | None = None) -> None:
    """Refuse a (method, task kind) pair the method does not declare, listing the methods that do."""
    kind = task_kind(kind)
    if kind.name in tuple(method_kinds):
        return
    others = f" Methods that support it: {sorted(supporters)}." if supporters else ""
    raise ConfigError(f"method {method!r} does not support {kind.name} tasks ({kind.description}); it supports "
                      f"{list(method_kinds)}.{others}")
