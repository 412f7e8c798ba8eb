"""Analytic prefill FLOPs (multiply-adds x 2) for CLIP-style towers and Llama-style decoders."""
from __future__ import annotations


def vit_flops(tokens: int, layers: int, d: int, d_ff: int) -> float:
    per_layer = 2 * tokens * (4 * d * d + 2 * d * d_ff) + 2 * 2 * tokens * tokens * d
    return layers * per_layer


def llama_layer_flops(tokens: int, d: int, d_ff: int, heads: int, kv_heads: int) -> float:
    dkv = d // heads * kv_heads
    proj = 2 * tokens * (d * d + 2 * d * dkv + d * d + 3 * d * d_ff)
    attn = 2 * 2 * tokens * tokens * d / 2  # causal: half the score/value matmuls
    return proj + attn


def llama_flops(tokens: int | list[int], layers: int, d: int, d_ff: int, heads: int, kv_heads: int) -> float:
    """Prefill FLOPs; ``tokens`` is one count for every layer or the count entering each layer."""
    per_layer = tokens if isinstance(tokens, list) else [tokens] * layers
    return sum(llama_layer_flops(t, d, d_ff, heads, kv_heads) for t in per_layer)


def projector_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2 * tokens * (d_in * d_out + d_out * d_out)


def sparse_prefill_llama_flops(tokens: int, important: list[int], probes: list[int], d: int, d_ff: int,
                               heads: int, kv_heads: int) -> float:
    """Prefill FLOPs of a decoder whose layer j runs attention among ``important[j]`` of the ``tokens`` only
    (projections and MLP still see every token), plus ``probes[j]`` probe rows scored against every key."""
    full = llama_layer_flops(tokens, d, d_ff, heads, kv_heads)
    attn = 2 * 2 * tokens * tokens * d / 2
    return sum(full - attn + 2 * 2 * n * n * d / 2 + 2 * p * tokens * d for n, p in zip(important, probes))
