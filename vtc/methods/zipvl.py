"""ZipVL (arXiv 2410.08584, v1): an adaptive important-token set per layer and input, sparse prefill among the
important tokens, and a mixed-precision KV cache (important tokens at 4 bits, the rest at 2).

At each decoder layer, before attention: probe queries (the last 5 % of the row plus 5 % random earlier
positions, seeded; ZipCache's rule) attend to every key; ``p`` is the smallest count of tokens whose
un-normalised column mass holds ``tau`` of the total (Eq. 6); the important set is the top-``p`` tokens by the
normalised score (column mass / queries that can see the token, ZipCache's divisor; Eqs. 7-8), plus the text
prompt and the last token, which stay exact. With ``sparse_prefill`` the layer's attention runs on the
important tokens only (ascending order keeps it causal); the other tokens get a zero attention output (their
hidden state goes on through the residual and the MLP). At decode, every ``stream_gap`` new tokens are stored
by the same rule, with ``p`` re-estimated from the current query over those tokens (Algorithm 1).

``kv``: "mixed" (v1, default) stores important tokens at ``bits_high`` and the rest at ``bits_low``;
"evict" (v2) keeps only the important tokens; "full" keeps the cache at full precision (sparse prefill only).
Defaults: tau 0.975 (the paper's video setting), 4 / 2 bits and a 100-token stream gap (ZipCache's demo).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.scores import attention_rows
from ..core.zipvl_scores import important_count, normalized_scores, probe_attention, probe_positions
from .base import AttentionInput, KVPolicy, Method

KV_MODES = ("mixed", "evict", "full")
KV_BITS = (2, 4, 8, 16)


@dataclass
class ZipVL(Method):
    """Adaptive sparse prefill + mixed-precision KV cache; the budget comes from ``tau``, not ``ratio``."""

    ratio: float | None = None
    tokens: int | None = None
    tau: float = 0.975
    kv: str = "mixed"
    bits_high: int = 4
    bits_low: int = 2
    stream_gap: int = 100
    sparse_prefill: bool = True
    probe_frac: float = 0.05
    seed: int = 0

    name: ClassVar[str] = "zipvl"
    sites: ClassVar[tuple[str, ...]] = ("attention",)
    budget_rule: ClassVar[str] = "own"

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"zipvl: tau must be a number in (0, 1] (the attention mass the important tokens "
                             f"hold); got {self.tau!r}")
        if self.kv not in KV_MODES:
            raise ValueError(f"zipvl: kv must be one of {', '.join(KV_MODES)}; got {self.kv!r}")
        for field in ("bits_high", "bits_low"):
            if getattr(self, field) not in KV_BITS:
                raise ValueError(f"zipvl: unsupported bit width {field}={getattr(self, field)!r}; allowed: "
                                 f"{', '.join(map(str, KV_BITS))} (16 = no quantization)")
        if self.bits_low > self.bits_high:
            raise ValueError(f"zipvl: bits_low={self.bits_low} exceeds bits_high={self.bits_high}")
        if isinstance(self.stream_gap, bool) or not isinstance(self.stream_gap, int) or self.stream_gap < 1:
            raise ValueError(f"zipvl: stream_gap must be a positive integer; got {self.stream_gap!r}")
        if not 0.0 < self.probe_frac <= 1.0:
            raise ValueError(f"zipvl: probe_frac must be in (0, 1]; got {self.probe_frac!r}")
        if self.kv == "full" and not self.sparse_prefill:
            raise ValueError("zipvl: kv='full' with sparse_prefill=False changes nothing; choose kv='mixed' or "
                             "'evict', or sparse_prefill=True")

    def attention_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers))

    def sparse_prefill_enabled(self) -> bool:
        return self.sparse_prefill

    def kv_policy(self) -> KVPolicy | None:
        if self.kv == "full":
            return None
        return KVPolicy(self.kv, self.bits_high, self.bits_low, self.stream_gap)

    def attention_important(self, inp: AttentionInput) -> torch.Tensor:
        """Eqs. 6-8 per batch row, on that row's valid tokens only (a padded batch equals its single runs)."""
        out = torch.zeros_like(inp.valid)
        for b in range(inp.valid.shape[0]):
            keys = inp.valid[b].nonzero()[:, 0]
            if keys.numel() == 0:
                continue
            q, k = inp.q[b:b + 1], inp.k[b:b + 1, :, keys]
            if inp.phase == "prefill":
                probes = probe_positions(keys.numel(), self.probe_frac, self.seed, device=keys.device)
                rows = probe_attention(q[:, :, keys], k, probes, inp.scale)
            else:
                allowed = keys[None, :] <= inp.query_pos[b][:, None]
                rows = attention_rows(q, k, inp.scale, mask=allowed[None, None])
            mass = rows.sum(dim=(1, 2))  # (1, L_b): column mass over heads and probe queries
            cand = inp.candidates[b, keys]
            if bool(cand.any()):
                m = mass[:, cand]
                p = int(important_count(m, self.tau, m.sum())[0])
                # prefill: which tokens by the normalised score (Eq. 7); decode: one query sees every buffered token
                score = (normalized_scores(mass) if inp.phase == "prefill" else mass)[0, cand]
                top = score.argsort(descending=True, stable=True)[:p]
                out[b, keys[cand.nonzero()[:, 0][top]]] = True
        return out | (inp.always & inp.valid)
