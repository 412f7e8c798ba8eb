"""Bipartite soft matching (ToMe / AIM) that tracks token sizes and the slot each token came from."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bipartite_merge(
    metric: torch.Tensor, x: torch.Tensor, r: int, size: torch.Tensor, slot: torch.Tensor, mode: str = "weighted"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on a single sequence.

    metric: (T, C) similarity features; x: (T, D) features; size: (T,) tokens each entry stands for; slot:
    (T,) original index each entry sits at. Even positions are sources, odd positions destinations; the r
    sources with the most similar destination (cosine) are merged into it. ``mode="weighted"`` averages by
    size (ToMe); ``mode="mean"`` is AIM's reference (plain mean of a destination and its sources).
    Returns (metric, x, size, slot) of the T - r survivors, sorted by slot (raster order kept).
    """
    t = x.shape[0]
    r = min(r, t // 2)
    if r <= 0:
        return metric, x, size, slot
    m = F.normalize(metric.float(), dim=-1)
    a, b = m[0::2], m[1::2]
    best, best_dst = (a @ b.T).max(dim=-1)
    order = best.argsort(descending=True, stable=True)
    src_idx, unm_idx = order[:r], order[r:]
    dst_idx = best_dst[src_idx]

    def combine(v: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = v[0::2], v[1::2]
        if w is None:  # plain mean of destination and its sources
            acc = dst.float().index_add(0, dst_idx, src[src_idx].float())
            cnt = torch.ones(dst.shape[0], device=v.device).index_add(0, dst_idx, torch.ones_like(dst_idx, dtype=torch.float))
            return src[unm_idx], (acc / cnt[:, None]).to(v.dtype)
        ws, wd = w[0::2], w[1::2]
        acc = (dst.float() * wd[:, None]).index_add(0, dst_idx, src[src_idx].float() * ws[src_idx, None])
        tot = wd.float().index_add(0, dst_idx, ws[src_idx].float())
        return src[unm_idx], (acc / tot[:, None]).to(v.dtype)

    w = size.float() if mode == "weighted" else None
    x_unm, x_dst = combine(x, w)
    k_unm, k_dst = combine(metric, w)
    size_new = torch.cat([size[0::2][unm_idx], size[1::2].index_add(0, dst_idx, size[0::2][src_idx])])
    slot_new = torch.cat([slot[0::2][unm_idx], slot[1::2]])
    order = slot_new.argsort()
    return (torch.cat([k_unm, k_dst])[order], torch.cat([x_unm, x_dst])[order], size_new[order], slot_new[order])


def merge_to(metric: torch.Tensor, x: torch.Tensor, k: int, mode: str = "weighted",
             schedule: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge (T, D) tokens down to exactly k by repeated halving rounds (r = min(T // 2, T - k)), or by an
    explicit list of per-round r. Returns (features (k, D), sizes (k,), slots (k,) ascending)."""
    t = x.shape[0]
    size = torch.ones(t, device=x.device)
    slot = torch.arange(t, device=x.device)
    rounds = list(schedule) if schedule is not None else []
    while True:
        cur = x.shape[0]
        if rounds:
            r = rounds.pop(0)
        elif cur > k:
            r = min(cur // 2, cur - k)
        else:
            break
        metric, x, size, slot = bipartite_merge(metric, x, r, size, slot, mode)
    return x, size, slot
