"""Run a pre-LLM method and an in-LLM method together, e.g. ``Compose(ClsPruning(ratio=0.5), FastV(ratio=0.5))``."""
from __future__ import annotations

import torch

from .base import AttentionInput, KVPolicy, LLMLayerInput, Method, ScoreRequest, Selection, VisionInfo, VisualInput


class Compose(Method):
    """``vision`` site from ``first``, ``llm_layer`` / ``attention`` sites (and KV policy) from ``second``."""

    name = "compose"
    budget_rule = "own"

    def __init__(self, first: Method, second: Method):
        if "vision" not in first.sites:
            raise ValueError(f"Compose: {first.name!r} has no vision site")
        if not {"llm_layer", "attention"} & set(second.sites):
            raise ValueError(f"Compose: {second.name!r} has no llm_layer or attention site")
        self.first, self.second = first, second
        self.sites = tuple(dict.fromkeys(first.sites + second.sites))
        self.ratio = None
        self.tokens = None

    def setup(self, info: VisionInfo) -> None:
        self.first.setup(info)
        self.second.setup(info)

    def score_requests(self) -> list[ScoreRequest]:
        return self.first.score_requests()

    def llm_keeps_dropped_queries(self) -> bool:
        return self.second.llm_keeps_dropped_queries()

    def vision_budget(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return self.first.vision_budget(n, grid)

    def select(self, visual: VisualInput) -> Selection:
        return self.first.select(visual)

    def llm_plan(self, num_layers: int):
        return self.second.llm_plan(num_layers)

    def llm_keep(self, inp: LLMLayerInput) -> torch.Tensor:
        return self.second.llm_keep(inp)

    def attention_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.second.attention_layers(num_layers)

    def attention_important(self, inp: AttentionInput) -> torch.Tensor:
        return self.second.attention_important(inp)

    def sparse_prefill_enabled(self) -> bool:
        return self.second.sparse_prefill_enabled()

    def kv_policy(self) -> KVPolicy | None:
        return self.second.kv_policy()

    def describe(self) -> str:
        return f"{self.first.describe()} + {self.second.describe()}"
