"""HACK (arXiv 2504.09261): head-aware KV-cache compression for scale-wise image generators (VAR).

Heads are split once, offline, by the column-wise variance of their attention at the final scale
(:mod:`vtc.hack`): the lowest-variance fraction ``alpha`` are **contextual** (vertical stripes: every query looks at
the same few keys), the rest **structural** (multi-diagonal: queries look at the matching positions of earlier
scales). After each scale is appended, with T_full the keys an uncompressed cache would hold and a layer's
``n_C`` / ``n_S`` heads, the layer keeps ``ratio * T_full * (n_C + n_S)`` keys:

* structural heads keep ``B_S = B / (alpha * bc_ratio + 1 - alpha)`` keys (B = ratio * T_full; at least the first
  two scales + the current one, at most T): those, plus the best others by score;
* contextual heads share the rest (``B_C`` each, ~``bc_ratio * B_S``, rounded: the layer's total is exact up to
  < n_C / 2 keys), their top keys by score; at the final scale the evicted keys
  are averaged into their most similar kept key (LOOK-M) instead of dropped (``merge=True``).

Scores are the attention of ``n_obs`` = 32 queries taken uniformly from the current scale. Each CFG half and batch
row selects for itself. Our reading where the paper is silent (documented options): ``alpha`` = 0.5 and
``bc_ratio`` = B_C / B_S = 0.25 (no numeric defaults are published); budgets relative to the full length at every
scale; when ``ratio`` is too small for structural heads to hold their mandatory scales, those win (the cache then
holds more than asked; ``Patch.stats[i].kv_bytes`` reports what it held).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.kv_scores import observation_scores
from ..core.merge import merge_into_kept
from ..core.select import topk_sorted
from ..sites import GenerationKVInput, KVSelection
from .generation_kv import GenerationKVMethod


def split_heads(variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """(layers, heads) bool, True = contextual: the ``round(alpha * layers * heads)`` lowest-variance heads of the
    whole model (a global sort, so layers get different numbers of each type)."""
    n = variance.numel()
    k = int(round(alpha * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.sort(variance.flatten().double(), stable=True).indices[:k]] = True
    return flat.view(variance.shape)


def layer_budgets(t_s: int, t_c: int, full: int, ratio: float, n_c: int, n_s: int, mandatory: int, alpha: float,
                  bc_ratio: float) -> tuple[int, int]:
    """(B_S, B_C) for a layer with n_C contextual and n_S structural heads whose caches hold t_s / t_c keys once the
    current scale is appended, an uncompressed one ``full``: n_S * B_S + n_C * B_C is H * ratio * full up to the
    rounding of B_C (< n_C / 2 keys), unless the structural heads' ``mandatory`` keys (first scales + the current
    one) exceed it, or the caches hold less than their share (nothing to evict then)."""
    b = ratio * full
    total = (n_c + n_s) * b
    if n_c == 0:
        return min(t_s, max(mandatory, int(round(b)))), 0
    if n_s == 0:
        return 0, max(1, min(t_c, int(round(b))))
    b_s = min(t_s, max(mandatory, int(round(b / (alpha * bc_ratio + 1 - alpha)))))
    b_c = max(1, min(t_c, int(round((total - n_s * b_s) / n_c))))
    return b_s, b_c


@dataclass
class HACK(GenerationKVMethod):
    """``vtc.patch(var, "hack", ratio=0.3, calibration=cal)``: ``cal`` from :func:`vtc.hack.calibrate` (or its saved
    file's path). ratio: the fraction of the full cache kept on average (the paper's compression rho = 1 - ratio)."""

    name: ClassVar[str] = "hack"
    ratio: float | None = None
    tokens: int | None = None
    calibration: Any = None
    alpha: float = 0.5
    bc_ratio: float = 0.25
    n_obs: int = 32
    n_init_scales: int = 2
    merge: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"alpha (the fraction of heads that are contextual) must be in (0, 1); got {self.alpha!r}")
        if not 0.0 < float(self.bc_ratio) <= 1.0:
            raise ValueError(f"bc_ratio (B_C / B_S) must be in (0, 1]; got {self.bc_ratio!r}")
        if int(self.n_obs) < 1 or int(self.n_init_scales) < 0:
            raise ValueError("n_obs must be >= 1 and n_init_scales >= 0")

    def setup(self, info) -> None:  # type: ignore[override]
        super().setup(info)
        from ..hack import HackCalibration

        if self.calibration is None:
            raise ValueError("method 'hack' needs a head calibration: cal = vtc.hack.calibrate(model, n=50); then "
                             "vtc.patch(model, 'hack', ratio=..., calibration=cal) (or calibration='file.json' "
                             "saved with cal.save)")
        cal = self.calibration if isinstance(self.calibration, HackCalibration) else HackCalibration.load(
            self.calibration)
        cal.check(info)
        self.contextual = cal.contextual(float(self.alpha))

    def describe(self) -> str:
        cal = self.calibration
        shown = cal if isinstance(cal, (str, type(None))) else f"<{type(cal).__name__} {getattr(cal, 'model_id', '')}>"
        return (f"hack(ratio={self.ratio!r}, calibration={shown!r}, alpha={self.alpha!r}, bc_ratio={self.bc_ratio!r}, "
                f"n_obs={self.n_obs!r}, merge={self.merge!r})")

    # ------------------------------------------------------------------ site
    def kv_head_groups(self, layer: int, num_heads: int) -> list[torch.Tensor] | None:
        """Structural heads, then contextual heads (each group one dense cache length)."""
        if float(self.ratio) >= 1.0:
            return None
        ctx = self.contextual[layer]
        return [g for g in (torch.nonzero(~ctx).flatten(), torch.nonzero(ctx).flatten()) if g.numel()]

    def budgets(self, inp: GenerationKVInput) -> tuple[int, int]:
        """(B_S, B_C) of ``inp``'s layer at its scale."""
        ctx = self.contextual[inp.layer]
        sizes = inp.scale_sizes
        mandatory = sum(sizes[: min(self.n_init_scales, inp.scale_index)]) + sizes[inp.scale_index]
        held = {bool(ctx[h[0]]): t for h, t in inp.layer_groups} or {bool(ctx[inp.heads[0]]): inp.k.shape[2]}
        t_s, t_c = held.get(False, inp.k.shape[2]), held.get(True, inp.k.shape[2])
        return layer_budgets(t_s, t_c, inp.full_length, float(self.ratio), int(ctx.sum()), int((~ctx).sum()),
                             mandatory, float(self.alpha), float(self.bc_ratio))

    def kv_select(self, inp: GenerationKVInput) -> KVSelection | None:
        if float(self.ratio) >= 1.0:
            return None
        T = inp.k.shape[2]
        b_s, b_c = self.budgets(inp)
        contextual = bool(self.contextual[inp.layer][inp.heads[0].item()])
        b = b_c if contextual else b_s
        if b >= T:
            return None
        scores = observation_scores(inp.q, inp.k, inp.attn_scale, int(self.n_obs))
        if not contextual:  # first scales and the current one always stay, the rest by score
            must = (inp.key_scale < self.n_init_scales) | (inp.key_scale == inp.scale_index)
            return KVSelection(topk_sorted(scores + must.float() * 1e9, b))
        keep = topk_sorted(scores, b)
        if self.merge and inp.final:
            k, v = merge_into_kept(inp.k, inp.v, keep)
            return KVSelection(keep, k, v)
        return KVSelection(keep)
