"""Top-k / top-p sampling of VAR's per-token logits (the authors' filtering rule)."""
from __future__ import annotations

import torch


def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       rng: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, l, V) -> sampled indices (B, l). top_k keeps the k largest logits; top_p keeps the smallest set
    whose probability mass exceeds top_p (tokens whose ascending cumulative mass is <= 1 - top_p are removed,
    the top token always stays). 0 turns a filter off."""
    B, l, V = logits.shape
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -torch.inf)
    probs = logits.softmax(-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=rng).view(B, l)
