"""Bipartite soft matching (ToMe / AIM) that tracks token sizes and the slot each token came from.

Every function takes one sequence (T, ·) or a batch of equal-length sequences (B, T, ·) (video frames, crops
of one size): a batch runs as one set of tensor ops, so the host launches the same few kernels for 32 frames
as for one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from .batch import gather_rows


def bipartite_merge(
    metric: torch.Tensor, x: torch.Tensor, r: int, size: torch.Tensor, slot: torch.Tensor, mode: str = "mean",
    order: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching.

    metric: (T, C) similarity features; x: (T, D) features; size: (T,) tokens each entry stands for; slot:
    (T,) original index each entry sits at (or each with a leading batch dim B). Even positions are sources,
    odd positions destinations; the r sources with the most similar destination (cosine) are merged into it.
    ``mode="mean"`` is AIM's reference (plain mean of a destination and its sources, metric included);
    ``mode="weighted"`` averages by size (ToMe). Returns (metric, x, size, slot) of the T - r survivors:
    ``order="reference"`` in AIM's order, [unmerged sources by descending similarity, then destinations] (the
    next round's even/odd split runs on it); ``order="raster"`` sorted by slot. Ties in similarity keep the
    earlier source first (a stable sort; the reference's unstable argsort leaves them to the device).
    """
    single = x.dim() == 2
    if single:
        metric, x, size, slot = metric[None], x[None], size[None], slot[None]
    t = x.shape[1]
    r = min(r, t // 2)
    if r > 0:
        m = F.normalize(metric.float(), dim=-1)
        best, best_dst = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # (B, Ta)
        rank = best.argsort(dim=-1, descending=True, stable=True)
        src_idx, unm_idx = rank[:, :r], rank[:, r:]
        dst_idx = gather_rows(best_dst, src_idx)
        w = size.float() if mode == "weighted" else torch.ones_like(size, dtype=torch.float)
        ws, wd = w[:, 0::2], w[:, 1::2]
        w_src = gather_rows(ws, src_idx)
        tot = kernels.add_rows_at(wd, dst_idx, w_src)

        def combine(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            src, dst = v[:, 0::2], v[:, 1::2]
            moved = gather_rows(src, src_idx).float() * w_src[..., None]
            acc = kernels.add_rows_at(dst.float() * wd[..., None], dst_idx, moved)
            return gather_rows(src, unm_idx), (acc / tot[..., None]).to(v.dtype)

        x_unm, x_dst = combine(x)
        k_unm, k_dst = combine(metric)
        size_src, size_dst = size[:, 0::2], size[:, 1::2]
        size_merged = kernels.add_rows_at(size_dst, dst_idx, gather_rows(size_src, src_idx))
        size_new = torch.cat([gather_rows(size_src, unm_idx), size_merged], 1)
        slot_new = torch.cat([gather_rows(slot[:, 0::2], unm_idx), slot[:, 1::2]], 1)
        metric, x = torch.cat([k_unm, k_dst], 1), torch.cat([x_unm, x_dst], 1)
        size, slot = size_new, slot_new
        if order == "raster":
            metric, x, size, slot = _by_slot(metric, x, size, slot)
    if single:
        return metric[0], x[0], size[0], slot[0]
    return metric, x, size, slot


def _by_slot(metric, x, size, slot):
    """Every tensor re-ordered by ascending slot (one sequence (T, ...) or a batch (B, T, ...))."""
    order = slot.argsort(dim=-1)
    if slot.dim() == 1:
        return metric[order], x[order], size[order], slot[order]
    return (gather_rows(metric, order), gather_rows(x, order), gather_rows(size, order), gather_rows(slot, order))


def merge_to(metric: torch.Tensor, x: torch.Tensor, k: int, mode: str = "mean",
             schedule: list[int] | None = None, order: str = "reference") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge (T, D) tokens, or each of B sequences (B, T, D), down to exactly k by repeated halving rounds
    (r = min(T // 2, T - k)), or by an explicit list of per-round r; ``mode`` and ``order`` as in
    :func:`bipartite_merge`. Returns (features (k, D), sizes (k,), slots (k,) ascending: each survivor at its
    destination's original index), each with the leading B for batched input."""
    if mode not in ("mean", "weighted") or order not in ("reference", "raster"):
        raise ValueError(f"mode must be 'mean' or 'weighted' and order 'reference' or 'raster'; got {mode!r}, {order!r}")
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
        metric, x, size, slot = bipartite_merge(metric, x, r, size, slot, mode, order)
    _, x, size, slot = _by_slot(metric, x, size, slot)
    return x, size, slot


def merge_into_kept(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LOOK-M-style averaged merging: each evicted key (and its value) joins the kept key it is most similar to
    (cosine of keys); every kept key/value becomes the mean of itself and the ones that joined it.

    k, v: (..., T, d); keep: (..., K) indices of kept keys. Returns the merged (..., K, d) keys and values. The
    gathers and the scatter-add run through :mod:`vtc.kernels`, on the leading dims flattened."""
    t, d, big_k = k.shape[-2], k.shape[-1], keep.shape[-1]
    kf, vf, idx = k.float().reshape(-1, t, d), v.float().reshape(-1, t, v.shape[-1]), keep.reshape(-1, big_k)
    kept_k = gather_rows(kf, idx)
    evicted = torch.ones(kf.shape[:-1], dtype=torch.bool, device=k.device).scatter(-1, idx, False)
    target = (F.normalize(kf, dim=-1) @ F.normalize(kept_k, dim=-1).transpose(-1, -2)).argmax(-1)  # closest kept slot
    target = torch.where(evicted, target, torch.full_like(target, big_k))  # kept keys: a dummy slot
    one = kf.new_ones(*kf.shape[:-1], 1)  # counts ride along as a last column
    rows = torch.cat([kf, vf, one], -1)
    kept = torch.cat([kept_k, gather_rows(vf, idx), kf.new_ones(kf.shape[0], big_k, 1)], -1)  # each counts itself
    joined = kernels.add_rows_at(rows.new_zeros(rows.shape[0], big_k + 1, rows.shape[-1]), target, rows)
    total = kept + joined[:, :big_k]
    mean = total[..., :-1] / total[..., -1:]
    out_k, out_v = mean[..., :d], mean[..., d:]
    return (out_k.reshape(*keep.shape, d).to(k.dtype), out_v.reshape(*keep.shape, v.shape[-1]).to(v.dtype))
