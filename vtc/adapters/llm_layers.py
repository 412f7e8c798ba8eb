"""The ``llm_layer(k)`` site for Hugging Face decoder LMs (Llama, Mistral, Qwen2, ...).

At a planned layer the layer's own q/k projections are captured (no eager attention, no extra projections),
RoPE is applied with the layer's ``position_embeddings``, and the method gets the attention inputs it asked
for. After the layer, tokens the method drops leave the hidden states for good: later layers get gathered
rotary embeddings, position ids and a rebuilt mask, and their KV caches hold only kept tokens (per-layer
ragged lengths; layer 0 stays full, so transformers' mask sizes stay right). At decode, each pruned
layer's mask columns are re-mapped to its shorter cache. The last layer's output is scattered back to the
LM-input layout.

A prefill that extends the previous one (``generate(use_cache=False)`` re-runs the whole sequence each
step) reuses the decisions taken on the prompt, so cached and uncached generation agree: the kept set is
decided once, on the prompt, in both modes.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.batch import gather_rows, left_repad_index, scatter_rows
from ..runtime import Runtime
from ..sites import LLMLayerInput
from .hf import cache_of, module_function, output_cache, seq_length
from ..hook_owner import HookOwner
from .llm_input import REUSED_CACHE, LLMInputPruner, additive_mask, allowed_from_mask, gather_positions
from .prefill_memory import PrefillMemory


@dataclass
class _Prefill:
    index: torch.Tensor  # (B, Lc) positions in the LM-input layout
    valid: torch.Tensor  # (B, Lc)
    visual: torch.Tensor  # (B, Lc)
    visual_input: torch.Tensor  # (B,)
    key_ok: torch.Tensor | None = None  # (B, Lc) False for dropped tokens kept as queries only
    allowed_in: torch.Tensor | None = None  # (B, Lk, Lk) bool, LM-input layout
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # full LM-input rotary tables
    position_ids: torch.Tensor | None = None
    mask_kind: str = "bool"  # format later layers expect: "bool" (sdpa) or "float" (eager)
    pruned: bool = False
    layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (index, valid)
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> keep (B, Lk) in LM-input layout
    frozen: dict[int, torch.Tensor] | None = None
    captured: dict[str, Any] = field(default_factory=dict)
    repacked: bool = False  # index is no longer the identity layout
    allowed_now: torch.Tensor | None = None  # _current_allowed of the present layout (reset when it changes)


class LLMLayerPruner(HookOwner):
    def __init__(self, lm: nn.Module, runtime: Runtime, inputs: LLMInputPruner):
        self.lm = lm
        self.layers = lm.layers
        self.rt = runtime
        self.inputs = inputs
        self.plan = {i: q for i, q in runtime.llm_plan(len(self.layers)).items() if 0 <= i < len(self.layers) - 1}
        #: dropped tokens stay as queries (masked as keys) until the last planned layer, where they leave
        self.query_only_drops = bool(self.plan) and runtime.method.llm_keeps_dropped_queries()
        impl = getattr(lm.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"in-LLM pruning supports sdpa and eager attention; this LM uses {impl!r}")
        self.impl = impl
        self.ctx: _Prefill | None = None
        #: decisions of recent prefills (a few, so interleaved uncached generations each find theirs)
        self.memory = PrefillMemory()
        self._decode: "weakref.WeakKeyDictionary[Any, dict[int, tuple[torch.Tensor, torch.Tensor, int]]]" = (
            weakref.WeakKeyDictionary())
        attn = self.layers[0].self_attn
        self.rope = module_function(attn, "apply_rotary_pos_emb", required=bool(self.plan))

    def install(self, add: Callable[[Any], None]) -> None:
        if not self.plan:
            return
        add(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        add(self.lm.register_forward_hook(self._lm_post))
        first = min(self.plan)
        for j, layer in enumerate(self.layers):
            if j == 0 or j > first:
                add(layer.register_forward_pre_hook(functools.partial(self._layer_pre, j), with_kwargs=True))
        for i in self.plan:
            attn = self.layers[i].self_attn
            add(attn.q_proj.register_forward_hook(functools.partial(self._grab, "q")))
            add(attn.k_proj.register_forward_hook(functools.partial(self._grab, "k")))
            add(attn.register_forward_pre_hook(self._grab_rope, with_kwargs=True))
            add(self.layers[i].register_forward_hook(functools.partial(self._layer_post, i)))
        add(self.layers[-1].register_forward_hook(self._restore))

    # ------------------------------------------------------------------ prefill context
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        cache = cache_of(kwargs)
        past = seq_length(cache)
        self.ctx = None
        if past > 0 and kwargs["inputs_embeds"].shape[1] > 1 and self._decode.get(cache) is not None:
            raise RuntimeError(REUSED_CACHE)
        if past > 0 or self.inputs.prefill_visual is None:
            return None
        embeds = kwargs["inputs_embeds"]
        b, lk = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones(b, lk, dtype=torch.bool, device=embeds.device)
        visual = self.inputs.prefill_visual.to(embeds.device)
        idx = torch.arange(lk, device=embeds.device).expand(b, lk)
        self.ctx = _Prefill(idx, valid, visual & valid, (visual & valid).sum(-1), key_ok=valid)
        frozen, _ = self.memory.recall(embeds, self.ctx.decisions)
        self.ctx.frozen = frozen or None
        return None

    def _lm_post(self, module: nn.Module, args: tuple, output: Any):
        ctx, self.ctx = self.ctx, None
        cache = output_cache(output)  # the model may have created it after the pre-hook
        if ctx is not None and ctx.pruned and cache is not None:
            lk = ctx.allowed_in.shape[1]
            self._decode[cache] = {j: (ix, va, lk) for j, (ix, va) in ctx.layouts.items()}
            self.rt.events["llm_layer.cache_registered"] += 1
        return None

    # ------------------------------------------------------------------ layer hooks
    def _layer_pre(self, j: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        ctx = self.ctx
        if ctx is not None:
            if j == 0:
                with self.rt.timed():
                    self._capture_inputs(ctx, kwargs)
                return None
            if not ctx.pruned:
                return None
            with self.rt.timed():
                return args, self._rewrite_prefill(ctx, kwargs)
        cache = cache_of(kwargs)
        state = self._decode.get(cache) if cache is not None else None
        if state is None or j not in state:
            return None
        with self.rt.timed():
            out = self._rewrite_decode(state[j], kwargs, j)
        self.rt.events["llm_layer.decode"] += 1
        return args, out

    def _capture_inputs(self, ctx: _Prefill, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        b, lk = ctx.valid.shape
        dev = ctx.valid.device
        if mask is None:
            causal = torch.ones(lk, lk, dtype=torch.bool, device=dev).tril()
            allowed = causal[None] & ctx.valid[:, None, :]
            ctx.mask_kind = "float" if self.impl == "eager" else "bool"
        elif mask.dtype == torch.bool:
            allowed = mask[:, 0].expand(b, lk, lk)
            ctx.mask_kind = "bool"
        else:
            allowed = allowed_from_mask(mask)[:, 0].expand(b, lk, lk)
            ctx.mask_kind = "float"
        ctx.allowed_in = allowed
        ctx.cos_sin = kwargs.get("position_embeddings")
        ctx.position_ids = kwargs.get("position_ids")

    def _format_mask(self, allowed: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
        return allowed[:, None] if kind == "bool" else additive_mask(allowed[:, None], dtype)

    def _current_allowed(self, ctx: _Prefill) -> torch.Tensor:
        """(B, Lc, Lc) bool mask of the present layout, built once per layout (every later layer reuses it)."""
        if ctx.allowed_now is not None:
            return ctx.allowed_now
        ix = ctx.index
        rows = ctx.allowed_in
        if ctx.repacked:
            rows = gather_rows(rows, ix)
            rows = rows.gather(2, ix[:, None, :].expand(-1, ix.shape[1], -1))
        allowed = rows & (ctx.valid & ctx.key_ok)[:, None, :]
        empty = ~allowed.any(-1)
        if bool(empty.any()):  # padding rows (and a query-only row with no key left) attend to themselves: no NaN
            allowed = allowed | (torch.eye(ix.shape[1], dtype=torch.bool, device=ix.device)[None] & empty[..., None])
        ctx.allowed_now = allowed
        return allowed

    def _rewrite_prefill(self, ctx: _Prefill, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        cos, sin = ctx.cos_sin
        b = ctx.index.shape[0]
        out["position_embeddings"] = (gather_rows(cos.expand(b, *cos.shape[1:]), ctx.index),
                                      gather_rows(sin.expand(b, *sin.shape[1:]), ctx.index))
        if ctx.position_ids is not None:
            out["position_ids"] = gather_positions(ctx.position_ids, ctx.index)
        # additive masks (eager) take the compute dtype, which the rotary tables already have
        out["attention_mask"] = self._format_mask(self._current_allowed(ctx), cos.dtype, ctx.mask_kind)
        return out

    def _rewrite_decode(self, state: tuple[torch.Tensor, torch.Tensor, int], kwargs: dict[str, Any],
                        layer: int) -> dict[str, Any]:
        index, valid, lk = state
        mask = kwargs.get("attention_mask")
        out = dict(kwargs)
        b, lc = index.shape
        if mask is None:
            if bool(valid.all()):
                return kwargs
            q = (kwargs.get("hidden_states") if "hidden_states" in kwargs else None)
            q_len = q.shape[1] if q is not None else 1
            total_new = seq_length(cache_of(kwargs), layer) + q_len - lc  # this layer's own cache length
            new = torch.ones(total_new, dtype=torch.bool, device=valid.device).expand(b, total_new)
            cols = torch.cat([valid, new], 1)[:, None, None, :].expand(b, 1, q_len, lc + total_new).clone()
            if q_len > 1:
                causal = torch.ones(q_len, total_new, dtype=torch.bool, device=valid.device)
                cols[..., lc:] &= causal.tril(total_new - q_len)
            eager = self.impl == "eager"
            out["attention_mask"] = self._format_mask(cols[:, 0], torch.float32, "float") if eager else cols
            return out
        kv_full = mask.shape[-1]
        cols = torch.cat([index, torch.arange(lk, kv_full, device=index.device).expand(b, -1)], 1)
        m = mask.expand(b, *mask.shape[1:]).gather(3, cols[:, None, None, :].expand(b, *mask.shape[1:3], -1))
        rest = torch.ones(b, kv_full - lk, dtype=torch.bool, device=valid.device)
        keep_cols = torch.cat([valid, rest], 1)[:, None, None, :]
        if m.dtype == torch.bool:
            m = m & keep_cols
        else:
            m = m.masked_fill(~keep_cols, torch.finfo(m.dtype).min)
        out["attention_mask"] = m
        return out

    # ------------------------------------------------------------------ capture + prune
    def _grab(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.ctx is not None:
            self.ctx.captured[name] = output

    def _grab_rope(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self.ctx is not None:
            self.ctx.captured["rope"] = kwargs.get("position_embeddings")
        return None

    def _layer_post(self, i: int, module: nn.Module, args: tuple, output: torch.Tensor):
        ctx = self.ctx
        if ctx is None:
            return None
        with self.rt.timed():
            return self._prune_after(i, module, ctx, output)

    def _prune_after(self, i: int, layer: nn.Module, ctx: _Prefill, hidden: torch.Tensor) -> torch.Tensor:
        if ctx.frozen is not None and i in ctx.frozen:
            keep = ctx.frozen[i].gather(1, ctx.index) & ctx.valid
        else:
            keep = self.rt.llm_keep(self._layer_input(i, layer.self_attn, ctx))
            if bool((ctx.valid & ~ctx.visual & ~keep).any()):
                raise RuntimeError(f"method {self.rt.method.name!r} dropped text tokens at layer {i}")
            keep = keep & ctx.valid & ctx.key_ok
        in_layout = torch.zeros(ctx.valid.shape[0], ctx.allowed_in.shape[1], dtype=torch.bool, device=keep.device)
        in_layout.scatter_(1, ctx.index, keep & ctx.valid)
        ctx.decisions[i] = in_layout
        for k in ("q", "k", "rope"):
            ctx.captured.pop(k, None)
        ctx.pruned = True
        self.rt.events["llm_layer.prune"] += 1
        ctx.allowed_now = None
        if self.query_only_drops and i < max(self.plan):  # dropped tokens stay as queries only, masked as keys
            ctx.key_ok = keep
            self.rt.events["llm_layer.mask"] += 1
            out = hidden
        else:
            idx, valid = left_repad_index(keep)
            ctx.index = ctx.index.gather(1, idx)
            ctx.repacked = True
            ctx.valid = ctx.key_ok = valid
            ctx.visual = ctx.visual.gather(1, idx) & valid
            out = gather_rows(hidden, idx)
        for j in range(i + 1, len(self.layers)):  # the KV layout of later layers: query-only tokens are not keys
            ctx.layouts[j] = (ctx.index, ctx.valid & ctx.key_ok)
        st = self.inputs.last_stats
        if st is not None:  # visual tokens the later layers process (query-only ones cost compute too)
            counts = ctx.visual.sum(-1).tolist()
            for j in range(i + 1, len(self.layers)):
                st.layer_tokens[j] = counts
        return out

    def _layer_input(self, i: int, attn: nn.Module, ctx: _Prefill) -> LLMLayerInput:
        cap = ctx.captured
        b, l = ctx.valid.shape
        hd = attn.head_dim
        q = cap["q"].view(b, l, -1, hd)
        k = cap["k"].view(b, l, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cap["rope"]
        query_kind = self.plan[i]
        allowed = self._current_allowed(ctx)
        if query_kind == "last":
            last = (ctx.valid.long() * torch.arange(l, device=q.device)).argmax(-1)  # last real token per row
            q = q.gather(2, last[:, None, None, None].expand(b, q.shape[1], 1, hd))
            cq = cos.expand(b, *cos.shape[1:]).gather(1, last[:, None, None].expand(b, 1, cos.shape[-1]))
            sq = sin.expand(b, *sin.shape[1:]).gather(1, last[:, None, None].expand(b, 1, sin.shape[-1]))
            q, _ = self.rope(q, q, cq, sq)
            _, k = self.rope(k, k, cos, sin)
            allowed = allowed.gather(1, last[:, None, None].expand(b, 1, l))
        else:
            q, k = self.rope(q, k, cos, sin)
        dropped = ctx.valid & ~ctx.key_ok
        return LLMLayerInput(layer=i, num_layers=len(self.layers), q=q, k=k, scale=attn.scaling, allowed=allowed,
                             visual=ctx.visual, valid=ctx.valid, visual_input=ctx.visual_input,
                             dropped=dropped if bool(dropped.any()) else None)

    def _restore(self, module: nn.Module, args: tuple, output: torch.Tensor):
        ctx = self.ctx
        if ctx is None or not ctx.pruned:
            return None
        with self.rt.timed():
            return scatter_rows(output, ctx.index, ctx.valid, ctx.allowed_in.shape[1])
