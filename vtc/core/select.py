"""Token budgets and order-preserving selection."""
from __future__ import annotations

import math

import torch


def budget(n: int, ratio: float | None = None, tokens: int | None = None) -> int:
    """Number of tokens to keep out of ``n``: ``round(n * ratio)`` (at least 1) or ``min(tokens, n)``."""
    if tokens is not None:
        return max(1, min(int(tokens), n))
    if ratio is None:
        return n
    return max(1, min(n, int(round(n * ratio))))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dim, returned in ascending (raster) order.

    Ties are broken towards the lower index, so the result is deterministic.
    """
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    # stable descending sort breaks ties by position, unlike topk
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def uniform_indices(n: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``k`` evenly spaced indices in ``[0, n)``: the centre of each of k equal segments."""
    if k >= n:
        return torch.arange(n, device=device)
    idx = ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * n / k).floor().long()
    return idx.clamp_(max=n - 1)


def grid_for_count(k: int, h: int, w: int) -> tuple[int, int]:
    """A (gh, gw) grid with exactly ``gh * gw == k`` cells, gh <= h, gw <= w, closest to the aspect h/w."""
    best: tuple[float, int, int] | None = None
    target = math.log(h / w)
    for gh in range(1, min(h, k) + 1):
        if k % gh:
            continue
        gw = k // gh
        if gw > w:
            continue
        err = abs(math.log(gh / gw) - target)
        if best is None or err < best[0]:
            best = (err, gh, gw)
    if best is None:
        raise ValueError(f"cannot pool a {h}x{w} grid to exactly {k} tokens")
    return best[1], best[2]
