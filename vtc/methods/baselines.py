"""Simple baselines every claim is compared against: random, uniform and pooling."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.select import grid_for_count, uniform_indices
from .base import Method, Selection, VisualInput


@dataclass
class RandomPruning(Method):
    """Keep a random subset. Seeded per call, so the same image size always gives the same subset
    (cached and uncached generation agree, and a batch equals its single runs)."""

    ratio: float | None = None
    tokens: int | None = None
    seed: int = 0

    name = "random"
    sites = ("vision",)
    batched = True

    def select(self, visual: VisualInput) -> Selection:
        *lead, n, _ = visual.features.shape
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=g)[: visual.budget].sort().values
        return Selection(idx.to(visual.features.device).expand(*lead, -1))


@dataclass
class UniformPruning(Method):
    """Keep evenly spaced tokens in raster order (the centre token of each of k equal segments)."""

    ratio: float | None = None
    tokens: int | None = None

    name = "uniform"
    sites = ("vision",)
    batched = True

    def select(self, visual: VisualInput) -> Selection:
        *lead, n, _ = visual.features.shape
        return Selection(uniform_indices(n, visual.budget, visual.features.device).expand(*lead, -1))


@dataclass
class PoolCompression(Method):
    """Average-pool the patch grid to exactly k tokens (a gh x gw grid, gh*gw == k, closest to the image aspect).

    Each pooled token takes the slot (and so the position) of the patch at its cell's centre; choose
    ``tokens`` with a near-square factorisation (144 = 12x12, 64 = 8x8) for meaningful cells.
    """

    ratio: float | None = None
    tokens: int | None = None

    name = "pool"
    sites = ("vision",)

    def select(self, visual: VisualInput) -> Selection:
        n, d = visual.features.shape
        if visual.grid is None or visual.grid[0] * visual.grid[1] != n:
            raise ValueError("method 'pool' needs tokens that form a 2-D patch grid; this input has none")
        h, w = visual.grid
        k = visual.budget
        if k == n:
            return Selection(torch.arange(n, device=visual.features.device))
        gh, gw = grid_for_count(k, h, w)
        x = visual.features.T.reshape(1, d, h, w)
        pooled = F.adaptive_avg_pool2d(x.float(), (gh, gw)).to(x.dtype).reshape(d, k).T
        # slot of each cell: the patch at the cell centre (adaptive pooling's cell bounds)
        rows = torch.tensor([((i * h) // gh + ((i + 1) * h + gh - 1) // gh - 1) // 2 for i in range(gh)])
        cols = torch.tensor([((j * w) // gw + ((j + 1) * w + gw - 1) // gw - 1) // 2 for j in range(gw)])
        idx = (rows[:, None] * w + cols[None, :]).reshape(-1).to(visual.features.device)
        return Selection(idx, pooled.contiguous())
