"""vtc's fused operations: one Python signature each, a Triton implementation and a torch reference.

The backend is chosen once per call from ``VTC_KERNELS`` (or :func:`set_backend`): ``torch`` (the reference,
everywhere), ``triton`` (Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``, as the tests run them),
``auto`` (default: Triton for CUDA tensors when Triton imports, else torch). ``calls`` counts which
implementation ran, so tests can prove the kernel path was taken.
"""
from __future__ import annotations

import os
from collections import Counter

import torch

from . import reference

BACKENDS = ("auto", "torch", "triton")
_override: str | None = None
#: how often each implementation ran ("torch.gather_rows", "triton.gather_rows", ...)
calls: Counter[str] = Counter()


def set_backend(name: str | None) -> None:
    """Force a backend for this process (None: back to ``VTC_KERNELS`` / auto)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; allowed: {', '.join(BACKENDS)}")
    _override = name


def backend() -> str:
    """The configured backend name (``auto``, ``torch`` or ``triton``)."""
    name = _override or os.environ.get("VTC_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"VTC_KERNELS={name!r} is not a kernel backend; allowed: {', '.join(BACKENDS)}")
    return name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    name = backend()
    if name == "torch":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if name == "triton":
        if not _triton_available():
            raise ImportError("VTC_KERNELS=triton needs Triton: pip install 'vtc[kernels]'")
        if t.device.type != "cuda" and not interpret:
            raise RuntimeError("the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                               f"got a {t.device.type} tensor: use VTC_KERNELS=torch or auto")
        return True
    return t.device.type == "cuda" and _triton_available()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for x (B, L, ...) and index (B, K): the ragged re-pack of kept rows."""
    if _use_triton(x):
        from .triton_rows import gather_rows as triton_gather

        calls["triton.gather_rows"] += 1
        return triton_gather(x, index)
    calls["torch.gather_rows"] += 1
    return reference.gather_rows(x, index)


def add_rows_at(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` (B, T, ...) with ``src`` (B, r, ...) added at rows ``index`` (B, r), repeats accumulating:
    the scatter-reduce of bipartite (ToMe / AIM) merging. Float atomics on a GPU: equal to the reference up to
    summation order (1e-5)."""
    if _use_triton(base) and base.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from .triton_rows import add_rows_at as triton_add

        calls["triton.add_rows_at"] += 1
        return triton_add(base, index, src)
    calls["torch.add_rows_at"] += 1
    return reference.add_rows_at(base, index, src)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q`` (..., n) integers in [0, 2**bits) -> uint8 (..., ceil(n * bits / 8)) (see :mod:`vtc.core.quant`)."""
    if bits in (2, 4) and _use_triton(q):
        from .triton_pack import pack_bits as triton_pack

        calls["triton.pack_bits"] += 1
        return triton_pack(q, bits)
    calls["torch.pack_bits"] += 1
    return reference.pack_bits(q, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n * bits / 8)) -> uint8 (..., n)."""
    if bits in (2, 4) and _use_triton(packed):
        from .triton_pack import unpack_bits as triton_unpack

        calls["triton.unpack_bits"] += 1
        return triton_unpack(packed, bits, n)
    calls["torch.unpack_bits"] += 1
    return reference.unpack_bits(packed, bits, n)


def quantize_pack(x: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor | None,
                  bits: int) -> torch.Tensor:
    """Quantize x (B, H, T, D) with broadcastable statistics and bit-pack along D in one pass:
    ``floor((x / scale - minimum) / step + 1/2)`` clamped to [0, 2**bits) (see :mod:`vtc.core.quant`)."""
    if bits in (2, 4) and x.dim() == 4 and _use_triton(x):
        from .triton_quant import quantize_pack as triton_quantize

        calls["triton.quantize_pack"] += 1
        return triton_quantize(x, step, minimum, scale, bits)
    calls["torch.quantize_pack"] += 1
    return reference.quantize_pack(x, step, minimum, scale, bits)


def unpack_dequantize(packed: torch.Tensor, bits: int, n: int, step: torch.Tensor, minimum: torch.Tensor,
                      scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_pack` up to the quantization error: ``(q * step + minimum) * scale``."""
    if bits in (2, 4) and packed.dim() == 4 and _use_triton(packed):
        from .triton_quant import unpack_dequantize as triton_dequantize

        calls["triton.unpack_dequantize"] += 1
        return triton_dequantize(packed, bits, n, step, minimum, scale, dtype)
    calls["torch.unpack_dequantize"] += 1
    return reference.unpack_dequantize(packed, bits, n, step, minimum, scale, dtype)


def masked_softmax_qk(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys of q·kᵀ for q (B, H, R, D), k (B, H, S, D), with ``allowed`` (B, R, Sm) masking the last
    Sm keys (None: all allowed); rows with nothing allowed -> zeros; float32, into ``out`` when given (AIM's
    PageRank maps, a row block at a time)."""
    if q.dim() == 4 and _use_triton(q):
        from .triton_softmax import masked_softmax_qk as triton_softmax

        calls["triton.masked_softmax_qk"] += 1
        return triton_softmax(q, k, allowed, out)
    calls["torch.masked_softmax_qk"] += 1
    return reference.masked_softmax_qk(q, k, allowed, out)


__all__ = ["BACKENDS", "backend", "set_backend", "gather_rows", "add_rows_at", "pack_bits", "unpack_bits",
           "quantize_pack", "unpack_dequantize", "masked_softmax_qk", "calls"]
