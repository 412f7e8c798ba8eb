"""Model-family adapters: the only code that knows transformers internals.

This package lives inside ``vtc`` on purpose: a top-level ``adapters`` package would collide with
AdapterHub's ``adapters``.
"""
from .base import ADAPTERS, Adapter, find_adapter, register_adapter
from . import llava, llava_next, qwen_vl, var  # noqa: F401  (register the adapters)

__all__ = ["ADAPTERS", "Adapter", "find_adapter", "register_adapter"]
