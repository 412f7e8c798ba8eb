"""``vtc.patch`` / ``vtc.unpatch`` / ``vtc.patched``: validation, method + adapter resolution, per-instance state."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from .adapters import Adapter, find_adapter, hf
from .methods.base import Method
from .registry import METHODS, available_methods
from .runtime import CallStats, Runtime

_STATE_ATTR = "_vtc_patch"


class Patch:
    """Handle returned by :func:`patch`. ``stats`` holds one :class:`CallStats` per compressed forward pass."""

    def __init__(self, model: nn.Module, method: Method, adapter: Adapter, runtime: Runtime):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.runtime = runtime

    @property
    def stats(self) -> list[CallStats]:
        return list(self.runtime.stats)

    @property
    def events(self) -> dict[str, int]:
        """How often each of vtc's hooks did its work since patching (e.g. ``llm_input.prefill_gather``,
        ``llm_input.decode``: decode masks re-mapped to the pruned cache; ``llm_layer.prune``,
        ``llm_layer.decode``): evidence that the hooks ran, for tests and debugging."""
        return dict(self.runtime.events)

    @property
    def sync_timing(self) -> bool:
        """Synchronize the model's device around vtc's own code so ``stats[i].seconds`` excludes queued GPU work
        (benchmarks; off by default because each synchronize stalls the host)."""
        return self.runtime.sync is not None

    @sync_timing.setter
    def sync_timing(self, on: bool) -> None:
        device = next(self.model.parameters()).device
        self.runtime.sync = (lambda: torch.cuda.synchronize(device)) if on and device.type == "cuda" else None

    def last_kept(self) -> list:
        """Per image (N,) boolean keep masks of the most recent compressed images (raster order)."""
        return list(self.runtime.last_keep)

    def remove(self) -> None:
        """Same as ``vtc.unpatch(model)``."""
        unpatch(self.model)

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        if getattr(self.model, _STATE_ATTR, None) is self:
            unpatch(self.model)

    def __repr__(self) -> str:
        return f"Patch({type(self.model).__name__}, {self.method.describe()})"


def _build_method(method: str | Method, ratio: float | None, tokens: int | None, hyper: dict[str, Any]) -> Method:
    if isinstance(method, Method):
        if hyper or ratio is not None or tokens is not None:
            raise ValueError("pass hyperparameters, ratio and tokens to the Method instance, not to patch()")
        ratio, tokens = getattr(method, "ratio", None), getattr(method, "tokens", None)
        _check_budget(method.name, method.budget_rule, ratio, tokens)
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available methods: {', '.join(available_methods())}")
    cls = METHODS[method]
    _check_budget(method, cls.budget_rule, ratio, tokens)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(hyper) - names)
    if unknown:
        allowed = sorted(names - {"ratio", "tokens"})
        raise TypeError(f"method {method!r} got unknown hyperparameter(s) {unknown}; allowed: {allowed}")
    return cls(ratio=ratio, tokens=tokens, **hyper)


def _check_budget(name: str, rule: str, ratio: float | None, tokens: int | None) -> None:
    if ratio is not None and tokens is not None:
        raise ValueError(f"method {name!r}: give either ratio= or tokens=, not both")
    if rule == "ratio" and ratio is None and tokens is None:
        raise ValueError(f"method {name!r} needs a budget: ratio= (fraction kept, in (0, 1]) "
                         "or tokens= (count per image)")
    if rule == "own" and (ratio is not None or tokens is not None):
        raise ValueError(f"method {name!r} sets its own budget; do not pass ratio= or tokens=")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must be a number in (0, 1] (the fraction of visual tokens kept); got {ratio!r}")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be a positive integer (visual tokens kept per image); got {tokens!r}")


def patch(
    model: nn.Module,
    method: str | Method = "cls",
    ratio: float | None = None,
    tokens: int | None = None,
    **hyperparameters: Any,
) -> Patch:
    """Compress the visual tokens of ``model`` in place with removable, per-instance hooks.

    ``ratio`` is the fraction of visual tokens kept per image, in (0, 1]; ``tokens`` an absolute count per
    image (give one of them). Extra keyword arguments are the method's hyperparameters. Returns a
    :class:`Patch`; ``vtc.unpatch(model)`` restores the original behaviour exactly.
    """
    active = getattr(model, _STATE_ATTR, None)
    if active is not None:
        raise RuntimeError(
            f"model is already patched with method {active.method.name!r}; call vtc.unpatch(model) first"
        )
    adapter_cls = find_adapter(model)
    hf.check_not_kernelized(model)
    hf.warn_if_untested()
    m = _build_method(method, ratio, tokens, hyperparameters)
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "prefill_chunk_size", None):
        raise ValueError(
            "chunked prefill (generation_config.prefill_chunk_size) would compress each chunk separately; "
            "unset it to use vtc"
        )
    adapter = adapter_cls(model)
    adapter.check_sites(m.sites)
    m.setup(adapter.vision_info())
    runtime = Runtime(m, getattr(m, "ratio", None), getattr(m, "tokens", None))
    try:
        adapter.install(runtime)
    except BaseException:
        adapter.remove()
        raise
    handle = Patch(model, m, adapter, runtime)
    object.__setattr__(model, _STATE_ATTR, handle)
    return handle


def unpatch(model: nn.Module) -> None:
    """Remove every hook vtc installed on ``model``; a model that is not patched is left as it is."""
    handle: Patch | None = getattr(model, _STATE_ATTR, None)
    if handle is None:
        return
    handle.adapter.remove()
    model.__dict__.pop(_STATE_ATTR, None)


def get_patch(model: nn.Module) -> Patch | None:
    """The active :class:`Patch` of ``model``, or None."""
    return getattr(model, _STATE_ATTR, None)


@contextmanager
def patched(model: nn.Module, method: str | Method = "cls", ratio: float | None = None,
            tokens: int | None = None, **hyperparameters: Any) -> Iterator[Patch]:
    """``with vtc.patched(model, "cls", ratio=0.25) as p: ...`` — unpatched on exit, even on error."""
    handle = patch(model, method, ratio=ratio, tokens=tokens, **hyperparameters)
    try:
        yield handle
    finally:
        unpatch(model)


__all__ = ["Patch", "patch", "unpatch", "patched", "get_patch", "available_methods"]
