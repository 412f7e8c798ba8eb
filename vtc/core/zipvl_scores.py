"""ZipVL's importance scores and adaptive ratio (arXiv 2410.08584, Eqs. 5-9; ZipCache's probe rule), as tensor
logic over one layer's post-RoPE q / k. See ``shared/research/zipvl_hack_var.md`` §1.1-1.2.

- :func:`probe_positions`: the last 5 % of the positions plus 5 % random earlier ones (drawn with replacement,
  seeded), as ZipCache's ``probe_ids``.
- :func:`probe_attention`: softmax rows of the probes only, from q / k (any attention backend; never the full map).
- :func:`important_count`: Eq. 6, the smallest p whose top-p *un-normalised* column masses hold tau of the mass.
- :func:`normalized_scores`: Eq. 7, column mass divided by the number of queries that can attend to each token
  (ZipCache's divisor, L - j, the full-matrix count).
- :func:`important_set`: Eq. 8, the top-p tokens by normalised score, plus the positions that must stay exact.
"""
from __future__ import annotations

import torch


def probe_positions(length: int, frac: float = 0.05, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The last ``int(frac * L)`` positions (at least one: the last) plus as many random earlier ones."""
    recent = max(1, int(frac * length))
    start = length - recent
    g = torch.Generator().manual_seed(seed)
    earlier = torch.randint(0, max(start, 1), (int(frac * length),), generator=g) if start > 0 else torch.empty(0)
    return torch.cat([torch.arange(start, length), earlier.long()]).to(device)


def probe_attention(q: torch.Tensor, k: torch.Tensor, probes: torch.Tensor, scale: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax rows of the probe queries: q (B, H, L, d), k (B, Hk, L, d) -> (B, H, P, L) float32.
    ``valid`` (B, L) masks padding keys. Grouped-query keys are repeated to the query heads."""
    b, h, length, _ = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = torch.matmul(q[:, :, probes].float(), k.float().transpose(-1, -2)) * scale  # (B, H, P, L)
    causal = torch.arange(length, device=q.device)[None, :] <= probes[:, None]  # (P, L)
    allowed = causal[None, None]
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def important_count(mass: torch.Tensor, tau: float, total: float | torch.Tensor) -> torch.Tensor:
    """Eq. 6 per row: the smallest p with sum of the p largest entries of ``mass`` (B, L) >= tau * total."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1]; got {tau!r}")
    ordered = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    target = torch.as_tensor(total, dtype=ordered.dtype, device=ordered.device) * tau
    target = target.reshape(-1, 1) if target.dim() else target
    # a tiny tolerance: tau = 1.0 must reach the whole mass despite rounding in the cumulative sum
    reached = ordered >= target * (1 - 1e-6)
    return reached.float().argmax(-1) + 1


def normalized_scores(mass: torch.Tensor) -> torch.Tensor:
    """Eq. 7 with ZipCache's divisor: column mass (B, L) / (L - j), the queries that can attend to token j."""
    length = mass.shape[-1]
    return mass / torch.arange(length, 0, -1, device=mass.device, dtype=mass.dtype)


def important_set(mass: torch.Tensor, p: torch.Tensor, always: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8: (B, L) bool, the ``p[b]`` tokens with the highest normalised score, plus ``always`` (B, L)."""
    score = normalized_scores(mass)
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(mass.shape[-1], device=mass.device).expand_as(order))
    keep = rank < p[:, None]
    return keep | always if always is not None else keep
