"""Adapter base class and lookup. Adapters are the only code that knows a model family's internals."""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn as nn

from ..runtime import Runtime
from ..sites import VisionInfo
from ..hook_owner import MISSING, CallLock, HookOwner


class Adapter(HookOwner):
    """Installs removable, per-instance hooks on one model for one :class:`Runtime`.

    Hooks are bound methods (see :mod:`vtc.hook_owner`), so a deep copy of a patched model is patched
    with its own state. One :class:`CallLock` per patch serializes forward passes and feature encoders across
    threads: the state that lives between calls is keyed by the call's own tensors and caches."""

    #: class names this adapter accepts (the model's class or any base class)
    model_classes: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []
        self.lock = CallLock()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        names = {c.__name__ for c in type(model).__mro__}
        return any(n in names for n in cls.model_classes)

    def vision_info(self) -> VisionInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_sites(self, sites: tuple[str, ...]) -> None:
        """Raise ValueError if this adapter cannot serve one of the method's sites."""
        unsupported = [s for s in sites if s not in self.supported_sites]
        if unsupported:
            raise ValueError(
                f"the {self.family} adapter does not support site(s) {unsupported}; "
                f"supported: {list(self.supported_sites)}"
            )

    supported_sites: ClassVar[tuple[str, ...]] = ()

    def install(self, runtime: Runtime) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----- helpers for subclasses: everything installed is recorded so remove() undoes it exactly
    def _hook(self, handle: Any) -> None:
        self._handles.append(handle)

    def _set_instance_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        self._restore.append((obj, name, obj.__dict__[name] if had else MISSING))
        setattr(obj, name, value)

    # ----- one forward pass: placeholder masks, then the keep masks of its features, then the LM keep set
    def _begin_call(self, kwargs: dict[str, Any], masks: dict[str, torch.Tensor]) -> None:
        """Record the placeholder masks of this forward pass and the keep masks of features that generate()
        pre-encoded (``mm_encoder_outputs``); features encoded inside forward are added by the wrappers.

        A modality counts only when the call carries its features (pixels or pre-encoded outputs): a
        generated id that equals a placeholder id is plain text to the model then."""
        enc = kwargs.get("mm_encoder_outputs") or {}
        enc = enc if isinstance(enc, dict) else {}
        call = ForwardCall({m: mask for m, mask in masks.items()
                            if kwargs.get(FEATURE_INPUTS[m]) is not None or enc.get(m) is not None})
        for modality in call.masks:
            o = enc.get(modality)
            if o is not None and getattr(o, "pooler_output", None) is not None:
                call.keeps[modality] = self.keeps.lookup(o.pooler_output)
        self.call = call

    def _remember_keeps(self, feats, keeps: list[torch.Tensor], modality: str = "image") -> None:
        """Link each image's (video's) features to its keep mask, for this call's LM input and later calls
        (generate() pre-encodes), and expose the masks as ``Patch.last_kept()``."""
        self.rt.last_keep = [k.detach().cpu() for k in keeps]
        self.keeps.remember(feats, keeps)
        if self.call is not None:
            self.call.keeps[modality] = keeps

    def _lock_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """First pre-hook of the base model: this thread owns the patch until :meth:`_end_call`."""
        self.lock.acquire()

    def _end_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Last hook of the base model, also run when the forward raised: clear per-call state, release."""
        try:
            self.call = None
            self.rt.end_call()
            self.pruner.end_call()
            if self.layer_pruner is not None:
                self.layer_pruner.ctx = None
            if self.attention is not None:
                self.attention.ctx = None
        finally:
            self.lock.release()

    def _keep_for_lm(self, lm_kwargs: dict[str, Any]):
        call = self.call
        if call is None or not call.masks:
            return None
        return compose_keep([(mask, call.keeps.get(m)) for m, mask in call.masks.items()])

    def _install_llm(self, language_model: nn.Module, runtime: Runtime) -> None:
        """The shared ``llm_input`` rewrite, plus the ``llm_layer`` pruner and the ``attention`` handler when the
        method uses those sites."""
        from .llm_input import LLMInputPruner
        from .llm_layers import LLMLayerPruner

        self.call: ForwardCall | None = None
        self.keeps = KeepRegistry()
        self._hook(self.base.register_forward_pre_hook(self._lock_call, with_kwargs=True, prepend=True))
        self._hook(self.base.register_forward_hook(self._end_call, with_kwargs=True, always_call=True))
        self.pruner = LLMInputPruner(language_model, self._keep_for_lm, runtime, on_pruned=self._on_prefill_pruned)
        self.pruner.install(self._hook)
        self.layer_pruner = None
        if "llm_layer" in runtime.method.sites:
            self.layer_pruner = LLMLayerPruner(language_model, runtime, self.pruner)
            self.check_layer_plan(self.layer_pruner.plan)
            self.layer_pruner.install(self._hook)
        self.attention = None
        if "attention" in runtime.method.sites:
            from .llm_attention import LLMAttention

            self.attention = LLMAttention(language_model, runtime, self.pruner)
            self.attention.install(self._hook, self._set_instance_attr)

    def check_layer_plan(self, plan: dict[int, str]) -> None:
        """Raise ValueError if this family cannot prune after the planned decoder layers."""

    def _on_prefill_pruned(self, full_len: int, kept_len: int) -> None:
        """A prefill dropped rows (full_len -> kept_len columns): families with position state to shift act here."""

    def remove(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for obj, name, old in reversed(self._restore):
            if old is MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
        self._restore.clear()


#: the forward kwarg that carries each modality's pixels
FEATURE_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}


@dataclass
class ForwardCall:
    """One forward pass of the base model: placeholder masks (B, L) and per-feature keep masks, by modality."""

    masks: dict[str, torch.Tensor]
    keeps: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class KeepRegistry:
    """Per-feature keep masks, found again by the identity of the feature tensors, else by their content.

    generate() pre-encodes images, then may repeat the same tensor objects for beams, so the identity of each
    per-image tensor in ``pooler_output`` links the vision site to the LM input. A (B, n, D) tensor output
    (OneVision video) is found by its own identity; rows that were copied (beam expansion repeats a tensor)
    are found by an exact content fingerprint."""

    def __init__(self, max_prints: int = 256) -> None:
        self._by_id: dict[int, tuple[weakref.ref, Any]] = {}
        self._by_print: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._max_prints = max_prints

    @staticmethod
    def _print(f: torch.Tensor) -> tuple:
        x = f.detach().float().flatten()
        w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float32).remainder_(97)
        return tuple(f.shape), str(f.dtype), float(x.sum()), float((x * w).sum())

    def remember(self, feats: Iterable[torch.Tensor] | torch.Tensor, keeps: Sequence[torch.Tensor]) -> None:
        self._by_id = {i: (r, k) for i, (r, k) in self._by_id.items() if r() is not None}
        if not isinstance(feats, torch.Tensor):  # a list/tuple: generate() repeats the same objects
            for f, k in zip(feats, keeps):
                self._by_id[id(f)] = (weakref.ref(f), k)
            return
        self._by_id[id(feats)] = (weakref.ref(feats), list(keeps))
        for f, k in zip(feats, keeps):  # rows of a tensor output lose their identity when it is repeated
            self._by_print[self._print(f)] = k
            if len(self._by_print) > self._max_prints:
                self._by_print.popitem(last=False)

    def lookup(self, feats: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Keep masks in ``feats`` order; features encoded without vtc (e.g. before patching) keep everything."""
        e = self._by_id.get(id(feats))
        if isinstance(feats, torch.Tensor) and e is not None and e[0]() is feats:
            return e[1]
        out = []
        for f in feats:
            e = self._by_id.get(id(f))
            if e is not None and e[0]() is f:
                out.append(e[1])
                continue
            k = self._by_print.get(self._print(f)) if self._by_print else None
            out.append(k if k is not None else torch.ones(f.shape[0], dtype=torch.bool, device=f.device))
        return out


def compose_keep(groups: Sequence[tuple[torch.Tensor, list[torch.Tensor] | None]]):
    """(keep (B, L), visual (B, L)) from (placeholder mask, per-feature keep masks in scatter order) pairs, or
    None when a group's masks are missing or disagree with its placeholders (the model's own check reports it).
    The last position is always kept: it feeds the next-token logits."""
    visual = groups[0][0].clone()
    for mask, _ in groups[1:]:
        visual |= mask
    keep = ~visual
    for mask, keeps in groups:
        n = int(mask.sum())
        if not n:
            continue
        if keeps is None:
            return None
        flat = torch.cat(keeps).to(keep.device)
        if flat.numel() != n:
            return None
        keep[mask] = flat
    keep[:, -1] = True
    return keep, visual

ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS.append(cls)
    return cls


def find_adapter(model: nn.Module) -> type[Adapter]:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls
    supported = sorted({n for a in ADAPTERS for n in a.model_classes})
    raise TypeError(f"vtc does not support {type(model).__name__}; supported model classes: {', '.join(supported)}")
