"""Triton bit packing for the quantized KV cache: ``bits``-bit values (2 or 4), ``8 // bits`` per byte, the k-th
contiguous slice of a row's last dimension in bit field k (ZipCache's halves / quarters layout). One program per
row; ``PACK``: (rows, m) -> (rows, m // per), else the inverse."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_kernel(src_ptr, dst_ptr, W, BITS: tl.constexpr, PER: tl.constexpr, PACK: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mask_bits = (1 << BITS) - 1
    for c0 in range(0, W, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < W
        if PACK:
            acc = tl.zeros([BLOCK], dtype=tl.int32)
            for k in tl.static_range(PER):
                v = tl.load(src_ptr + row * W * PER + k * W + cols, mask=m, other=0).to(tl.int32)
                acc = acc | ((v & mask_bits) << (BITS * k))
            tl.store(dst_ptr + row * W + cols, acc.to(tl.uint8), mask=m)
        else:
            p = tl.load(src_ptr + row * W + cols, mask=m, other=0).to(tl.int32)
            for k in tl.static_range(PER):
                tl.store(dst_ptr + row * W * PER + k * W + cols, ((p >> (BITS * k)) & mask_bits).to(tl.uint8), mask=m)


def _run(src: torch.Tensor, dst: torch.Tensor, width: int, bits: int, pack: bool) -> None:
    rows = dst.numel() // (width if pack else width * (8 // bits)) if dst.numel() else 0
    if rows:
        _pack_kernel[(rows,)](src, dst, width, BITS=bits, PER=8 // bits, PACK=pack,
                              BLOCK=min(1024, triton.next_power_of_2(width)))


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.pack_bits` (2 and 4 bits)."""
    per = 8 // bits
    n = q.shape[-1]
    m = -(-n // per) * per
    q = q.to(torch.uint8)
    if m != n:
        q = torch.nn.functional.pad(q, (0, m - n))
    q = q.contiguous()
    out = torch.empty(*q.shape[:-1], m // per, dtype=torch.uint8, device=q.device)
    _run(q, out, m // per, bits, pack=True)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.unpack_bits` (2 and 4 bits)."""
    width = packed.shape[-1]
    out = torch.empty(*packed.shape[:-1], width * (8 // bits), dtype=torch.uint8, device=packed.device)
    _run(packed.contiguous(), out, width, bits, pack=False)
    return out[..., :n]
