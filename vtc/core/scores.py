"""Attention rows computed from q/k, so scores never require eager attention."""
from __future__ import annotations

import torch

from .. import kernels


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
                           iters: int = 5, heads_per_chunk: int | None = None,
                           block: int | None = None) -> torch.Tensor:
    """:func:`pagerank_importance` from post-RoPE q (B, H, L, d) and k (B, H, L, d), without its full maps.

    Same result (up to float summation order) for any ``allowed`` mask, with less work: rows are taken ``block`` at
    a time (``heads_per_chunk`` heads at once) and each row block only meets the keys up to its last allowed
    column, so a causal map is half computed; keys no row may see (padding of a batch of one, tokens AIM dropped
    earlier) are left out; ``scale / tau`` is folded into q; the masked softmax writes in place
    (:func:`vtc.kernels.masked_softmax_qk`). When no row sees a later key (causal), rows are walked from the last
    block to the first and every PageRank step is taken while the block is in cache: a step's scores for a block's
    rows are final once the rows after it are done, so no map is ever stored. Otherwise the maps of a chunk are
    kept (about half of (B, heads_per_chunk, L, L)) and the steps run over them.

    Defaults (:func:`pagerank_tiling`): 128 rows x 4 heads on a CPU (a block stays in cache; measured in
    ``benchmarks/pagerank.py``); on a GPU 1,024 rows and as many heads as keep a block under 512 MiB, for fewer
    kernel launches (not yet timed on a GPU).
    """
    bsz, h, n, _ = q.shape
    auto_block, auto_heads = pagerank_tiling(q.device.type, bsz, h, n)
    block, heads_per_chunk = block or auto_block, heads_per_chunk or auto_heads
    valid = allowed.any(-1)  # (B, L): rows that attend somewhere = real tokens
    p0 = valid.float() / valid.float().sum(-1, keepdim=True)
    cols, spans = _row_block_spans(allowed, block)
    every_col = cols.numel() == n
    causal = all(int(cols[e - 1]) < r1 for _, r1, e, _ in spans)
    hc = min(h, heads_per_chunk)
    size = [bsz * hc * (r1 - r0) * e for r0, r1, e, _ in spans]
    buf = torch.empty(max(size, default=0) if causal else sum(size), dtype=torch.float32, device=q.device)
    sq = torch.zeros(bsz, n, dtype=torch.float32, device=q.device)
    for h0 in range(0, h, hc):
        qc = q[:, h0:h0 + hc].float() * (scale / tau)
        kc = k[:, h0:h0 + hc] if every_col else k[:, h0:h0 + hc].index_select(2, cols)
        kc = kc.float()
        c = qc.shape[1]
        steps = torch.zeros(iters + 1, bsz, c, 1, n, dtype=torch.float32, device=q.device)  # p_t over the rows
        steps[0] = p0[:, None, None, :]
        maps, off = [], 0
        for r0, r1, e, c0 in (reversed(spans) if causal else spans):
            m = buf[off:off + bsz * c * (r1 - r0) * e].view(bsz, c, r1 - r0, e)
            ok = None  # columns from c0 on hold a disallowed key for some row of the block
            if c0 < e:
                ok = allowed[:, r0:r1, c0:e] if every_col else allowed[:, r0:r1].index_select(-1, cols[c0:e])
            kernels.masked_softmax_qk(qc[:, :, r0:r1], kc[:, :, :e], ok, out=m)
            for t in range(1, iters + 1 if causal else 2):  # causal: p_{t-1} of these rows is final by now
                _add_step(steps[t], steps[t - 1, ..., r0:r1] @ m, cols, e, every_col)
            if not causal:  # keep the map for the later steps
                maps.append((r0, r1, e, m))
                off += m.numel()
        for t in range(2, iters + 1):  # (no maps kept when causal)
            for r0, r1, e, m in maps:
                _add_step(steps[t], steps[t - 1, ..., r0:r1] @ m, cols, e, every_col)
        sq += steps[iters].squeeze(2).pow(2).sum(1)
    return (sq / h).sqrt()


def pagerank_tiling(device_type: str, bsz: int, heads: int, n: int) -> tuple[int, int]:
    """Default (rows per block, heads per chunk) of :func:`pagerank_importance_qk`: 128 x 4 on a CPU; elsewhere
    1,024 rows and as many heads as keep one fp32 block of (bsz, heads, rows, n) under 512 MiB."""
    if device_type == "cpu":
        return 128, 4
    block = min(1024, max(n, 1))
    return 1024, max(1, min(heads, (512 << 20) // (4 * bsz * block * max(n, 1))))


def _add_step(into: torch.Tensor, part: torch.Tensor, cols: torch.Tensor, e: int, every_col: bool) -> None:
    """Add a block's share of a PageRank step, given over the first e kept keys, to the scores over all rows."""
    if every_col:
        into[..., :e] += part
    else:
        into.index_add_(-1, cols[:e], part)


def _row_block_spans(allowed: torch.Tensor, block: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """The keys somebody may see (``cols``, ascending) and (r0, r1, e, c0) per row block with an allowed key, its
    columns counted among ``cols``: keys [0, e) hold every allowed one, those before c0 are allowed for all the
    block's rows."""
    bounds = [(r0, min(allowed.shape[1], r0 + block)) for r0 in range(0, allowed.shape[1], block)]
    seen = [allowed[:, r0:r1].any(1).any(0) for r0, r1 in bounds]  # (L,) per block: keys its rows may see
    cols = torch.stack(seen).any(0).nonzero().squeeze(1) if seen else allowed.new_zeros(0, dtype=torch.long)
    spans = []
    for (r0, r1), block_seen in zip(bounds, seen):
        mine = block_seen[cols].nonzero()
        if mine.numel() == 0:
            continue
        e = int(mine.max()) + 1
        partly = (~allowed[:, r0:r1].all(1).all(0)[cols[:e]]).nonzero()
        spans.append((r0, r1, e, int(partly.min()) if partly.numel() else e))
    return cols, spans


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Mean attention each key receives from all queries, averaged over heads, without holding the full map.

    q, k: (H, n, d) one sequence (e.g. one image's patches). Returns (n,) float32.
    """
    h, n, _ = q.shape
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    kf = k.float()[None]
    for s in range(0, n, chunk):
        p = kernels.masked_softmax_qk(q[None, :, s:s + chunk].float() * scale, kf, None)  # (1, H, chunk, n)
        total += p.sum(dim=(0, 1, 2))
    return total / (h * n)
