"""The ``llm_input`` site, shared by every family whose language model takes
``(inputs_embeds, attention_mask, position_ids, cache)`` as keyword arguments (the cache keyword is read under
either of its names, see :mod:`vtc.adapters.hf`).

At prefill it drops pruned rows from ``inputs_embeds`` (kept rows keep their original, possibly 3-D M-RoPE,
positions; rows keeping different counts are left re-padded) and always passes an explicit 2-D mask, so
transformers never mistakes the gaps in ``position_ids`` for packed sequences. At decode it keeps the
mask in step with the shorter cache. A forward hook scatters ``last_hidden_state`` back to the full length,
so logits stay aligned with ``input_ids`` (dropped visual positions get zeros).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.batch import gather_rows, left_repad_index, scatter_rows
from ..runtime import Runtime
from .hf import cache_of, output_cache, seq_length
from ..hook_owner import HookOwner

REUSED_CACHE = (
    "vtc: this KV cache holds a compressed prefill (vtc dropped visual tokens from it), and a forward pass brought "
    "several new tokens to it (a cache reused across generate() calls / turns, chunked prefill or assisted "
    "decoding). Positions and masks would no longer match the token ids, so the answer would silently change. "
    "Pass the whole conversation in one new prefill without past key values: it is re-compressed each turn.")

#: called at prefill with the LM kwargs; returns (keep (B, L) bool, is_visual (B, L) bool) or None
KeepFn = Callable[[dict[str, Any]], "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass
class _DecodeState:
    mask_kept: torch.Tensor  # (B, Lk) attention mask of the kept prefill rows
    full_len: int  # prefill length before pruning
    kept_len: int  # prefill length after pruning


class LLMInputPruner(HookOwner):
    """Prefill/decode rewrite of the language model's inputs for one patched model."""

    def __init__(self, language_model: nn.Module, keep_fn: KeepFn, runtime: Runtime,
                 on_pruned: Callable[[int, int], None] | None = None):
        self.lm = language_model
        #: called after a prefill dropped rows, with (full length, kept length): family-specific state to shift
        self.on_pruned = on_pruned
        self.keep_fn = keep_fn
        self.runtime = runtime
        self._decode: "weakref.WeakKeyDictionary[Any, _DecodeState]" = weakref.WeakKeyDictionary()
        self._restore: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._pending: _DecodeState | None = None  # state of this prefill, registered for the cache it fills
        #: visual mask (B, L) of the LM input at the current prefill (after any gather), else None
        self.prefill_visual: torch.Tensor | None = None
        self.last_stats = None

    def install(self, add_handle: Callable[[Any], None]) -> None:
        add_handle(self.lm.register_forward_pre_hook(self._pre, with_kwargs=True))
        add_handle(self.lm.register_forward_hook(self._post, with_kwargs=True))

    def decode_state(self, cache: Any) -> "_DecodeState | None":
        """Lengths and kept mask of the prefill that filled ``cache``, if vtc pruned it."""
        return self._decode.get(cache)

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:
            raise TypeError("vtc expects the language model to be called with keyword arguments only")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = cache_of(kwargs)
        past = seq_length(cache)
        self.end_call()
        if past == 0:
            out = self._prefill(kwargs)
        else:
            out = self._decode_call(kwargs, cache, past)
        check_mask_length(out, past)
        return (args, out) if out is not kwargs else None

    def end_call(self) -> None:
        """Forget the per-call state (also after a forward that raised)."""
        self.prefill_visual = None
        self.last_stats = None
        self._pending = None
        self._restore = None

    def _decode_call(self, kwargs: dict[str, Any], cache: Any, past: int) -> dict[str, Any]:
        state = self._decode.get(cache)
        embeds = kwargs["inputs_embeds"]
        if embeds.shape[1] > 1:
            if state is not None:
                raise RuntimeError(REUSED_CACHE)
            keep = self.keep_fn(kwargs)
            if keep is not None and keep[1].any():
                raise RuntimeError(
                    "vtc: visual tokens arrived after the first forward pass of this cache (chunked prefill, or a "
                    "KV cache reused across generate() calls). Neither is supported on a patched model: pass the "
                    "whole conversation in one prefill (it is re-compressed each turn)."
                )
        if state is None:
            return kwargs
        with self.runtime.timed():
            out = self._decode_step(kwargs, state, past)
        self.runtime.events["llm_input.decode"] += 1
        return out

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        pending, self._pending = self._pending, None
        if pending is not None:  # the model may have created the cache itself, after this pre-hook
            cache = output_cache(output)
            if cache is not None:
                self._decode[cache] = pending
                self.runtime.events["llm_input.cache_registered"] += 1
        restore, self._restore = self._restore, None
        if restore is None:
            return None
        index, valid, length = restore
        with self.runtime.timed():
            output["last_hidden_state"] = scatter_rows(output["last_hidden_state"], index, valid, length)
        return output

    # ------------------------------------------------------------------ prefill
    def _prefill(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        with self.runtime.timed():
            res = self.keep_fn(kwargs)
        if res is None:
            self.runtime.discard_pending_time()
            return kwargs
        keep, visual = res
        if not visual.any():
            self.runtime.discard_pending_time()
            return kwargs
        with self.runtime.timed():
            before = visual.sum(-1).tolist()
            after = (keep & visual).sum(-1).tolist()
            if bool(keep.all()):
                out = kwargs  # nothing dropped: leave every input untouched (exact identity)
                self.prefill_visual = visual
            else:
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    # re-pack the real tokens only: a short row's old left padding must not set the batch length
                    keep = keep & mask.bool().to(keep.device)
                    keep[:, -1] = True
                out = self._gather(kwargs, keep)
                self.runtime.events["llm_input.prefill_gather"] += 1
                index, valid, _ = self._restore
                self.prefill_visual = visual.gather(1, index) & valid
                if self.on_pruned is not None:
                    self.on_pruned(keep.shape[1], index.shape[1])
        self.last_stats = self.runtime.record(before, after)
        return out

    def _gather(self, kwargs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        embeds = kwargs["inputs_embeds"]
        b, length = keep.shape
        index, valid = left_repad_index(keep)
        out = dict(kwargs)
        out["inputs_embeds"] = gather_rows(embeds, index)

        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        elif not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError("vtc supports 2-D attention masks (batch, seq) only; got a custom 4-D or dict mask")
        mask_kept = mask.gather(1, index) * valid.to(mask.dtype)
        out["attention_mask"] = mask_kept

        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=embeds.device).unsqueeze(0)
        out["position_ids"] = gather_positions(pos, index)

        vpm = kwargs.get("visual_pos_masks")  # Qwen3-VL deepstack: per-visual-token embeddings added in early layers
        if vpm is not None:
            keep_flat = keep.to(vpm.device)[vpm]
            out["visual_pos_masks"] = vpm.gather(1, index.to(vpm.device)) & valid.to(vpm.device)
            if kwargs.get("deepstack_visual_embeds") is not None:
                out["deepstack_visual_embeds"] = [d[keep_flat.to(d.device)] for d in kwargs["deepstack_visual_embeds"]]

        self._pending = _DecodeState(mask_kept, length, index.shape[1])
        self._restore = (index, valid, length)
        return out

    # ------------------------------------------------------------------ decode
    def _decode_step(self, kwargs: dict[str, Any], st: _DecodeState, past: int) -> dict[str, Any]:
        embeds = kwargs["inputs_embeds"]
        b, q = embeds.shape[:2]
        if st.mask_kept.shape[0] != b:
            raise RuntimeError(
                f"vtc: decode batch {b} differs from the prefill batch {st.mask_kept.shape[0]} of this cache"
            )
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        total = past + q
        if mask is not None:
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                raise ValueError("vtc supports 2-D attention masks (batch, seq) only")
            if mask.shape[1] == total + st.full_len - st.kept_len:  # full-length mask from generate()
                out["attention_mask"] = torch.cat([st.mask_kept.to(mask.dtype), mask[:, st.full_len:]], dim=1)
            elif mask.shape[1] != total:
                raise ValueError(
                    f"vtc: attention_mask has length {mask.shape[1]}; expected {total + st.full_len - st.kept_len} "
                    f"(unpruned) or {total} (pruned cache)"
                )
        elif not bool(st.mask_kept.all()):
            tail = torch.ones(b, total - st.kept_len, dtype=st.mask_kept.dtype, device=embeds.device)
            out["attention_mask"] = torch.cat([st.mask_kept, tail], dim=1)
        if kwargs.get("position_ids") is None:
            # an unpatched model would continue at the full prefill length
            pos = torch.arange(q, device=embeds.device) + past + (st.full_len - st.kept_len)
            out["position_ids"] = pos.unsqueeze(0).expand(b, q)
        return out


def gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids of shape (B|1, L) or (R, B|1, L) (M-RoPE) at index (B, Lk)."""
    b, lk = index.shape
    if pos.dim() == 2:
        return pos.expand(b, -1).gather(1, index)
    if pos.dim() == 3:
        r = pos.shape[0]
        return pos.expand(r, b, -1).gather(2, index.unsqueeze(0).expand(r, b, lk))
    raise ValueError(f"unsupported position_ids shape {tuple(pos.shape)}")


def allowed_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask as transformers builds it -> bool, True where attention is allowed (sdpa masks are
    bool already; eager masks are additive, the dtype's minimum where masked)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The eager form of a bool mask: 0 where allowed, the dtype's minimum where not."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def check_mask_length(kwargs: dict[str, Any], past: int) -> None:
    """Refuse a 2-D attention mask longer than the keys the model will attend to: transformers silently reads only
    its first columns, which is wrong for any row whose cache vtc shortened. Happens when vtc cannot find the
    cache it pruned (e.g. a renamed cache keyword) or when a caller hands over a full-length mask by hand."""
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return
    total = past + kwargs["inputs_embeds"].shape[1]
    if mask.shape[1] > total:
        raise RuntimeError(
            f"vtc: the language model got a {mask.shape[1]}-column attention mask for {total} keys ({past} cached + "
            f"{total - past} new); vtc found no compressed prefill for this cache (looked for the keywords "
            "'cache' and 'past_key_values'), and transformers would silently truncate the mask"
        )
