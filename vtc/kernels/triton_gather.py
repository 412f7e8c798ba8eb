"""Triton ragged row gather: one program per output row (b, j) copies x[b, index[b, j], :] in blocks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, L, K, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * K + j
    b = row // K
    src = tl.load(idx_ptr + row).to(tl.int64)
    base = (b.to(tl.int64) * L + src) * D
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        m = offs < D
        tl.store(out_ptr + row.to(tl.int64) * D + offs, tl.load(x_ptr + base + offs, mask=m), mask=m)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.gather_rows`."""
    if x.shape[0] == 1 and index.shape[0] > 1:  # one table for every row (as advanced indexing broadcasts)
        x = x.expand(index.shape[0], *x.shape[1:])
    b, length = x.shape[:2]
    k = index.shape[1]
    trailing = x.shape[2:]
    out = torch.empty(b, k, *trailing, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    d = out[0, 0].numel() if trailing else 1
    src = x.contiguous()
    if src.dtype == torch.bool:  # Triton has no bool pointers: copy the bytes
        src, out_view = src.view(torch.uint8), out.view(torch.uint8)
    else:
        out_view = out
    idx = index.to(device=x.device, dtype=torch.int64).expand(b, k).contiguous()
    block = min(1024, triton.next_power_of_2(d))
    _gather_rows_kernel[(b * k,)](src, idx, out_view, length, k, d, BLOCK=block)
    return out
