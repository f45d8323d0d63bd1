"""CLIP domain-adaptation workbench.

Load a backbone and a dataset, sample K-shot splits, fit adaptation methods on cached
features and compare them with honest numbers::

    import workbench as wb
    backbone = wb.load_backbone()                     # offline default; e.g. ("ViT-B-16-quickgelu", "openai")
    dataset = wb.load_dataset("whu_rs19_mini")
    table = wb.compare(dataset, backbone, ["zero_shot", "linear_probe"], shots=[1, 2, 4], seeds=[1, 2, 3])

The names below are imported on first use (PEP 562), so ``import workbench`` — and with it
``workbench --help`` — does not load torch; ``wb.compare`` etc. behave as ordinary attributes.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from .paths import package_version as __version__  # noqa: E402  (one place for the version)

# public name -> the submodule that defines it
_EXPORTS = {
    "OFFLINE_DEFAULT": "backbones", "Backbone": "backbones", "load_backbone": "backbones",
    "FewShotSplit": "data", "sample_few_shot": "data",
    "list_datasets": "domains", "load_dataset": "domains",
    "BackboneError": "errors", "ConfigError": "errors", "DataError": "errors", "WorkbenchError": "errors",
    "compare": "experiment", "run_experiment": "experiment", "summarize": "experiment",
    "FeatureCache": "features",
    "available_methods": "methods", "get_method": "methods",
    "repo_root": "paths", "resolve": "paths",
    "Predictor": "predictor", "load": "predictor",
    "load_pairs": "data.pairs", "evaluate_retrieval": "retrieval", "save_backbone": "backbones",
    "fine_tune_pairs": "methods.pairs.contrastive",
}
_SUBMODULES = ["data", "domains", "notebook", "prompts", "report"]

__all__ = [*_EXPORTS, "sweep", "recommend", *_SUBMODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # wb.report, wb.experiment, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _function_over_submodule(name: str) -> property:
    """``wb.<name>`` is the function ``workbench.<name>.<name>``, although a submodule has the same name.

    Importing the submodule makes Python set the package attribute to the module; this property
    keeps the function there (an explicit assignment of a non-module still wins).
    """
    key = f"_{name}_override"

    def get(self):
        override = self.__dict__.get(key)
        return override if override is not None else getattr(importlib.import_module(f".{name}", __name__), name)

    def set_(self, value):
        if not isinstance(value, types.ModuleType):
            self.__dict__[key] = value

    return property(get, set_, doc=f"the function ``workbench.{name}.{name}``")


class _Package(types.ModuleType):
    """The package module, with ``sweep`` and ``recommend`` as functions (see :func:`_function_over_submodule`)."""

    sweep = _function_over_submodule("sweep")
    recommend = _function_over_submodule("recommend")


sys.modules[__name__].__class__ = _Package
