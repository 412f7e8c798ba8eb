"""AIM (ICCV 2025, LaVi-Lab/AIM): merge similar visual tokens before the LLM, then prune progressively inside it.

Defaults reproduce the authors' code (``llava/model/token_merge.py``, ``llava_arch.py::get_2dPool``, the LLaVA-1.5
``clip_encoder.py`` and Qwen2-VL forks, ``get_importance`` in their LLaMA / Qwen2 forks):

1. Merge: iterative bipartite soft matching (ToMe-style, even positions are sources, odd ones destinations) down
   to the budget; rounds halve the count (r = min(T/2, T - k): 576 -> 288 -> 252 at ratio 0.4375, 196 -> 98 -> 49
   at 0.25). ``merge_mode="mean"``: a destination becomes the plain mean of itself and its sources, keys too.
   ``merge_order="reference"``: each round returns [unmerged sources by descending similarity, destinations], and
   the next round splits that order into even/odd. Metric: the tower's last-layer keys (CLS dropped) on
   LLaVA-1.5; the features themselves for video frames (OneVision: the pooled projector outputs, per frame) and on
   Qwen-VL. OneVision *images* (AnyRes views) are not merged by the authors: ``anyres_merge=False`` keeps them
   whole (with a warning once), ``True`` merges each view. On Qwen-VL (M-RoPE) at ratio 0.25, the only one the
   authors run there, a frame of H' x W' merged tokens keeps floor(H'/2) * floor(W'/2) (the halved grid their
   positions are rebuilt on) instead of round(H' W' / 4); other ratios keep round(r H' W').
2. Prune: after each layer i in [l1, l2) keep ``int(V * (1 - (i - l1 + 1) / (l2 - l1)))`` visual tokens (V =
   visual tokens at the LLM input), ranked by PageRank over the layer's attention (softmax(qk/sqrt(d) / tau),
   tau = 0.1, 5 iterations from uniform over every token, RMS over heads); text is never pruned; tokens dropped
   earlier rank last. ``pagerank="reference"``: dropped tokens stay as query rows (masked as keys) until the last
   pruning layer, so their 1/N starting share and their attention rows flow into later rankings as in the
   authors' masking; they are removed after it (layers past l2 run on the survivors only). Paper layers: (13, 21)
   on a 32-layer LLaMA, (14, 22) on a 28-layer Qwen2, scaled on other depths.

Deviations, each an option: ``merge_mode="weighted"`` (ToMe size-weighted means), ``merge_order="raster"``
(survivors re-sorted to raster order before each round), ``pagerank="survivors"`` (dropped tokens removed at
once; PageRank over the survivors: faster inside the window, other decisions from the second pruning layer on).
Always: merged tokens sit at their destination's original slot and position (the reference feeds them in its
shuffled order on consecutive positions), and similarity ties keep the earlier source first (the reference's
argsort is unstable).
"""
from __future__ import annotations

import warnings
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
    merge_mode: str = "mean"
    merge_order: str = "reference"
    anyres_merge: bool = False
    prune: bool = True
    l1: int | None = None
    l2: int | None = None
    tau: float = 0.1
    iters: int = 5
    pagerank: str = "reference"

    name = "aim"
    sites = ("vision", "llm_layer")
    budget_rule = "optional"
    batched = True  # merge_to runs a batch of equal-size frames / crops at once

    def __post_init__(self) -> None:
        for name, allowed in (("merge_mode", ("mean", "weighted")), ("merge_order", ("reference", "raster")),
                              ("pagerank", ("reference", "survivors"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"aim: {name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.tau <= 0 or self.iters < 1:
            raise ValueError("tau must be > 0 and iters >= 1")
        self._key_layer = -1
        self._mrope = False
        self._warned_anyres = False

    def setup(self, info: VisionInfo) -> None:
        self._key_layer = info.num_layers - 1
        self._mrope = info.mrope
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

    def vision_budget(self, n: int, grid: tuple[int, int] | None = None) -> int:
        if self._mrope and grid is not None and self.ratio == 0.25 and grid[0] * grid[1] == n:
            return max(1, (grid[0] // 2) * (grid[1] // 2))  # the authors' Qwen2-VL frame grid, halved per side
        return super().vision_budget(n, grid)

    def select(self, visual: VisualInput) -> Selection:
        # towers that expose no keys (Qwen-VL, whose projector merges patches) merge on the features, as the
        # authors' Qwen2-VL code does
        keys = visual.scores.get(("keys", self._key_layer), visual.features)
        feats, _, slots = merge_to(keys, visual.features, visual.budget, self.merge_mode, order=self.merge_order)
        return Selection(slots, feats)

    def select_views(self, visual: VisualInput) -> Selection:
        lay = visual.layout
        if lay is not None and lay.kind == "frames":
            # video frames: the authors merge the pooled projector outputs themselves, per frame
            visual = VisualInput(visual.features, visual.budget, visual.grid, {}, layout=lay)
        elif not self.anyres_merge:
            if not self._warned_anyres:
                warnings.warn("aim: AnyRes images are not merged (the authors merge LLaVA-1.5 images and video "
                              "frames only); pass anyres_merge=True to merge each view. In-LLM pruning still "
                              "applies", RuntimeWarning, stacklevel=2)
                self._warned_anyres = True
            return Selection(torch.arange(visual.features.shape[0], device=visual.features.device))
        return super().select_views(visual)

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

    def llm_keeps_dropped_queries(self) -> bool:
        return self.pagerank == "reference"

    def llm_keep(self, inp: LLMLayerInput) -> torch.Tensor:
        score = pagerank_importance_qk(inp.q, _repeat_kv(inp.k, inp.q.shape[1]), inp.scale, inp.allowed, self.tau,
                                       self.iters)
        if inp.dropped is not None:  # the reference sets the score of already-masked tokens to -1
            score = score.masked_fill(inp.dropped, -1.0)
        counts = [self.visual_kept_after(inp.layer, int(v)) for v in inp.visual_input.tolist()]
        return keep_top_visual(score, inp, counts)


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)
