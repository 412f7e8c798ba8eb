"""The ``attention`` site for Hugging Face decoder LMs: a method decides, inside each decoder layer's attention and
before it runs, which tokens are important; the attention can then run on those only (sparse prefill) and the KV
cache can store them at mixed precision (:mod:`vtc.cache`).

How it reaches the attention, per instance: transformers' attention modules look their attention function up by
``self.config._attn_implementation``. vtc registers one extra name, ``"vtc"``, in transformers'
``AttentionInterface`` (a new key: no existing function changes, and unpatched models never look it up) and gives
each patched attention module its own shallow copy of the LM config naming it, plus a per-module handler; both
are restored by ``unpatch``. The mask the LM builds, and every other module, keep the original implementation
("sdpa" or "eager"), which the handler calls for the actual attention.

Prefill: important tokens attend among themselves (ascending order, so causal attention applies unchanged);
the other tokens get a zero attention output, so their hidden state goes on through the residual and the MLP
(the paper computes ``O = Attn(Q[T], K[T], V[T])`` only; anything else would cost the attention it saves).
A prefill that extends a remembered one (``generate(use_cache=False)``) reuses the prompt's decisions and lets
the new tokens attend to every earlier token, as cached decoding does, so cached and uncached generation agree.

KV cache: with a method's :class:`~vtc.sites.KVPolicy`, the prefill's empty cache (or none, when ``use_cache``)
is replaced by a :class:`~vtc.cache.MixedPrecisionCache` that the LM returns, so ``generate()`` carries it on.
Its layers return only the tokens they hold; the handler maps the LM's mask columns onto them.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..cache import MixedPrecisionCache
from ..hook_owner import HookOwner
from ..runtime import Runtime
from ..sites import AttentionInput
from .hf import cache_keyword, cache_of, module_function, seq_length
from .llm_input import LLMInputPruner, additive_mask, allowed_from_mask
from .prefill_memory import PrefillMemory

#: the attention implementation name vtc registers in transformers' AttentionInterface
IMPLEMENTATION = "vtc"
#: instance attribute of a patched attention module that holds its handler
HANDLER_ATTR = "_vtc_attention_handler"


def _dispatch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: Any):
    handler = module.__dict__.get(HANDLER_ATTR)
    if handler is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} is vtc's and works only on a module vtc "
                           "patched; this module has no vtc handler (was its config copied from a patched model?)")
    return handler(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(IMPLEMENTATION) is not _dispatch:
        AttentionInterface.register(IMPLEMENTATION, _dispatch)


@dataclass
class _Call:
    phase: str  # "prefill" | "decode"
    cache: Any = None
    valid: torch.Tensor | None = None  # (B, L) prefill: non-padding tokens
    always: torch.Tensor | None = None  # (B, L) prefill: text and last tokens
    frozen: dict[int, torch.Tensor] | None = None  # layer -> important (B, L) of a remembered prompt, extended
    extension: torch.Tensor | None = None  # (B, L) tokens past the remembered prompt
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)


class LLMAttention(HookOwner):
    """Per-layer attention handler and cache installer for one patched language model."""

    def __init__(self, lm: nn.Module, runtime: Runtime, inputs: LLMInputPruner):
        self.lm = lm
        self.rt = runtime
        self.inputs = inputs
        self.layers = list(lm.layers)
        method = runtime.method
        self.planned = sorted(i for i in method.attention_layers(len(self.layers)) if 0 <= i < len(self.layers))
        self.sparse = method.sparse_prefill_enabled()
        self.policy = method.kv_policy()
        impl = getattr(lm.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"method {method.name!r} supports sdpa and eager attention; this LM uses {impl!r} "
                             "(load the model with attn_implementation='sdpa')")
        self.impl = impl
        self.ctx: _Call | None = None
        self.memory = PrefillMemory()
        self.eager = module_function(self.layers[0].self_attn, "eager_attention_forward")

    def install(self, add: Callable[[Any], None], set_attr: Callable[[Any, str, Any], None]) -> None:
        if not self.planned:
            return
        _register()
        config = copy.copy(self.layers[0].self_attn.config)
        config._attn_implementation = IMPLEMENTATION
        for i in self.planned:
            attn = self.layers[i].self_attn
            set_attr(attn, "config", config)
            set_attr(attn, HANDLER_ATTR, functools.partial(self._attention, i))
        add(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        add(self.lm.register_forward_hook(self._lm_post, always_call=True))

    def original(self) -> Callable:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return self.eager if self.impl == "eager" else ALL_ATTENTION_FUNCTIONS[self.impl]

    # ------------------------------------------------------------------ the LM call
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        self.ctx = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = cache_of(kwargs)
        if seq_length(cache) > 0:
            self.ctx = _Call("decode", cache=cache)
            return None
        b, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        dev = embeds.device
        valid = mask.bool().to(dev) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones(
            b, length, dtype=torch.bool, device=dev)
        visual = self.inputs.prefill_visual
        visual = torch.zeros_like(valid) if visual is None else visual.to(dev) & valid
        always = valid & ~visual
        last = (valid.long() * torch.arange(length, device=dev)).argmax(-1)
        always[torch.arange(b, device=dev), last] = True
        ctx = _Call("prefill", valid=valid, always=always)
        frozen, n = self.memory.recall(embeds, ctx.decisions)
        if frozen:
            ctx.frozen = frozen
            ctx.extension = torch.arange(length, device=dev).expand(b, length) >= n
        self.ctx = ctx
        if self.policy is None:
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and not use_cache:
            return None
        if not isinstance(cache, MixedPrecisionCache):
            ctx.cache = MixedPrecisionCache(len(self.layers), self.policy)
            out = dict(kwargs)
            out[cache_keyword(module, kwargs)] = ctx.cache
            self.rt.events["attention.cache_installed"] += 1
            return args, out
        ctx.cache = cache
        return None

    def _lm_post(self, module: nn.Module, args: tuple, output: Any):
        ctx, self.ctx = self.ctx, None
        st = self.inputs.last_stats
        if ctx is not None and ctx.phase == "prefill" and st is not None:
            for i, d in ctx.decisions.items():
                st.important_tokens[i] = (d & ctx.valid).sum(-1).tolist()
            st.sequence_tokens = ctx.valid.sum(-1).tolist()
            if isinstance(ctx.cache, MixedPrecisionCache):
                st.kv_bytes = (ctx.cache.nbytes, ctx.cache.dense_nbytes(2))
        return None

    # ------------------------------------------------------------------ the attention call
    def _attention(self, layer_idx: int, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, **kwargs: Any):
        ctx = self.ctx
        if ctx is None:
            return self.original()(module, q, k, v, mask, **kwargs)
        cache_layer = None
        if isinstance(ctx.cache, MixedPrecisionCache) and layer_idx < len(ctx.cache.layers):
            cache_layer = ctx.cache.layers[layer_idx]
        with self.rt.timed():
            if ctx.phase == "prefill":
                return self._prefill(ctx, layer_idx, module, q, k, v, mask, cache_layer, kwargs)
            return self._decode(layer_idx, module, q, k, v, mask, cache_layer, kwargs)

    def _prefill(self, ctx: _Call, i: int, module: nn.Module, q, k, v, mask, cache_layer, kwargs):
        b, _, length, _ = q.shape
        if k.shape[2] != length:
            raise RuntimeError(f"vtc: a prefill of {length} tokens met {k.shape[2]} keys at layer {i}")
        if ctx.frozen is not None and i in ctx.frozen:
            important = ctx.frozen[i] & ctx.valid
        else:
            pos = torch.arange(length, device=q.device).expand(b, length)
            important = self.rt.method.attention_important(AttentionInput(
                layer=i, num_layers=len(self.layers), q=q, k=k, scale=module.scaling, valid=ctx.valid,
                candidates=ctx.valid, always=ctx.always, query_pos=pos, phase="prefill"))
            important = important & ctx.valid
        ctx.decisions[i] = important
        self.rt.events["attention.decide"] += 1
        if self.sparse and bool((ctx.valid & ~important).any()):
            out, weights = self._sparse_attention(module, q, k, v, important, ctx, kwargs), None
            self.rt.events["attention.sparse_prefill"] += 1
        else:
            out, weights = self.original()(module, q, k, v, mask, **kwargs)
        if cache_layer is not None:
            cache_layer.commit(important, ctx.valid)
            self.rt.events["attention.commit"] += 1
        return out, weights

    def _sparse_attention(self, module: nn.Module, q, k, v, important: torch.Tensor, ctx: _Call,
                          kwargs: dict[str, Any]) -> torch.Tensor:
        """Each row's important tokens attend among themselves; extension tokens attend to every earlier
        valid token; the rest get zeros. Output (B, L, H, d), as transformers' attention functions return."""
        fn = self.original()
        b, h, length, d = q.shape
        out = q.new_zeros(b, length, h, v.shape[-1])
        for r in range(b):
            ext = ctx.extension[r] & ctx.valid[r] if ctx.extension is not None else None
            idx = (important[r] & ~ext if ext is not None else important[r]).nonzero()[:, 0]
            if idx.numel():
                o, _ = fn(module, q[r:r + 1, :, idx], k[r:r + 1, :, idx], v[r:r + 1, :, idx],
                          self._causal_mask(idx.numel(), q), **kwargs)
                out[r, idx] = o[0]
            if ext is not None and bool(ext.any()):
                rows, keys = ext.nonzero()[:, 0], ctx.valid[r].nonzero()[:, 0]
                allowed = keys[None, :] <= rows[:, None]
                o, _ = fn(module, q[r:r + 1, :, rows], k[r:r + 1, :, keys], v[r:r + 1, :, keys],
                          self._format(allowed[None, None], q.dtype), **kwargs)
                out[r, rows] = o[0]
        return out

    def _causal_mask(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.impl == "sdpa":
            return None  # sdpa runs causal attention itself when no mask is given
        return self._format(torch.ones(n, n, dtype=torch.bool, device=like.device).tril()[None, None], like.dtype)

    def _format(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return allowed if self.impl == "sdpa" else additive_mask(allowed, dtype)

    def _decode(self, i: int, module: nn.Module, q, k, v, mask, cache_layer, kwargs):
        fn = self.original()
        if cache_layer is None:
            return fn(module, q, k, v, mask, **kwargs)
        b, _, nq, _ = q.shape
        pos = cache_layer.take_positions()  # (B, S) logical position of each key, -1 = padding
        logical = cache_layer.length
        identity = pos.shape[1] == logical and bool((pos == torch.arange(logical, device=pos.device)).all())
        if mask is None:
            qpos = torch.arange(logical - nq, logical, device=pos.device)
            allowed = (pos[:, None, :] <= qpos[None, :, None]) & (pos >= 0)[:, None, :]  # (B, Q, S)
        else:
            ok = allowed_from_mask(mask)[:, 0].expand(b, nq, mask.shape[-1])
            allowed = ok.gather(2, pos.clamp(min=0)[:, None, :].expand(b, nq, pos.shape[1])) & (pos >= 0)[:, None]
        attn_mask = mask if identity else self._format(allowed[:, None], q.dtype)
        out, weights = fn(module, q, k, v, attn_mask, **kwargs)
        self.rt.events["attention.decode"] += 1
        nb = cache_layer.buffered
        if nb >= cache_layer.policy.stream_gap:
            valid = allowed[:, -1]
            cand = torch.zeros_like(valid)
            cand[:, -nb:] = True
            qpos = torch.arange(pos.shape[1] - nq, pos.shape[1], device=q.device).expand(b, nq)
            important = self.rt.method.attention_important(AttentionInput(
                layer=i, num_layers=len(self.layers), q=q, k=k, scale=module.scaling, valid=valid, candidates=cand,
                always=torch.zeros_like(valid), query_pos=qpos, phase="decode"))
            cache_layer.commit(important[:, -nb:], valid[:, -nb:])
            self.rt.events["attention.commit"] += 1
        return out, weights
