"""The bridge an adapter calls at each site: resolves budgets, runs the method, keeps statistics.

Adapters talk to a :class:`Runtime`, never to a method directly, so a new method needs no adapter change.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .methods.base import Method
from .sites import ScoreRequest, Selection, ViewLayout, VisualInput


@dataclass
class CallStats:
    """One compressed forward pass (a prefill): visual tokens per batch row before and after, and the
    wall-clock seconds spent in vtc's own code (scoring, selection, gathers).

    On a GPU, host time inside vtc also absorbs waiting for work queued before it (vtc's first
    synchronizing op drains the vision tower's kernels); set ``Patch.sync_timing = True`` to synchronize
    the device at each vtc region's entry (not counted) and exit (counted) for a true figure."""

    tokens_before: list[int]
    tokens_after: list[int]
    seconds: float
    #: visual tokens entering each decoder layer, per batch row (only with in-LLM pruning)
    layer_tokens: dict[int, list[int]] = field(default_factory=dict)
    #: tokens (visual and text) each decoder layer found important, per batch row (``attention`` site methods)
    important_tokens: dict[int, list[int]] = field(default_factory=dict)
    #: tokens of each batch row's LLM input (non-padding), the base of ``important_tokens``
    sequence_tokens: list[int] = field(default_factory=list)
    #: (bytes the compressed KV cache holds after the prefill, bytes of the same tokens in a plain fp16 cache)
    kv_bytes: tuple[int, int] | None = None

    def important_fraction(self, row: int = 0) -> float | None:
        """Share of the row's LLM-input tokens the ``attention`` site found important, averaged over layers."""
        if not self.important_tokens or len(self.sequence_tokens) <= row or not self.sequence_tokens[row]:
            return None
        counts = [v[row] for v in self.important_tokens.values()]
        return sum(counts) / (len(counts) * self.sequence_tokens[row])

    @property
    def kv_bits(self) -> float | None:
        """Bits per cached value the compressed KV cache held after the prefill (statistics included; fp16 = 16)."""
        return 16 * self.kv_bytes[0] / self.kv_bytes[1] if self.kv_bytes is not None and self.kv_bytes[1] else None

    @property
    def kept_fraction(self) -> float:
        before = sum(self.tokens_before)
        return sum(self.tokens_after) / before if before else 1.0


class Runtime:
    """Per-patch state shared by the hooks of one model instance."""

    def __init__(self, method: Method, ratio: float | None, tokens: int | None, max_stats: int = 10_000):
        self.method = method
        self.ratio = ratio
        self.tokens = tokens
        self.stats: deque[CallStats] = deque(maxlen=max_stats)
        self._pending_seconds: dict[int, float] = {}  # per thread: time of the call in progress
        self._current: dict[int, CallStats] = {}  # per thread: the stats of the call in progress, once recorded
        #: vtc's own seconds in forward passes that compressed no prefill (decode-step mask and cache rewrites)
        self.decode_seconds = 0.0
        #: called on entering and leaving each timed region (``Patch.sync_timing``): a device synchronize
        self.sync: Callable[[], None] | None = None
        #: per image (N,) bool keep masks of the most recent vision-site call, for overlays and inspection
        self.last_keep: list[torch.Tensor] = []
        #: per image layouts of the most recent multi-view (AnyRes) call, aligned with ``last_keep``
        self.last_layouts: list[ViewLayout] = []
        #: how often each hook did its work ("llm_input.decode", "llm_layer.prune", ...): proof that it ran
        self.events: Counter[str] = Counter()

    # ----- what the adapter asks
    def score_requests(self) -> list[ScoreRequest]:
        return self.method.score_requests()

    def budget(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return self.method.vision_budget(n, grid)

    def llm_plan(self, num_layers: int):
        return self.method.llm_plan(num_layers)

    def llm_keep(self, inp):
        return self.method.llm_keep(inp)

    def compress_image(
        self,
        features: torch.Tensor,
        grid: tuple[int, int] | None,
        scores: dict[tuple[str, int], torch.Tensor],
    ) -> Selection:
        """Run the method's ``vision`` site on one image's (N, D) features."""
        n = features.shape[0]
        k = self.budget(n, grid)
        if k >= n and not getattr(self.method, "transforms_at_full_budget", False):
            return Selection(torch.arange(n, device=features.device))
        sel = self.method.select(VisualInput(features=features, budget=k, grid=grid, scores=scores))
        if sel.index.numel() != k:
            raise RuntimeError(f"method {self.method.name!r} returned {sel.index.numel()} tokens, budget was {k}")
        return sel

    def compress_views(
        self,
        features: torch.Tensor,
        layout: ViewLayout,
        scores: dict[tuple[str, int], torch.Tensor],
    ) -> Selection:
        """Run the method's ``vision`` site on one AnyRes image's packed (N, D) features."""
        n = features.shape[0]
        if "vision" not in self.method.sites:
            return Selection(torch.arange(n, device=features.device))
        k = self.budget(int((layout.view >= 0).sum()))
        sel = self.method.select_views(VisualInput(features=features, budget=k, scores=scores, layout=layout))
        if int((layout.view[sel.index] < 0).sum()) != int((layout.view < 0).sum()):
            raise RuntimeError(f"method {self.method.name!r} dropped separator tokens of an AnyRes image")
        return sel

    # ----- bookkeeping
    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the enclosed time as compression overhead of the current call."""
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            t = threading.get_ident()
            dt = time.perf_counter() - t0
            current = self._current.get(t)
            if current is not None:  # after the prefill's stats exist (in-LLM pruning, attention site, restore)
                current.seconds += dt
            else:  # before them (vision site, LM-input selection), or a call that records none (decode)
                self._pending_seconds[t] = self._pending_seconds.get(t, 0.0) + dt

    def record(self, before: list[int], after: list[int]) -> CallStats:
        t = threading.get_ident()
        st = CallStats(before, after, self._pending_seconds.pop(t, 0.0))
        self.stats.append(st)
        self._current[t] = st
        return st

    def end_call(self) -> None:
        """End of one forward pass of the patched model: later time belongs to the next call; time of a call
        that recorded no prefill (a decode step) goes to ``decode_seconds``."""
        t = threading.get_ident()
        self._current.pop(t, None)
        self.decode_seconds += self._pending_seconds.pop(t, 0.0)

    def discard_pending_time(self) -> None:
        self._pending_seconds.pop(threading.get_ident(), None)
