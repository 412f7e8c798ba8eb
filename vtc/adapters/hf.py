"""Every name vtc looks up inside transformers, in one place, feature-detected rather than version-compared.

One code path serves every release in the tested range. What moved between releases, and how it is read here:

- the KV-cache keyword: ``past_key_values`` up to 5.23; from 5.24 ``cache`` in ``generate()`` and in every
  model / decoder-layer / attention ``forward`` (a ``deprecate_kwarg`` wrapper maps the old name *inside* the
  wrapped forward, i.e. after forward pre-hooks run, so a pre-hook sees whichever name the caller used).
  :func:`cache_of` reads either; :func:`output_cache` reads model outputs (``.cache`` from 5.24).
- hub kernels: 5.25 kernelizes models in ``from_pretrained`` by default when the ``kernels`` package is present
  (``use_kernels``); :func:`check_not_kernelized` refuses such a model clearly, :data:`LOAD_KWARGS` turns it off
  in vtc's own loader (``from_pretrained`` accepts ``use_kernels`` on every release in the range).
- module-level helpers the adapters call (rotary embeddings, AnyRes grid shapes, Qwen2.5's window index) are
  looked up by :func:`module_function` next to the module that uses them, so a move shows up as a clear error.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import torch.nn as nn

#: releases CI tests (README and pyproject state the same range); ``patch()`` warns once outside it
TESTED_MIN, TESTED_BELOW = (5, 23), (5, 26)
#: forward keywords that carry the KV cache, newest first
CACHE_KEYS = ("cache", "past_key_values")
#: keyword arguments vtc's own loader passes to ``from_pretrained`` (kernelized layers bypass vtc's checks)
LOAD_KWARGS = {"use_kernels": False}

_warned: set[str] = set()


def transformers_version() -> tuple[int, ...]:
    import transformers

    parts = []
    for p in transformers.__version__.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def tested_range() -> str:
    return f">={TESTED_MIN[0]}.{TESTED_MIN[1]},<{TESTED_BELOW[0]}.{TESTED_BELOW[1]}"


def warn_if_untested() -> bool:
    """Warn once per process when the installed transformers is outside the tested range; True if it is."""
    import transformers

    v = transformers_version()[:2]
    if TESTED_MIN <= v < TESTED_BELOW:
        return False
    if transformers.__version__ not in _warned:
        _warned.add(transformers.__version__)
        warnings.warn(f"vtc is tested with transformers {tested_range()}; this is {transformers.__version__}. "
                      "Hooks that read transformers' internals may misbehave: check outputs against ratio=1.0.",
                      RuntimeWarning, stacklevel=3)
    return True


def cache_key(kwargs: dict[str, Any]) -> str | None:
    """The keyword that carries the KV cache in these forward kwargs (``cache`` or ``past_key_values``)."""
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:
            return key
    return None


def cache_keyword(module: nn.Module, kwargs: dict[str, Any]) -> str:
    """The keyword under which to pass a cache to ``module``'s forward: the one the caller used, else the one
    its signature names (``cache`` from 5.24, ``past_key_values`` before)."""
    import inspect

    for key in CACHE_KEYS:
        if key in kwargs:
            return key
    params = inspect.signature(module.forward).parameters
    return next((key for key in CACHE_KEYS if key in params), CACHE_KEYS[-1])


def cache_of(kwargs: dict[str, Any]) -> Any | None:
    """The KV cache passed to a forward call, whichever keyword the caller used."""
    key = cache_key(kwargs)
    return kwargs[key] if key is not None else None


def output_cache(output: Any) -> Any | None:
    """The KV cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    for key in CACHE_KEYS:
        try:
            value = output[key] if isinstance(output, dict) and key in output else getattr(output, key, None)
        except (AttributeError, KeyError):
            value = None
        if value is not None:
            return value
    return None


def seq_length(cache: Any | None, layer: int = 0) -> int:
    """Tokens already in ``cache`` at decoder layer ``layer`` (0 for no cache). Layers of a pruned prefill hold
    fewer entries than layer 0, and layer 0 is updated first within a forward pass."""
    return int(cache.get_seq_length(layer)) if cache is not None else 0


def check_not_kernelized(model: nn.Module) -> None:
    """Refuse a model whose layers transformers replaced by hub kernels: vtc's hooks and its equivalence tests
    are on the torch layers."""
    if bool(getattr(model, "use_kernels", False)):
        undo = ("call model.reset_kernels() first, or " if hasattr(model, "reset_kernels") else "")
        raise ValueError(
            "vtc: this model's layers were replaced by hub kernels (transformers' use_kernels, on by default in "
            "from_pretrained from 5.25 when the `kernels` package is installed); vtc supports the torch layers "
            f"only: {undo}load it with from_pretrained(..., use_kernels=False)"
        )


def module_function(obj: Any, name: str, required: bool = True):
    """A helper function defined in the transformers module of ``obj``'s class (e.g. ``apply_rotary_pos_emb``
    next to an attention class), or None / a clear error when that release has moved it."""
    mod = sys.modules.get(type(obj).__module__)
    fn = getattr(mod, name, None)
    if fn is None and required:
        raise ValueError(f"vtc cannot find {name} in {type(obj).__module__} (transformers "
                         f"{'.'.join(map(str, transformers_version()))}); supported: {tested_range()}")
    return fn


def llava_next_helpers():
    """``(image_size_to_num_patches, get_anyres_image_grid_shape)`` of the LLaVA-NeXT modeling module."""
    from transformers.models.llava_next import modeling_llava_next as m

    return m.image_size_to_num_patches, m.get_anyres_image_grid_shape


def qwen_window_index(grid, spatial_merge_size: int, window_size: int, patch_size: int):
    """Qwen2.5-VL's merge-unit permutation into window order (the same helper the tower calls)."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid, spatial_merge_size=spatial_merge_size, window_size=window_size,
                                   patch_size=patch_size)[0]
