"""Method names -> method classes."""
from __future__ import annotations

from .methods import (AIM, HACK, ClsPruning, FastV, GlobalCom2, Method, PoolCompression, RandomKV, RandomPruning,
                      SnapKV, StreamingKV, UniformPruning, ZipVL)

METHODS: dict[str, type[Method]] = {
    "cls": ClsPruning,
    "random": RandomPruning,
    "uniform": UniformPruning,
    "pool": PoolCompression,
    "fastv": FastV,
    "aim": AIM,
    "globalcom2": GlobalCom2,
    "zipvl": ZipVL,
    "snapkv": SnapKV,
    "streaming": StreamingKV,
    "kv_random": RandomKV,
    "hack": HACK,
}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError("a method class needs a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names accepted by ``vtc.patch(model, method=...)``."""
    return sorted(METHODS)
