"""Attention rows computed from q/k, so scores never require eager attention."""
from __future__ import annotations

import torch


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    softmax: bool = True,
) -> torch.Tensor:
    """Attention of a few query rows over all keys.

    q: (B, Hq, Q, d) queries (only the rows you need); k: (B, Hk, S, d) keys, Hq a multiple of Hk (GQA).
    mask: optional boolean (B, 1|Hq, Q, S) with True = may attend, or additive float mask.
    Returns (B, Hq, Q, S): probabilities (fp32) if softmax, else the scaled logits.
    """
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return logits.softmax(dim=-1) if softmax else logits


def head_mean(rows: torch.Tensor) -> torch.Tensor:
    """Average (B, H, Q, S) attention rows over heads -> (B, Q, S)."""
    return rows.mean(dim=1)


def combine_layers(per_layer: list[torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Ensemble per-layer score vectors (same shape) by sum, mean, max or min."""
    stacked = torch.stack(per_layer, dim=0)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.amax(0)
    if how == "min":
        return stacked.amin(0)
    raise ValueError(f"unknown layer ensemble {how!r}; allowed: sum, mean, max, min")


def pagerank_importance(logits: torch.Tensor, allowed: torch.Tensor, tau: float = 0.1, iters: int = 5,
                        overwrite: bool = False) -> torch.Tensor:
    """AIM's token importance: PageRank (no damping) over the layer's sharpened attention graph.

    logits: (B, H, L, L) scaled q·k; allowed: (B, L, L) bool (causal, non-padding keys).
    M = softmax(logits / tau) over allowed keys; p0 = 1/N over valid tokens; p <- p @ M, ``iters`` times;
    returns sqrt(mean over heads of p^2), shape (B, L). ``overwrite=True``: ``logits`` (a temporary of the caller's)
    may be reused as the working buffer, saving (B, H, L, L) copies.
    """
    x = logits.float()
    if x is logits and not overwrite:
        x = x.clone()
    x = x.div_(tau).masked_fill_(~allowed[:, None], float("-inf"))
    m = torch.softmax(x, dim=-1).nan_to_num_(0.0)  # fully masked (padding) rows -> zero rows
    valid = allowed.any(-1)  # (B, L): rows that attend somewhere = real tokens
    p = valid.float() / valid.float().sum(-1, keepdim=True)
    p = p[:, None, None, :].expand(-1, m.shape[1], 1, -1)
    for _ in range(iters):
        p = p @ m
    return p.squeeze(2).pow(2).mean(1).sqrt()


def pagerank_importance_qk(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor, tau: float = 0.1,
                           iters: int = 5, heads_per_chunk: int = 4) -> torch.Tensor:
    """:func:`pagerank_importance` from post-RoPE q (B, H, L, d) and k (B, H, L, d), a few heads at a time, so
    at most (B, heads_per_chunk, L, L) attention maps exist at once instead of all H (a 6,000-token video prompt
    with 28 heads would need ~4 GB per fp32 copy). Same result: the RMS over heads is rebuilt from the chunks."""
    h = q.shape[1]
    sq = torch.zeros(q.shape[0], q.shape[2], dtype=torch.float32, device=q.device)
    for h0 in range(0, h, heads_per_chunk):
        qc, kc = q[:, h0:h0 + heads_per_chunk].float(), k[:, h0:h0 + heads_per_chunk].float()
        rms = pagerank_importance(torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale), allowed, tau, iters,
                                  overwrite=True)
        sq += rms.pow(2) * qc.shape[1]
    return (sq / h).sqrt()


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Mean attention each key receives from all queries, averaged over heads, without holding the full map.

    q, k: (H, n, d) one sequence (e.g. one image's patches). Returns (n,) float32.
    """
    h, n, _ = q.shape
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    kf = k.float().transpose(-1, -2)
    for s in range(0, n, chunk):
        p = torch.softmax(torch.matmul(q[:, s:s + chunk].float(), kf) * scale, dim=-1)
        total += p.sum(dim=(0, 1))
    return total / (h * n)
