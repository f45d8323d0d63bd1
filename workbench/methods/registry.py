"""The one list of adaptation methods: where each lives, what it trains, what it costs.

A method is registered by one line in :data:`METHODS` (its name, module and a short
description for :func:`available_methods`) and ``@register("name")`` on its class. Modules are
imported only when a method is first asked for, so ``import workbench`` stays light and no
method file needs importing by the user. A method defined outside the package (a user's own
file) registers with ``@register`` alone and is listed with family ``"user"``.

Families say at a glance what a method costs:

* ``features`` — fits on cached image features (seconds on a CPU);
* ``prompts`` — learns prompt tokens; the text encoder (and for some the image encoder) runs
  every step (minutes on a GPU);
* ``weights`` — changes encoder weights (LoRA, singular values; minutes on a GPU).
* ``pairs`` — contrastive fine-tuning on image–text pairs (``retrieval`` task kind); the result
  is a backbone that every classification method can use (minutes to hours on a GPU).
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

from ..errors import ConfigError, did_you_mean
from ..task_kinds import check_supported, task_kind


@dataclass(frozen=True)
class MethodEntry:
    name: str
    #: module under workbench.methods that defines the class
    module: str
    family: str
    trains: str
    reference: str
    cost: str
    #: task kinds the method can be fitted on (see workbench.task_kinds)
    tasks: tuple[str, ...] = ("single_label",)
    #: unlabeled images the method uses: "none" (inductive), "pool" (a pool or the predicted batch), "stream"
    #: (the predicted images one after the other); see workbench.unlabeled
    unlabeled: str = "none"


METHODS: tuple[MethodEntry, ...] = (
    MethodEntry("zero_shot", "features.zero_shot", "features", "nothing (text classifier)",
                "Radford et al. 2021", "seconds"),
    MethodEntry("linear_probe", "features.linear_probe", "features", "logistic regression on image features",
                "CoOp lpclip/linear_probe.py", "seconds"),
    MethodEntry("tip_adapter", "features.tip_adapter", "features", "nothing (cache of support features)",
                "Zhang et al. ECCV'22", "seconds"),
    MethodEntry("tip_adapter_f", "features.tip_adapter", "features", "cache keys",
                "Zhang et al. ECCV'22", "seconds"),
    MethodEntry("gda", "features.gda", "features", "nothing (class means + shared covariance)",
                "Wang et al. ICLR'24", "seconds"),
    MethodEntry("lp_plus_plus", "features.lp_plus_plus", "features", "linear head + class-wise text blending α",
                "Huang et al. CVPR'24", "seconds"),
    MethodEntry("zs_lp", "features.zs_lp", "features", "class prototypes initialised from the text classifier",
                "Silva-Rodríguez et al. CVPR'24", "seconds"),
    MethodEntry("clap", "features.zs_lp", "features", "class prototypes, class-adaptive L2 pull to the text",
                "Silva-Rodríguez et al. CVPR'24", "seconds"),
    MethodEntry("clip_adapter", "features.clip_adapter", "features", "residual bottleneck MLP on image features",
                "Gao et al. IJCV'23", "seconds"),
    MethodEntry("proker", "features.proker", "features", "nothing (kernel ridge regression around zero-shot)",
                "Bendou et al. CVPR'25", "seconds"),
    MethodEntry("transclip", "features.transclip", "features", "nothing (GMM + k-NN graph over unlabeled images)",
                "Zanella et al. NeurIPS'24", "seconds", unlabeled="pool"),
    MethodEntry("tda", "features.tda", "features", "nothing (positive/negative caches on the test stream)",
                "Karmanov et al. CVPR'24", "seconds", unlabeled="stream"),
    MethodEntry("chexzero", "features.multilabel", "features",
                "nothing (positive/negative prompt pair per finding)", "Tiu et al. Nat. Biomed. Eng. 2022 (CheXzero)",
                "seconds", tasks=("multi_label",)),
    MethodEntry("ovr_linear_probe", "features.multilabel", "features",
                "one logistic regression per finding (one-vs-rest)", "CLIP/CoOp linear probe, one-vs-rest", "seconds",
                tasks=("multi_label",)),
    MethodEntry("coop", "prompts.coop", "prompts", "text context vectors",
                "Zhou et al. IJCV'22", "minutes (GPU)"),
    MethodEntry("kgcoop", "prompts.kgcoop", "prompts", "text context vectors, pulled to the hand-crafted prompt",
                "Yao et al. CVPR'23", "minutes (GPU)"),
    MethodEntry("cocoop", "prompts.cocoop", "prompts", "text context vectors + meta-net conditioning them on the image",
                "Zhou et al. CVPR'22", "minutes (GPU)"),
    MethodEntry("biomedcoop", "prompts.biomedcoop", "prompts", "text context vectors + LLM description-bank regularisers",
                "Koleilat et al. CVPR'25", "minutes (GPU)"),
    MethodEntry("maple", "prompts.maple", "prompts", "deep text prompts coupled to deep image prompts",
                "Khattak et al. CVPR'23", "minutes (GPU)"),
    MethodEntry("ivlp", "prompts.maple", "prompts", "independent deep text and image prompts",
                "Khattak et al. CVPR'23 (baseline)", "minutes (GPU)"),
    MethodEntry("vpt_deep", "prompts.maple", "prompts", "deep image prompts, hand-crafted text",
                "Jia et al. ECCV'22 (MaPLe repo baseline)", "minutes (GPU)"),
    MethodEntry("clip_lora", "weights.clip_lora", "weights", "LoRA on q/k/v of both encoders",
                "Zanella & Ben Ayed CVPRW'24", "minutes (GPU)"),
    MethodEntry("clip_svd", "weights.clip_svd", "weights", "singular values of q/k/v/o/MLP Linears, both encoders",
                "Koleilat et al. 2025 (CLIP-SVD)", "minutes (GPU)"),
    MethodEntry("pairs_lora", "pairs.contrastive", "pairs", "LoRA on q/k/v of both encoders + logit scale, CLIP loss on pairs",
                "Goyal et al. CVPR'23 (FLYP) + CLIP-LoRA surgery", "minutes (GPU)", tasks=("retrieval",)),
    MethodEntry("pairs_svd", "pairs.contrastive", "pairs", "singular values of both encoders + logit scale, CLIP loss on pairs",
                "Goyal et al. CVPR'23 (FLYP) + CLIP-SVD surgery", "minutes (GPU)", tasks=("retrieval",)),
    MethodEntry("pairs_full", "pairs.contrastive", "pairs", "every weight of the chosen blocks, CLIP loss on pairs",
                "Goyal et al. CVPR'23 (FLYP)", "minutes (GPU)", tasks=("retrieval",)),
)

_ENTRIES = {e.name: e for e in METHODS}
_CLASSES: dict[str, type] = {}


def register(name: str):
    """Class decorator: binds a method class to its name (and checks the name is not taken)."""
    def wrap(cls):
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_CLASSES[name].__name__}")
        cls.name = name
        _CLASSES[name] = cls
        if name not in _ENTRIES:  # a user's own method, defined outside the package
            doc = (cls.__doc__ or "").strip().splitlines()
            kinds = tuple(task_kind(k).name for k in getattr(cls, "task_kinds", ("single_label",)))
            _ENTRIES[name] = MethodEntry(name, cls.__module__, "user", "?", doc[0] if doc else "", "?", kinds)
        return cls
    return wrap


def method_names() -> list[str]:
    return sorted(_ENTRIES)


def method_class(name: str) -> type:
    """The class registered as ``name`` (importing its module on first use)."""
    if name not in _ENTRIES:
        raise ConfigError(f"unknown method {name!r}; available: {method_names()}." + did_you_mean(name, _ENTRIES))
    if name not in _CLASSES:
        importlib.import_module(f"{__package__}.{_ENTRIES[name].module}")
        if name not in _CLASSES:
            raise ConfigError(f"method {name!r}: module workbench.methods.{_ENTRIES[name].module} defines no class "
                              f"with @register({name!r}).")
    return _CLASSES[name]


def available_methods(details: bool = False):
    """The registered method names; with ``details=True`` a table of each method's family, what it
    trains, its reference and its typical cost."""
    if not details:
        return method_names()
    import pandas as pd

    rows = [{**asdict(_ENTRIES[n]), "tasks": ", ".join(_ENTRIES[n].tasks)} for n in method_names()]
    return pd.DataFrame(rows).drop(columns="module").set_index("name")


def methods_for_task(kind: str) -> list[str]:
    """The registered methods that declare the task kind ``kind``."""
    kind = task_kind(kind).name
    return [n for n in method_names() if kind in _ENTRIES[n].tasks]


def check_method_task(name: str, kind: str) -> None:
    """A ``ConfigError`` when method ``name`` cannot be fitted on a ``kind`` task, listing those that can."""
    if name not in _ENTRIES:
        method_class(name)  # the unknown-method error, with its did-you-mean
    check_supported(name, _ENTRIES[name].tasks, kind, methods_for_task(kind))


def get_method(name: str, **params):
    return method_class(name)(**params)
