"""Fused masked softmax of q·kᵀ (AIM's PageRank maps): one program per (b, h, tile of rows) walks the keys in
tiles twice, first for the row maxima and sums (online), then to write the normalised probabilities, so the
logits are never stored. The mask covers the last ``allowed.shape[-1]`` keys; the ones before are allowed for every
row. Same contract as :func:`vtc.kernels.reference.masked_softmax_qk`; products in IEEE float32 (no TF32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits(q, k_base, k_r, a_base, rows, cols, R, S, S0, D, SM, BD: tl.constexpr, MASKED: tl.constexpr):
    dd = tl.arange(0, BD)
    k = tl.load(k_base + cols[:, None].to(tl.int64) * k_r + dd[None, :],
                mask=(cols[:, None] < S) & (dd[None, :] < D), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    ok = (rows[:, None] < R) & (cols[None, :] < S)
    if MASKED:
        tail = cols[None, :] >= S0
        a = tl.load(a_base + rows[:, None].to(tl.int64) * SM + (cols[None, :] - S0), mask=ok & tail, other=1)
        ok = ok & (a != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _softmax_kernel(q_ptr, k_ptr, a_ptr, out_ptr, H, R, S, S0, D, SM, q_b, q_h, q_r, k_b, k_h, k_r,
                    MASKED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    q = tl.load(q_ptr + b * q_b + h * q_h + rows[:, None].to(tl.int64) * q_r + dd[None, :],
                mask=(rows[:, None] < R) & (dd[None, :] < D), other=0.0)
    k_base = k_ptr + b * k_b + h * k_h
    a_base = a_ptr + b * R * SM
    m = tl.full([BM], float("-inf"), tl.float32)
    total = tl.zeros([BM], tl.float32)
    for c0 in range(0, S, BN):
        s = _logits(q, k_base, k_r, a_base, rows, c0 + tl.arange(0, BN), R, S, S0, D, SM, BD, MASKED)
        new = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(new == float("-inf"), 0.0, new)  # rows with nothing allowed yet
        total = total * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), 1)
        m = new
    safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(total > 0, 1.0 / total, 0.0)  # a row that allows nothing -> zeros
    o_base = out_ptr + bh * R * S
    for c0 in range(0, S, BN):
        cols = c0 + tl.arange(0, BN)
        s = _logits(q, k_base, k_r, a_base, rows, cols, R, S, S0, D, SM, BD, MASKED)
        p = tl.exp(s - safe[:, None]) * inv[:, None]
        tl.store(o_base + rows[:, None].to(tl.int64) * S + cols[None, :], p,
                 mask=(rows[:, None] < R) & (cols[None, :] < S))


def masked_softmax_qk(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`vtc.kernels.reference.masked_softmax_qk`."""
    bsz, h, r, d = q.shape
    s = k.shape[2]
    if out is None:
        out = torch.empty(bsz, h, r, s, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=torch.float32, device=q.device)
    q, k = q.float(), k.float()
    q, k = (q if q.stride(-1) == 1 else q.contiguous()), (k if k.stride(-1) == 1 else k.contiguous())
    sm = 0 if allowed is None else allowed.shape[-1]
    mask = (torch.ones(1, dtype=torch.uint8, device=q.device) if allowed is None
            else allowed.expand(bsz, r, sm).contiguous().view(torch.uint8))
    grid = (bsz * h, triton.cdiv(r, 32))
    _softmax_kernel[grid](q, k, mask, target, h, r, s, s - sm, d, max(sm, 1), q.stride(0), q.stride(1), q.stride(2),
                          k.stride(0), k.stride(1), k.stride(2), MASKED=sm > 0,
                          BM=32, BN=32, BD=max(16, triton.next_power_of_2(d)))
    if target is not out:
        out.copy_(target)
    return out
