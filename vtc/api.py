"""``vtc.patch`` / ``vtc.unpatch`` / ``vtc.patched``: validation, method + adapter resolution, per-instance state."""
from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from .adapters import Adapter, find_adapter, hf
from .methods.base import Method
from .hook_owner import HookOwner, patched_modules
from .registry import METHODS, available_methods
from .runtime import CallStats, Runtime

_STATE_ATTR = "_vtc_patch"


class Patch(HookOwner):
    """Handle returned by :func:`patch`. ``stats`` holds one :class:`CallStats` per compressed forward pass.

    ``copy.deepcopy(model)`` of a patched model gives an independently patched copy (its own handle, hooks and
    state); pickling a patched model raises a TypeError that says to unpatch first."""

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
        self.runtime.sync = functools.partial(torch.cuda.synchronize, device) if on and device.type == "cuda" else None

    def last_kept(self) -> list:
        """Per image (N,) boolean keep masks of the most recent compressed images (raster order)."""
        return list(self.runtime.last_keep)

    @property
    def active(self) -> bool:
        """Whether this handle's hooks are still on the model (False after unpatch, or for a stale handle)."""
        return getattr(self.model, _STATE_ATTR, None) is self

    def remove(self) -> None:
        """Unpatch the model if this handle is still its active patch; a stale handle (the model was unpatched,
        and perhaps patched again since) does nothing, so it never removes a newer patch."""
        if self.active:
            unpatch(self.model)

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

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


def build_method(method: str | Method, ratio: float | None = None, tokens: int | None = None,
                 **hyperparameters: Any) -> Method:
    """The validated :class:`Method` that ``vtc.patch(model, method, ratio=..., tokens=..., **hyperparameters)``
    would install, without a model: checks the name, the budget and every hyperparameter (the same errors as
    ``patch``), so scripts and the CLI can refuse bad settings before loading a model."""
    return _build_method(method, ratio, tokens, hyperparameters)


def describe_method(m: Method) -> dict[str, Any]:
    """A method's name and every hyperparameter (defaults included), for run records."""
    fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)} if dataclasses.is_dataclass(m) else {}
    return {"name": m.name, **fields}


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
    _check_no_nested_patch(model)
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


def _check_no_nested_patch(model: nn.Module) -> None:
    """Refuse a model that holds vtc hooks already: a patched sub-model, or a sub-module of a patched parent."""
    names = patched_modules(model)
    if names:
        where = ", ".join(f"model.{n}" if n else "the model itself" for n in names[:3])
        raise RuntimeError(
            f"vtc hooks are already installed on {where}: a sub-model of this model, or a parent model it belongs "
            "to, is patched. Patch one model once: call vtc.unpatch(...) on the patched one first"
        )


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


__all__ = ["Patch", "patch", "unpatch", "patched", "get_patch", "available_methods", "build_method",
           "describe_method"]
