"""What a method is: hyperparameters (a validated dataclass) plus tensor logic at one or more sites.

Methods never import transformers. An adapter hands them :class:`VisualInput` (one image's features and the
vision-tower scores they asked for) and applies the :class:`Selection` they return.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.select import budget as resolve_budget
from ..sites import (AttentionInput, GenerationInfo, GenerationKVInput, KVPolicy, KVSelection, LLMLayerInput, QueryKind,
                     ScoreKind, ScoreRequest, Selection, VisionInfo, VisualInput)

__all__ = ["Method", "ScoreKind", "ScoreRequest", "Selection", "VisionInfo", "VisualInput", "LLMLayerInput",
           "QueryKind", "AttentionInput", "KVPolicy", "GenerationInfo", "GenerationKVInput", "KVSelection"]

class Method:
    """Base class. Subclasses are dataclasses of hyperparameters and override the site methods they use."""

    name: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...]] = ()
    #: "ratio": the user gives ratio= or tokens=; "optional": either or none; "own": the method sets its budget
    budget_rule: ClassVar[str] = "ratio"
    requires_cls: ClassVar[bool] = False

    ratio: float | None
    tokens: int | None

    def setup(self, info: VisionInfo) -> None:
        """Resolve model-dependent defaults; raise ValueError if the model cannot support this method."""
        if self.requires_cls and not info.has_cls:
            raise ValueError(f"method {self.name!r} needs a vision tower with a CLS token; this model has none")

    def score_requests(self) -> list[ScoreRequest]:
        return []

    def vision_budget(self, n: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens kept out of n at the ``vision`` site (n means: leave the image untouched); ``grid``: the
        (rows, cols) of those n tokens when they form one."""
        if "vision" not in self.sites:
            return n
        return resolve_budget(n, self.ratio, self.tokens)

    def select(self, visual: VisualInput) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    #: a method that changes features even when it keeps every token (merging) sets this
    transforms_at_full_budget: ClassVar[bool] = False
    #: :meth:`select` also takes a batch of equal-size views: features (V, N, D), scores (V, N, ...), and
    #: returns index (V, k) (and features (V, k, D)); :meth:`select_views` then runs each group of views
    #: of one size (video frames, equal crops) as one call instead of one call per view
    batched: ClassVar[bool] = False

    def select_views(self, visual: VisualInput) -> Selection:
        """An AnyRes image or a video (``visual.layout`` set): by default every view (thumbnail, each crop,
        each frame) is compressed on its own by :meth:`select` with its own budget (``tokens=`` is spread
        over the views in proportion to their sizes); separator tokens are always kept. Multi-view methods
        (GlobalCom²) override this."""
        lay = visual.layout
        assert lay is not None
        n_visual = int((lay.view >= 0).sum())
        index = [torch.nonzero(lay.view < 0).flatten()]
        feats: list[torch.Tensor | None] = [None]
        replaced = False
        groups: dict[tuple, list[torch.Tensor]] = {}  # (n, k, grid) -> slots of each view of that shape
        for v in lay.views():
            slots = torch.nonzero(lay.view == v).flatten()
            n = slots.numel()
            k = (resolve_budget(n, self.tokens / n_visual) if self.tokens is not None else self.vision_budget(n, lay.view_grid(v)))
            if k >= n and not self.transforms_at_full_budget:
                index.append(slots)
                feats.append(None)
                continue
            key = (n, k, lay.view_grid(v)) + (() if self.batched else (v,))
            groups.setdefault(key, []).append(slots)
        for (n, k, grid, *_), members in groups.items():
            slots = torch.stack(members)  # (V, n)
            x, sc = visual.features[slots], {name: s[slots] for name, s in visual.scores.items()}
            if len(members) == 1:  # one view: the plain single-image call
                sel = self.select(VisualInput(x[0], k, grid, {name: s[0] for name, s in sc.items()}))
                sel_index, sel_feats = sel.index[None], (None if sel.features is None else sel.features[None])
            else:
                sel = self.select(VisualInput(x, k, grid, sc))
                sel_index, sel_feats = sel.index, sel.features
            index.extend(slots.gather(1, sel_index))
            feats.extend([None] * len(members) if sel_feats is None else sel_feats)
            replaced |= sel_feats is not None
        flat = torch.cat(index)
        order = flat.argsort()
        if not replaced:
            return Selection(flat[order])
        parts = [visual.features[i] if f is None else f for i, f in zip(index, feats)]
        return Selection(flat[order], torch.cat(parts)[order])

    def llm_plan(self, num_layers: int) -> dict[int, QueryKind]:
        """Decoder layers after which this method prunes (``llm_layer`` site), and the queries it needs."""
        return {}

    def llm_keeps_dropped_queries(self) -> bool:
        """True: tokens dropped after a planned layer stay in the sequence as queries only (masked as keys) until
        the last planned layer, so later decisions see their attention rows (AIM's reference masks rather than
        removes); they are removed there. False (default): dropped tokens leave the sequence at once."""
        return False

    def llm_keep(self, inp: LLMLayerInput) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, L) bool keep mask after layer ``inp.layer``; must keep every valid non-visual token."""
        raise NotImplementedError

    def attention_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose attention this method decides (``attention`` site), before attention runs."""
        return ()

    def attention_important(self, inp: AttentionInput) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, S) bool: the important tokens among ``inp.candidates`` (plus ``inp.always``) at this layer."""
        raise NotImplementedError

    def sparse_prefill_enabled(self) -> bool:
        """True: at prefill each ``attention_layers`` layer attends only among its important tokens."""
        return False

    def kv_policy(self) -> KVPolicy | None:
        """How the KV cache stores important / unimportant tokens, or None to leave the cache alone."""
        return None

    def kv_head_groups(self, layer: int, num_heads: int) -> list[torch.Tensor] | None:
        """``generation_kv`` site: how this layer's heads are split into groups whose caches have their own lengths
        (each group a tensor of head indices), or None for one group of every head."""
        return None

    def kv_select(self, inp: GenerationKVInput) -> KVSelection | None:  # pragma: no cover - abstract
        """``generation_kv`` site: which of the group's keys stay cached (None: keep all)."""
        raise NotImplementedError

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{self.name}({params})"
