"""FastV (arXiv 2403.06764): after layer K, drop the visual tokens the last token attends to least.

Layers 0..K-1 see every token; the scores are layer K-1's attention of the last token, averaged over heads;
layers K.. see the kept ones. ``ratio`` is the fraction of visual tokens *kept* (FastV's R = 1 - ratio).
Paper defaults: K = 2, R = 50% (ratio 0.5). With a KV cache the kept set is decided once at prefill, as in
the authors' cached mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.scores import attention_rows, head_mean
from ..core.select import budget, topk_sorted
from .base import LLMLayerInput, Method, VisionInfo


def keep_top_visual(score: torch.Tensor, inp: LLMLayerInput, counts: list[int]) -> torch.Tensor:
    """Keep every valid non-visual token plus, per row, the ``counts[b]`` highest-scoring visual tokens."""
    keep = inp.valid & ~inp.visual
    for b in range(score.shape[0]):
        vis = inp.visual[b].nonzero()[:, 0]
        if counts[b] > 0 and vis.numel():
            keep[b, vis[topk_sorted(score[b, vis], min(counts[b], vis.numel()))]] = True
    return keep


@dataclass
class FastV(Method):
    """Prune visual tokens inside the LLM after layer ``k`` by last-token attention."""

    ratio: float | None = None
    tokens: int | None = None
    k: int = 2

    name = "fastv"
    sites = ("llm_layer",)

    def setup(self, info: VisionInfo) -> None:
        if info.llm_layers and not 1 <= self.k < info.llm_layers:
            raise ValueError(f"fastv: k={self.k} must be in 1..{info.llm_layers - 1} for a {info.llm_layers}-layer LLM")

    def llm_plan(self, num_layers: int):
        return {self.k - 1: "last"}

    def llm_keep(self, inp: LLMLayerInput) -> torch.Tensor:
        rows = attention_rows(inp.q, inp.k, inp.scale, mask=inp.allowed[:, None])
        score = head_mean(rows)[:, 0]  # (B, L)
        counts = [budget(int(v), self.ratio, self.tokens) for v in inp.visual_input.tolist()]
        return keep_top_visual(score, inp, counts)
