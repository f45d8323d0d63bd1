"""Adaptation methods behind one interface (see :mod:`workbench.methods.base`)."""
from .base import Method, available_methods, get_method, method_class, register
from . import clip_lora, coop, gda, linear_probe, tip_adapter, zero_shot  # noqa: F401  (registers the methods)

__all__ = ["Method", "available_methods", "get_method", "method_class", "register"]
