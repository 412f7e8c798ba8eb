"""VAR's KV cache as an explicit object: one :class:`VARLayerCache` per block, rows = the CFG batch.

Rows ``[0, B)`` are the conditional half and ``[B, 2B)`` the unconditional half, as the authors build the batch.
Each layer stores its heads in one or more :class:`KVGroup`s: a group is a dense (rows, heads_g, T_g, d) block
whose keys may be any subset of the sequence (``pos`` says which), so a compressor can give groups of heads
different lengths (HACK's contextual / structural heads) and the memory really shrinks. An uncompressed cache
is one group holding every head and every position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class KVGroup:
    """heads: (Hg,) head indices; k, v: (R, Hg, T, d); pos: (R, Hg, T) sequence position of each stored key."""

    heads: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


#: compressor(layer, q, scale_index) -> None; called after the current scale's keys were appended
Compressor = Callable[["VARLayerCache", torch.Tensor, int], None]


class VARLayerCache:
    """One block's cache. ``update`` appends the current scale, lets the compressor (if any) shrink the groups, and
    returns the groups attention runs over."""

    def __init__(self, index: int, num_heads: int):
        self.index, self.num_heads = index, num_heads
        self.groups: list[KVGroup] = []
        self.length = 0  # positions seen so far (logical sequence length)
        self.scale_starts: list[int] = []  # sequence position where each scale began
        self.compressor: Compressor | None = None

    def update(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, si: int) -> list[KVGroup]:
        """Append this scale's keys/values (R, H, l, d); q (R, H, l, d) are its queries (for scoring)."""
        R, H, l, _ = k.shape
        new_pos = torch.arange(self.length, self.length + l, device=k.device)
        self.scale_starts.append(self.length)
        self.length += l
        if not self.groups:
            self.groups = [KVGroup(torch.arange(H, device=k.device), k, v, new_pos.expand(R, H, l))]
        else:
            for g in self.groups:
                hk = k if g.heads.numel() == H else k[:, g.heads]
                hv = v if g.heads.numel() == H else v[:, g.heads]
                g.k, g.v = torch.cat([g.k, hk], 2), torch.cat([g.v, hv], 2)
                g.pos = torch.cat([g.pos, new_pos.expand(R, g.heads.numel(), l)], 2)
        if self.compressor is not None:
            self.compressor(self, q, si)
        return self.groups

    def scale_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Scale index of each sequence position."""
        starts = torch.tensor(self.scale_starts, device=pos.device)
        return torch.searchsorted(starts, pos.contiguous(), right=True) - 1

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def stored_tokens(self) -> int:
        """Keys held, summed over rows and heads."""
        return sum(g.pos.numel() for g in self.groups)


class VARKVCache:
    """Every block's cache for one generation. ``peak_bytes``: the most it held after any scale; ``dense_peak_bytes``:
    what an uncompressed cache of the same generation holds then (every position of every head, same dtype)."""

    def __init__(self, depth: int, num_heads: int, batch: int, cfg: bool):
        self.layers = [VARLayerCache(i, num_heads) for i in range(depth)]
        self.batch, self.cfg = batch, cfg
        self.peak_bytes = 0
        self.dense_peak_bytes = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> VARLayerCache:
        return self.layers[i]

    def half(self, i: int) -> slice:
        """Rows of CFG half i (0 = conditional, 1 = unconditional)."""
        if not self.cfg and i:
            raise ValueError("this generation has no unconditional half (cfg=None)")
        return slice(i * self.batch, (i + 1) * self.batch)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def dense_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            g = layer.groups[0]
            total += 2 * g.k.shape[0] * layer.num_heads * layer.length * g.k.shape[-1] * g.k.element_size()
        return total

    def end_scale(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        self.dense_peak_bytes = max(self.dense_peak_bytes, self.dense_bytes())
