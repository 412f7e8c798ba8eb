"""vtc: visual-token compression for Hugging Face vision-language models.

    import vtc
    vtc.patch(model, method="cls", ratio=0.25)
    model.generate(**inputs)
"""
from .api import Patch, build_method, get_patch, patch, patched, unpatch
from .registry import available_methods, register_method
from .runtime import CallStats
from . import hack  # noqa: E402,F401  (vtc.hack.calibrate)

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "patched", "get_patch", "build_method", "available_methods", "register_method", "Patch", "CallStats"]
