"""Torch reference implementations of :mod:`vtc.kernels` (the ground truth the kernels are tested against)."""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for x (B, L, ...) and index (B, K). Advanced indexing, not ``gather`` with an expanded
    index: the same result, and on a CPU several times faster for wide rows."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]
