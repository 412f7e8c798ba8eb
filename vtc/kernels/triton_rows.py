"""Triton row kernels: the ragged gather of kept rows and the scatter-add of merged rows, one program per indexed
row (b, j) moving D elements in blocks. ``GATHER``: out[b, j] = x[b, index[b, j]]; else base[b, index[b, j]] +=
src[b, j] with atomics (repeated destinations accumulate)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(out_ptr, idx_ptr, in_ptr, T, R, D, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * R + j
    indexed = ((row // R).to(tl.int64) * T + tl.load(idx_ptr + row).to(tl.int64)) * D  # row index[b, j] of batch b
    plain = row.to(tl.int64) * D  # row j of batch b in the (B, R, D) side
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        m = offs < D
        if GATHER:
            tl.store(out_ptr + plain + offs, tl.load(in_ptr + indexed + offs, mask=m), mask=m)
        else:
            tl.atomic_add(out_ptr + indexed + offs, tl.load(in_ptr + plain + offs, mask=m), mask=m)


def _launch(out: torch.Tensor, index: torch.Tensor, inp: torch.Tensor, t: int, gather: bool) -> None:
    b, r = index.shape
    d = out[0, 0].numel() if out.dim() > 2 else 1
    _rows_kernel[(b * r,)](out, index.to(torch.int64).contiguous(), inp, t, r, d, GATHER=gather,
                           BLOCK=min(1024, triton.next_power_of_2(d)))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.gather_rows`."""
    if x.shape[0] == 1 and index.shape[0] > 1:  # one table for every row (as advanced indexing broadcasts)
        x = x.expand(index.shape[0], *x.shape[1:])
    out = torch.empty(x.shape[0], index.shape[1], *x.shape[2:], dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    src = x.contiguous()
    if src.dtype == torch.bool:  # Triton has no bool pointers: move the bytes
        src, view = src.view(torch.uint8), out.view(torch.uint8)
    else:
        view = out
    _launch(view, index.expand(x.shape[0], -1), src, x.shape[1], gather=True)
    return out


def add_rows_at(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.add_rows_at` (float32 accumulation for half inputs)."""
    acc = base.to(torch.float32, copy=True).contiguous()
    if index.shape[1] and acc.numel():
        _launch(acc, index, src.to(torch.float32).contiguous(), base.shape[1], gather=False)
    return acc.to(base.dtype)
