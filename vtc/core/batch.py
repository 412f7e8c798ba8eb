"""Per-sample keep sets: gather to a left re-padded batch and scatter back."""
from __future__ import annotations

import torch

from .. import kernels


def left_repad_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a boolean keep mask (B, L) into a gather index (B, Lk) and a validity mask (B, Lk).

    Kept positions stay in order and are right-aligned (rows with fewer kept positions get left padding,
    matching the left padding generation uses). Padding slots point at position 0 and are marked invalid.
    """
    b, l = keep.shape
    counts = keep.sum(-1)
    lk = int(counts.max()) if b else 0
    # sort key: dropped positions first, kept positions after, each in original order
    pos = torch.arange(l, device=keep.device).expand(b, l)
    key = keep.long() * l + pos
    order = key.argsort(dim=-1)[:, l - lk :]
    valid = torch.arange(lk, device=keep.device).expand(b, lk) >= (lk - counts).unsqueeze(-1)
    index = torch.where(valid, order, torch.zeros_like(order))
    return index, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for x of shape (B, L, ...) and index (B, Lk): :func:`vtc.kernels.gather_rows` (a
    Triton kernel on CUDA, the torch reference elsewhere)."""
    return kernels.gather_rows(x, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`gather_rows`: place x (B, Lk, ...) at ``index`` in a zero (B, length, ...) tensor."""
    out = x.new_zeros(x.shape[0], length, *x.shape[2:])
    x = x * valid.reshape(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter_add(1, idx, x)
