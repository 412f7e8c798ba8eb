"""Bipartite soft matching (ToMe / AIM) that tracks token sizes and the slot each token came from.

Every function takes one sequence (T, ·) or a batch of equal-length sequences (B, T, ·) (video frames, crops
of one size): a batch runs as one set of tensor ops, so the host launches the same few kernels for 32 frames
as for one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch import gather_rows


def _add_at(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``base`` (B, T, ...) with ``src`` (B, r, ...) added at rows ``idx`` (B, r) (repeats accumulate)."""
    b, t = base.shape[:2]
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * t).flatten()
    return base.flatten(0, 1).index_add(0, flat, src.flatten(0, 1)).view_as(base)


def bipartite_merge(
    metric: torch.Tensor, x: torch.Tensor, r: int, size: torch.Tensor, slot: torch.Tensor, mode: str = "weighted"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching.

    metric: (T, C) similarity features; x: (T, D) features; size: (T,) tokens each entry stands for; slot:
    (T,) original index each entry sits at (or each with a leading batch dim B). Even positions are sources,
    odd positions destinations; the r sources with the most similar destination (cosine) are merged into it.
    ``mode="weighted"`` averages by size (ToMe); ``mode="mean"`` is AIM's reference (plain mean of a
    destination and its sources). Returns (metric, x, size, slot) of the T - r survivors, sorted by slot
    (raster order kept).
    """
    single = x.dim() == 2
    if single:
        metric, x, size, slot = metric[None], x[None], size[None], slot[None]
    t = x.shape[1]
    r = min(r, t // 2)
    if r > 0:
        m = F.normalize(metric.float(), dim=-1)
        best, best_dst = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # (B, Ta)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src_idx, unm_idx = order[:, :r], order[:, r:]
        dst_idx = gather_rows(best_dst, src_idx)
        w = size.float() if mode == "weighted" else torch.ones_like(size, dtype=torch.float)
        ws, wd = w[:, 0::2], w[:, 1::2]
        w_src = gather_rows(ws, src_idx)
        tot = _add_at(wd, dst_idx, w_src)

        def combine(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            src, dst = v[:, 0::2], v[:, 1::2]
            moved = gather_rows(src, src_idx).float() * w_src[..., None]
            acc = _add_at(dst.float() * wd[..., None], dst_idx, moved)
            return gather_rows(src, unm_idx), (acc / tot[..., None]).to(v.dtype)

        x_unm, x_dst = combine(x)
        k_unm, k_dst = combine(metric)
        size_src, size_dst = size[:, 0::2], size[:, 1::2]
        size_merged = _add_at(size_dst, dst_idx, gather_rows(size_src, src_idx))
        size_new = torch.cat([gather_rows(size_src, unm_idx), size_merged], 1)
        slot_new = torch.cat([gather_rows(slot[:, 0::2], unm_idx), slot[:, 1::2]], 1)
        order = slot_new.argsort(dim=1)
        metric = gather_rows(torch.cat([k_unm, k_dst], 1), order)
        x = gather_rows(torch.cat([x_unm, x_dst], 1), order)
        size, slot = gather_rows(size_new, order), gather_rows(slot_new, order)
    if single:
        return metric[0], x[0], size[0], slot[0]
    return metric, x, size, slot


def merge_to(metric: torch.Tensor, x: torch.Tensor, k: int, mode: str = "weighted",
             schedule: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge (T, D) tokens, or each of B sequences (B, T, D), down to exactly k by repeated halving rounds
    (r = min(T // 2, T - k)), or by an explicit list of per-round r. Returns (features (k, D), sizes (k,),
    slots (k,) ascending), each with the leading B for batched input."""
    t = x.shape[-2]
    lead = x.shape[:-2]
    size = torch.ones(*lead, t, device=x.device)
    slot = torch.arange(t, device=x.device).expand(*lead, t).contiguous()
    rounds = list(schedule) if schedule is not None else []
    while True:
        cur = x.shape[-2]
        if rounds:
            r = rounds.pop(0)
        elif cur > k:
            r = min(cur // 2, cur - k)
        else:
            break
        metric, x, size, slot = bipartite_merge(metric, x, r, size, slot, mode)
    return x, size, slot
