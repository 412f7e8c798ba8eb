"""Torch reference implementations of :mod:`vtc.kernels` (the ground truth the kernels are tested against)."""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for x (B, L, ...) and index (B, K). Advanced indexing, not ``gather`` with an expanded
    index: the same result, and on a CPU several times faster for wide rows."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def add_rows_at(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` (B, T, ...) with each ``src[b, j]`` (B, r, ...) added at row ``index[b, j]`` (B, r);
    repeated indices accumulate (the size-weighted scatter-reduce of bipartite merging)."""
    b, t = base.shape[:2]
    flat = (index + torch.arange(b, device=index.device)[:, None] * t).flatten()
    return base.flatten(0, 1).index_add(0, flat, src.flatten(0, 1)).view_as(base)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q`` (..., n) integers in [0, 2**bits) -> uint8 (..., ceil(n * bits / 8))."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    per = 8 // bits
    n = q.shape[-1]
    m = -(-n // per) * per
    if m != n:
        q = torch.nn.functional.pad(q, (0, m - n))
    parts = q.reshape(*q.shape[:-1], per, m // per)  # part k = the k-th contiguous slice of the last dim
    out = torch.zeros(*q.shape[:-1], m // per, dtype=torch.uint8, device=q.device)
    for k in range(per):
        out |= parts[..., k, :] << (bits * k)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n * bits / 8)) -> uint8 (..., n)."""
    if bits == 8:
        return packed[..., :n]
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (bits * k)) & mask for k in range(per)]
    return torch.cat(parts, dim=-1)[..., :n]


def quantize_pack(x: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor | None,
                  bits: int) -> torch.Tensor:
    """``q = floor((x / scale - minimum) / step + 1/2)`` clamped to [0, 2**bits), packed by :func:`pack_bits`; x
    (B, H, T, D) float32, the statistics broadcastable to it (float32 arithmetic throughout)."""
    v = x.float() if scale is None else x.float() / scale.float()
    q = torch.floor((v - minimum.float()) / step.float() + 0.5).clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return pack_bits(q, bits)


def unpack_dequantize(packed: torch.Tensor, bits: int, n: int, step: torch.Tensor, minimum: torch.Tensor,
                      scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``(q * step + minimum) * scale`` in float32, cast to ``dtype``; q unpacked from (B, H, T, ceil(n*bits/8))."""
    x = unpack_bits(packed, bits, n).float() * step.float() + minimum.float()
    return (x if scale is None else x * scale.float()).to(dtype)


def masked_softmax_qk(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the keys of q·kᵀ (q carries any scale), float32: q (B, H, R, D), k (B, H, S, D). ``allowed``
    (B, R, Sm) bool masks the last Sm <= S keys (the first S - Sm are allowed for every row); None: all allowed. A
    row that allows no key gives zeros. Written into ``out`` (B, H, R, S) float32 when given (in place: the logits
    never get a buffer of their own)."""
    out = torch.matmul(q.float(), k.float().transpose(-1, -2), out=out)
    sm = 0 if allowed is None else allowed.shape[-1]
    if sm:
        out[..., out.shape[-1] - sm:].masked_fill_(~allowed[:, None], float("-inf"))
    torch.softmax(out, dim=-1, out=out)
    if sm and sm == out.shape[-1]:
        out.nan_to_num_(0.0)  # only a mask over every key can leave a row with nothing allowed
    return out
