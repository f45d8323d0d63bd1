"""CLIP domain-adaptation workbench.

Load a backbone and a dataset, sample K-shot splits, fit adaptation methods on cached
features and compare them with honest numbers::

    import workbench as wb
    backbone = wb.load_backbone()                     # offline default; e.g. ("ViT-B-16-quickgelu", "openai")
    dataset = wb.load_dataset("whu_rs19_mini")
    table = wb.compare(dataset, backbone, ["zero_shot", "linear_probe"], shots=[1, 2, 4], seeds=[1, 2, 3])
"""
__version__ = "0.1.0"

from .backbones import OFFLINE_DEFAULT, Backbone, load_backbone
from .data import FewShotSplit, sample_few_shot
from .domains import list_datasets, load_dataset
from .errors import BackboneError, ConfigError, DataError, WorkbenchError
from .experiment import compare, run_experiment, summarize
from .features import FeatureCache
from .methods import available_methods, get_method
from .paths import repo_root, resolve
from .predictor import Predictor, load
from . import data, domains, notebook, prompts, report  # noqa: E402
from .sweep import sweep  # noqa: E402  (wb.domains.list, wb.notebook.check_parameters, ...)

__all__ = ["OFFLINE_DEFAULT", "Backbone", "load_backbone", "FewShotSplit", "sample_few_shot", "list_datasets",
           "load_dataset", "BackboneError", "ConfigError", "DataError", "WorkbenchError", "compare",
           "run_experiment", "summarize", "FeatureCache", "available_methods", "get_method", "repo_root", "resolve",
           "Predictor", "load", "sweep", "data", "domains", "notebook", "prompts", "report"]
