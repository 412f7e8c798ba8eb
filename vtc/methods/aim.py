"""AIM (ICCV 2025, LaVi-Lab/AIM): merge similar visual tokens before the LLM, then prune progressively inside it.

1. Merge: iterative bipartite soft matching (ToMe-style) down to the budget, on the vision tower's
   last-layer keys (all heads concatenated, CLS dropped) as the authors do for LLaVA-1.5; rounds halve the
   count (r = min(T/2, T - k)), which reproduces the reference's 576 -> 288 -> 252 for ratio 0.4375.
   ``merge_mode="weighted"`` averages by token size (ToMe); ``"mean"`` is the reference's plain mean.
   Deviation: merged tokens keep raster order and their destination's position (the reference reorders them).
2. Prune: after each layer i in [l1, l2) keep ``int(V * (1 - (i - l1 + 1) / (l2 - l1)))`` visual tokens (V =
   visual tokens at the LLM input), ranked by PageRank over the layer's attention (softmax(qk/sqrt(d) / tau),
   tau = 0.1, 5 iterations from uniform, RMS over heads). Text is never pruned. Paper defaults: (13, 21) on a
   32-layer LLaMA, (14, 22) on a 28-layer Qwen2, scaled proportionally on other depths. Deviation: pruned
   tokens are removed (the reference masks them); a test checks both give the same outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.merge import merge_to
from ..core.scores import pagerank_importance_qk
from .base import LLMLayerInput, Method, ScoreRequest, Selection, VisionInfo, VisualInput
from .fastv import keep_top_visual

PAPER_LAYERS = {"qwen2": (14, 22, 28), "default": (13, 21, 32)}


@dataclass
class AIM(Method):
    """Token merging before the LLM + progressive in-LLM pruning."""

    ratio: float | None = None  # fraction kept by merging (None: no merging, prune only)
    tokens: int | None = None
    merge_mode: str = "weighted"
    prune: bool = True
    l1: int | None = None
    l2: int | None = None
    tau: float = 0.1
    iters: int = 5

    name = "aim"
    sites = ("vision", "llm_layer")
    budget_rule = "optional"
    batched = True  # merge_to runs a batch of equal-size frames / crops at once

    def __post_init__(self) -> None:
        if self.merge_mode not in ("weighted", "mean"):
            raise ValueError(f"merge_mode must be 'weighted' or 'mean'; got {self.merge_mode!r}")
        if self.tau <= 0 or self.iters < 1:
            raise ValueError("tau must be > 0 and iters >= 1")
        self._key_layer = -1

    def setup(self, info: VisionInfo) -> None:
        self._key_layer = info.num_layers - 1
        n = info.llm_layers
        if self.prune and n:
            a, b, ref = PAPER_LAYERS.get(info.llm_type, PAPER_LAYERS["default"])
            l1 = self.l1 if self.l1 is not None else round(a * n / ref)
            l2 = self.l2 if self.l2 is not None else max(l1 + 1, round(b * n / ref))
            if not 0 <= l1 < l2 <= n:
                raise ValueError(f"aim: need 0 <= l1 < l2 <= {n} (LLM layers); got l1={l1}, l2={l2}")
            self.l1, self.l2 = l1, l2

    def score_requests(self) -> list[ScoreRequest]:
        return [ScoreRequest("keys", (self._key_layer,))]

    def select(self, visual: VisualInput) -> Selection:
        # towers that expose no keys (Qwen-VL, whose projector merges patches) merge on the features, as the
        # authors' Qwen2-VL code does
        keys = visual.scores.get(("keys", self._key_layer), visual.features)
        feats, _, slots = merge_to(keys, visual.features, visual.budget, self.merge_mode)
        return Selection(slots, feats)

    # ---------------------------------------------------------------- in-LLM pruning
    def visual_kept_after(self, layer: int, v: int) -> int:
        """Visual tokens that layers > ``layer`` see, out of v at the LLM input."""
        if not self.prune or self.l1 is None or layer < self.l1:
            return v
        rate = max(0.0, 1.0 - (layer - self.l1 + 1) / (self.l2 - self.l1))
        return int(v * rate)

    def llm_plan(self, num_layers: int):
        if not self.prune or self.l1 is None:
            return {}
        return {i: "all" for i in range(self.l1, min(self.l2, num_layers - 1))}

    def llm_keep(self, inp: LLMLayerInput) -> torch.Tensor:
        score = pagerank_importance_qk(inp.q, _repeat_kv(inp.k, inp.q.shape[1]), inp.scale, inp.allowed, self.tau,
                                       self.iters)
        counts = [self.visual_kept_after(inp.layer, int(v)) for v in inp.visual_input.tolist()]
        return keep_top_visual(score, inp, counts)


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)
