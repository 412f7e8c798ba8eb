"""Key importance for generation KV caches from a few observation queries (no eager attention needed)."""
from __future__ import annotations

import torch

from .scores import attention_rows
from .select import uniform_indices


def observation_scores(q: torch.Tensor, k: torch.Tensor, scale: float, n_obs: int = 32) -> torch.Tensor:
    """(R, H, T) attention each key receives from ``n_obs`` queries taken uniformly (evenly spaced) from the current
    scale's l queries q (R, H, l, d) over keys k (R, H, T, d), summed over those queries (HACK's subset attention;
    all queries when l <= n_obs)."""
    idx = uniform_indices(q.shape[2], n_obs, q.device)
    return attention_rows(q[:, :, idx], k, scale).sum(2)


def column_variance(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(R, H): the variance over query rows of each key column of the attention matrix, summed over columns (HACK's
    head statistic: low for vertical-stripe heads whose every query looks at the same few keys)."""
    att = attention_rows(q, k, scale)  # (R, H, l, T)
    return att.var(dim=2, unbiased=False).sum(-1)
