"""Decisions of recent prefills, so that a prefill extending one of them (``generate(use_cache=False)`` re-runs
the whole sequence each step) reuses the decisions taken on the prompt: cached and uncached generation agree."""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: prefills whose decisions are remembered for uncached generation (one per concurrent generate call)
MEMORIES = 8


@dataclass
class _Memory:
    prefix: torch.Tensor  # (B, L, D) the prompt's LM input
    decisions: dict[int, torch.Tensor]  # layer -> (B, L) bool, filled in while that prefill runs


class PrefillMemory:
    """The last :data:`MEMORIES` prefills' LM inputs and per-layer decisions."""

    def __init__(self) -> None:
        self.entries: list[_Memory] = []

    def recall(self, embeds: torch.Tensor, decisions: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], int]:
        """If ``embeds`` (B, L, D) extends a remembered prefill (same rows, a strict prefix): its decisions padded
        with True for the new tokens, and the prefix length. Otherwise remember ``embeds`` with ``decisions`` (the
        dict this prefill fills in) and return ({}, L)."""
        b, length = embeds.shape[:2]
        mem = next((m for m in reversed(self.entries) if m.prefix.shape[0] == b and m.prefix.shape[1] < length
                    and torch.equal(m.prefix, embeds[:, : m.prefix.shape[1]])), None)
        if mem is None:
            self.entries = self.entries[-(MEMORIES - 1):] + [_Memory(embeds.detach().clone(), decisions)]
            return {}, length
        n = mem.prefix.shape[1]
        ones = torch.ones(b, length - n, dtype=torch.bool, device=embeds.device)
        return {i: torch.cat([d, ones], 1) for i, d in mem.decisions.items()}, n
