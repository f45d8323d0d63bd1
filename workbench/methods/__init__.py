"""Adaptation methods behind one interface (:mod:`.base`), grouped by what they train:

* ``features/`` — fit on cached image features in seconds (zero-shot, linear probe, Tip-Adapter, GDA);
* ``prompts/`` — learn prompt tokens in the text/image encoders (CoOp);
* ``weights/`` — change encoder weights (CLIP-LoRA).

:func:`available_methods` lists them (``details=True``: family, what it trains, reference, cost).
"""
from .registry import METHODS, available_methods, get_method, method_class, method_names, register


def __getattr__(name):  # Method (and torch with it) only when asked: `workbench methods` lists without torch
    if name == "Method":
        from .base import Method

        return Method
    raise AttributeError(f"module 'workbench.methods' has no attribute {name!r}")

__all__ = ["Method", "METHODS", "available_methods", "get_method", "method_class", "method_names", "register"]
