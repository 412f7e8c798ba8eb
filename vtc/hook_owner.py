"""What vtc hangs on a model, made safe to copy, refuse to pickle, and recognisable.

Every hook vtc installs is a bound method (or a ``functools.partial`` of one) of a :class:`HookOwner`, and every
wrapped model method is a :class:`WrappedMethod`, never a closure: ``copy.deepcopy(model)`` then copies the owners
along with the model (through one memo), so the copy is a correctly patched model with its own state that
``vtc.unpatch`` restores, and the original is untouched. Pickling a patched model (``torch.save(model)``) is
refused with a clear message. :func:`vtc_owner` tells whether a hook or attribute belongs to vtc, so a model
whose sub-module or parent is already patched can be refused.
"""
from __future__ import annotations

import copy
import functools
import threading
from typing import Any, Callable

PICKLE_MESSAGE = ("vtc: a patched model cannot be pickled ({what} holds vtc's hooks); call vtc.unpatch(model) "
                  "before pickle / torch.save(model), or save model.state_dict()")


class HookOwner:
    """Base of every object whose methods vtc installs on a model."""

    def __reduce_ex__(self, protocol: Any):
        raise TypeError(PICKLE_MESSAGE.format(what=type(self).__name__))

    def __deepcopy__(self, memo: dict) -> "HookOwner":
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


class CallLock(HookOwner):
    """A re-entrant lock that serializes one patched model's forward passes (threads share the model, not the
    per-call state); a deep copy gets a fresh, unlocked one."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self) -> None:
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "CallLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict) -> "CallLock":
        new = CallLock()
        memo[id(self)] = new
        return new


class WrappedMethod(HookOwner):
    """``obj.name`` replaced per instance: calls ``fn(original, *args, **kwargs)``. Keeps the original's name,
    docstring and signature (``inspect.signature`` follows ``__wrapped__``), which generate() may inspect."""

    def __init__(self, fn: Callable[..., Any], original: Callable[..., Any]):
        self.fn = fn
        functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.__wrapped__, *args, **kwargs)


class _Missing:
    """Marks an instance attribute that did not exist before vtc set it (one object, also across copies)."""

    def __deepcopy__(self, memo: dict) -> "_Missing":
        return self

    def __copy__(self) -> "_Missing":
        return self

    def __reduce__(self) -> str:
        return "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def vtc_owner(obj: Any) -> HookOwner | None:
    """The vtc object behind a hook / attribute value (a bound method, a partial of one, a wrapper), else None."""
    if isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, HookOwner):
        return obj
    owner = getattr(obj, "__self__", None)
    return owner if isinstance(owner, HookOwner) else None


def patched_modules(model: Any) -> list[str]:
    """Names of ``model``'s sub-modules (itself included, as ``""``) that carry vtc hooks or wrapped methods."""
    found = []
    for name, m in model.named_modules():
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        if any(vtc_owner(h) is not None for h in hooks) or any(
                isinstance(v, WrappedMethod) for v in m.__dict__.values()):
            found.append(name)
    return found
