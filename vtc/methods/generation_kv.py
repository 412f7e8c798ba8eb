"""KV-cache eviction for scale-wise image generators (the ``generation_kv`` site): the shared budget rule and the
baselines every generation-side claim is compared with (uniform budget by observation scores, recent window,
random). Tensor logic only: the VAR adapter hands each layer's cache as a :class:`GenerationKVInput`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.kv_scores import observation_scores
from ..core.select import topk_sorted
from ..sites import GenerationInfo, GenerationKVInput, KVSelection
from .base import Method


class GenerationKVMethod(Method):
    """Base of ``generation_kv`` methods: ``ratio`` is the fraction of the cache kept at every scale: once the current
    scale is appended, each head keeps ``round(ratio * T_full)`` keys, T_full being what an uncompressed cache would
    hold now (every scale so far); nothing is evicted while the cache holds no more than that. Subclasses say which
    keys stay in :meth:`keep`."""

    sites: ClassVar[tuple[str, ...]] = ("generation_kv",)
    ratio: float | None
    tokens: int | None

    def setup(self, info) -> None:  # type: ignore[override]
        if not isinstance(info, GenerationInfo):
            raise ValueError(f"method {self.name!r} compresses the KV cache of a scale-wise image generator (VAR); "
                             "this model is not one")
        if self.tokens is not None:
            raise ValueError(f"method {self.name!r} takes ratio= (fraction of the KV cache kept), not tokens=")

    def kv_budget(self, inp: GenerationKVInput) -> int:
        T = inp.k.shape[2]
        return max(1, min(T, int(round(inp.full_length * float(self.ratio)))))  # type: ignore[arg-type]

    def kv_select(self, inp: GenerationKVInput) -> KVSelection | None:
        b = self.kv_budget(inp)
        return None if b >= inp.k.shape[2] else KVSelection(self.keep(inp, b))

    def keep(self, inp: GenerationKVInput, b: int) -> torch.Tensor:  # pragma: no cover - abstract
        """(R, Hg, b) ascending indices of the keys each row and head keeps."""
        raise NotImplementedError


@dataclass
class SnapKV(GenerationKVMethod):
    """Uniform budget for every head: the top ``round(ratio * T)`` keys by the attention of ``n_obs`` queries
    sampled uniformly from the current scale (SnapKV / H2O-style; HACK's comparison)."""

    name: ClassVar[str] = "snapkv"
    ratio: float | None = None
    tokens: int | None = None
    n_obs: int = 32

    def keep(self, inp: GenerationKVInput, b: int) -> torch.Tensor:
        return topk_sorted(observation_scores(inp.q, inp.k, inp.attn_scale, self.n_obs), b)


@dataclass
class StreamingKV(GenerationKVMethod):
    """Recent window with attention sinks (StreamingLLM-style): the first ``sink`` keys and the most recent ones."""

    name: ClassVar[str] = "streaming"
    ratio: float | None = None
    tokens: int | None = None
    sink: int = 4

    def keep(self, inp: GenerationKVInput, b: int) -> torch.Tensor:
        R, Hg, T = inp.pos.shape
        s = min(self.sink, b)
        return torch.cat([torch.arange(s), torch.arange(T - (b - s), T)]).to(inp.pos.device).expand(R, Hg, b)


@dataclass
class RandomKV(GenerationKVMethod):
    """A seeded random ``round(ratio * T)`` keys per row and head."""

    name: ClassVar[str] = "kv_random"
    ratio: float | None = None
    tokens: int | None = None
    seed: int = 0

    def keep(self, inp: GenerationKVInput, b: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + inp.layer * 101 + inp.scale_index)
        return topk_sorted(torch.rand(*inp.pos.shape, generator=gen).to(inp.pos.device), b)
