"""Adapter base class and lookup. Adapters are the only code that knows a model family's internals."""
from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn

from ..runtime import Runtime
from ..sites import VisionInfo


class Adapter:
    """Installs removable, per-instance hooks on one model for one :class:`Runtime`."""

    #: class names this adapter accepts (the model's class or any base class)
    model_classes: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []

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
                f"the {self.family} adapter does not support site(s) {unsupported}; supported: {list(self.supported_sites)}"
            )

    supported_sites: ClassVar[tuple[str, ...]] = ()

    def install(self, runtime: Runtime) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----- helpers for subclasses: everything installed is recorded so remove() undoes it exactly
    def _hook(self, handle: Any) -> None:
        self._handles.append(handle)

    def _set_instance_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        self._restore.append((obj, name, obj.__dict__[name] if had else _MISSING))
        setattr(obj, name, value)

    def remove(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for obj, name, old in reversed(self._restore):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
        self._restore.clear()


_MISSING = object()

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
