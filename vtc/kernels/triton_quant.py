"""Fused quantize + pack and unpack + dequantize for the mixed-precision KV cache: one program per (b, h, t) row
reads the row's D values and its statistics (broadcast by strides, so per-channel and per-token statistics are
never materialized) and writes ``D * bits / 8`` bytes, in ZipCache's layout (bit field k holds the k-th
contiguous slice of the row). Same contract as the torch reference in :mod:`vtc.kernels.reference`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stat(ptr, b, h, t, s_b, s_h, s_t, s_d, cols, m):
    return tl.load(ptr + b * s_b + h * s_h + t * s_t + cols * s_d, mask=m, other=1.0).to(tl.float32)


@triton.jit
def _quant_kernel(x_ptr, out_ptr, step_ptr, min_ptr, scale_ptr, H, T, D, W,
                  x_b, x_h, x_t, st_b, st_h, st_t, st_d, mn_b, mn_h, mn_t, mn_d, sc_b, sc_h, sc_t, sc_d,
                  BITS: tl.constexpr, PER: tl.constexpr, HAS_SCALE: tl.constexpr, PACK: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    h = (row // T) % H
    b = row // (T * H)
    qmax = (1 << BITS) - 1
    for c0 in range(0, W, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < W
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        if not PACK:
            acc = tl.load(out_ptr + row * W + cols, mask=m, other=0).to(tl.int32)
        for k in tl.static_range(PER):
            d = k * W + cols
            dm = m & (d < D)
            step = _stat(step_ptr, b, h, t, st_b, st_h, st_t, st_d, d, dm)
            lo = _stat(min_ptr, b, h, t, mn_b, mn_h, mn_t, mn_d, d, dm)
            if PACK:
                v = tl.load(x_ptr + b * x_b + h * x_h + t * x_t + d, mask=dm, other=0.0).to(tl.float32)
                if HAS_SCALE:
                    v = tl.math.div_rn(v, _stat(scale_ptr, b, h, t, sc_b, sc_h, sc_t, sc_d, d, dm))
                q = tl.floor(tl.math.div_rn(v - lo, step) + 0.5)
                q = tl.minimum(tl.maximum(q, 0.0), qmax * 1.0).to(tl.int32)
                q = tl.where(dm, q, 0)
                acc = acc | (q << (BITS * k))
            else:
                q = ((acc >> (BITS * k)) & qmax).to(tl.float32)
                v = q * step + lo
                if HAS_SCALE:
                    v = v * _stat(scale_ptr, b, h, t, sc_b, sc_h, sc_t, sc_d, d, dm)
                tl.store(x_ptr + b * x_b + h * x_h + t * x_t + d, v.to(x_ptr.dtype.element_ty), mask=dm)
        if PACK:
            tl.store(out_ptr + row * W + cols, acc.to(tl.uint8), mask=m)


def _launch(x, packed, step, minimum, scale, bits, pack):
    b, h, t, d = x.shape
    width = packed.shape[-1]
    rows = b * h * t
    if rows == 0 or d == 0:
        return
    st = step.expand_as(x).stride()
    mn = minimum.expand_as(x).stride()
    sc = scale.expand_as(x).stride() if scale is not None else (0, 0, 0, 0)
    _quant_kernel[(rows,)](x, packed, step, minimum, scale if scale is not None else step, h, t, d, width,
                           *x.stride()[:3], *st, *mn, *sc, BITS=bits, PER=8 // bits, HAS_SCALE=scale is not None,
                           PACK=pack, BLOCK=min(256, triton.next_power_of_2(width)))


def quantize_pack(x: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor | None,
                  bits: int) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.quantize_pack` (2 and 4 bits, x (B, H, T, D))."""
    x = x.contiguous()
    width = -(-x.shape[-1] // (8 // bits))
    out = torch.empty(*x.shape[:-1], width, dtype=torch.uint8, device=x.device)
    _launch(x, out, step, minimum, scale, bits, pack=True)
    return out


def unpack_dequantize(packed: torch.Tensor, bits: int, n: int, step: torch.Tensor, minimum: torch.Tensor,
                      scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.unpack_dequantize` (2 and 4 bits)."""
    out = torch.empty(*packed.shape[:-1], n, dtype=dtype, device=packed.device)
    _launch(out, packed.contiguous(), step, minimum, scale, bits, pack=False)
    return out
