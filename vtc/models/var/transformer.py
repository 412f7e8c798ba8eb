"""The VAR transformer (next-scale prediction), state-dict compatible with ``var_d16.pth`` ... ``var_d30.pth``.

Names follow the authors' ``models/var.py`` / ``basic_var.py``: ``word_embed``, ``class_emb`` (num_classes + 1 rows;
the last is the null class), ``pos_start``, ``pos_1LC``, ``lvl_embed``, ``blocks.{i}.attn.{mat_qkv, q_bias, v_bias,
zero_k_bias, scale_mul_1H11, proj}``, ``blocks.{i}.ffn.{fc1, fc2}``, ``blocks.{i}.ada_lin.1``, ``head_nm.ada_lin.1``,
``head``, buffers ``lvl_1L`` and ``attn_bias_for_masking``. The VQ-VAE is held outside the state dict, as there.
Inference keeps its keys and values in an explicit :class:`~vtc.models.var.cache.VARKVCache` that a compressor can
act on (``make_cache`` is the hook point the VAR adapter wraps).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVGroup, VARKVCache, VARLayerCache
from .sampling import sample_top_k_top_p
from .vqvae import VQVAE


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, C) -> q, k, v (B, H, L, d), q/k L2-normalised and q scaled as the authors do."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: VARLayerCache | None = None, si: int = 0) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        else:
            out = attend_groups(q, cache.update(q, k, v, si), self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


def attend_groups(q: torch.Tensor, groups: list[KVGroup], scale: float) -> torch.Tensor:
    """Attention of q (R, H, l, d) over cached groups; every head's queries see all of its group's keys (inference
    has no mask: earlier scales and the whole current one)."""
    H = q.shape[1]
    if len(groups) == 1 and groups[0].heads.numel() == H:
        g = groups[0]
        return F.scaled_dot_product_attention(q, g.k, g.v, scale=scale)
    out = torch.empty_like(q)
    for g in groups:
        out[:, g.heads] = F.scaled_dot_product_attention(q[:, g.heads], g.k, g.v, scale=scale)
    return out


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
                 attn_l2_norm: bool, shared_aln: bool):
        super().__init__()
        self.C = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: VARLayerCache | None = None, si: int = 0) -> torch.Tensor:
        if self.shared_aln:
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, attn_bias, cache, si) * g1
        return x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """Class-conditional next-scale prediction over the VQ-VAE's multi-scale codes."""

    def __init__(self, vae: VQVAE, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
                 num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 cond_drop_rate: float = 0.1, attn_l2_norm: bool = True,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)):
        super().__init__()
        if tuple(patch_nums) != vae.patch_nums:
            raise ValueError(f"VAR patch_nums {tuple(patch_nums)} differ from the VQ-VAE's {vae.patch_nums}")
        self.config = dict(num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, norm_eps=norm_eps, shared_aln=shared_aln,
                           cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm, patch_nums=list(patch_nums))
        self.vae_proxy = (vae,)  # outside the state dict, as in the authors' code
        self.Cvae, self.V = vae.Cvae, vae.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.num_classes, self.cond_drop_rate = num_classes, cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends, cur = [], 0
        for p in self.patch_nums:
            self.begin_ends.append((cur, cur + p * p))
            cur += p * p
        std = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(self.Cvae, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, embed_dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, embed_dim))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, std=std)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(embed_dim, 6 * embed_dim)) if shared_aln \
            else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(embed_dim, embed_dim, num_heads, mlp_ratio, norm_eps,
                                                   attn_l2_norm, shared_aln) for _ in range(depth)])
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer("lvl_1L", dT[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)

    @property
    def vae(self) -> VQVAE:
        return self.vae_proxy[0]

    def _apply(self, fn, recurse: bool = True):  # .to() / .half() / .cuda() move the VQ-VAE too
        self.vae._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ training (teacher forcing)
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) for every scale given the ground-truth earlier scales; labels are dropped to the null
        class with probability ``cond_drop_rate`` in training (classifier-free guidance)."""
        B = label_B.shape[0]
        if self.training and self.cond_drop_rate > 0:
            label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes,
                                  label_B)
        cond = self.class_emb(label_B)
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), 1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        cond_g = self.shared_ada_lin(cond)
        for b in self.blocks:
            x = b(x, cond_g, self.attn_bias_for_masking.to(x.dtype))
        return self.logits(x, cond)

    def logits(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """The AdaLN head, in the head's dtype, returned as float32 (the authors' get_logits)."""
        dt = self.head.weight.dtype
        return self.head(self.head_nm(x.to(dt), cond_BD.to(dt))).float()

    # ------------------------------------------------------------------ inference
    def make_cache(self, batch: int, cfg: bool) -> VARKVCache:
        """A fresh KV cache for one generation (the VAR adapter wraps this per instance to attach compressors)."""
        return VARKVCache(self.depth, self.num_heads, batch, cfg)

    def _scale_inputs(self, si: int, next_map: torch.Tensor | None, sos: torch.Tensor, lvl_pos: torch.Tensor,
                      rows: int) -> torch.Tensor:
        if si == 0:
            return sos.unsqueeze(1).expand(rows, self.first_l, -1) + self.pos_start.expand(rows, -1, -1) + \
                lvl_pos[:, :self.first_l]
        bg, ed = self.begin_ends[si]
        x = self.word_embed(next_map.flatten(2).transpose(1, 2)) + lvl_pos[:, bg:ed]
        return x.repeat(rows // x.shape[0], 1, 1)

    @torch.no_grad()
    def generate(self, class_labels: torch.Tensor | Sequence[int] | int, cfg: float | None = 1.5, top_k: int = 900,
                 top_p: float = 0.96, seed: int | None = None, more_smooth: bool = False, use_cache: bool = True,
                 batch: int | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``class_labels`` (a label per image; an int with ``batch``).

        cfg: guidance strength, ramped as ``t = cfg * si / (S - 1)`` and applied as ``(1 + t) cond - t uncond`` on
        the 2B batch (conditional rows first); ``None`` runs the conditional rows alone. top_k / top_p: sampling
        filters (0 = off); defaults are the authors' FID settings. seed: a generator seed (deterministic output).
        use_cache=False recomputes every earlier scale at each step (a reference for the cache). The cache of the
        last call is kept as ``self.last_cache``."""
        dev = self.lvl_1L.device
        if isinstance(class_labels, int):
            class_labels = [class_labels] * (batch or 1)
        labels = torch.as_tensor(class_labels, device=dev, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or (labels < 0).any() or (labels > self.num_classes).any():
            raise ValueError(f"class labels must be in [0, {self.num_classes}] ({self.num_classes} = null class); "
                             f"got {labels.tolist()}")
        if cfg is not None and cfg < 0:
            raise ValueError(f"cfg must be >= 0 or None; got {cfg}")
        rng = None
        if seed is not None:
            rng = torch.Generator(device=dev)
            rng.manual_seed(seed)
        B = labels.numel()
        rows_labels = torch.cat((labels, torch.full_like(labels, self.num_classes))) if cfg is not None else labels
        rows = rows_labels.numel()
        sos = cond = self.class_emb(rows_labels)
        dtype = next(self.blocks.parameters()).dtype
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        cache = self.make_cache(B, cfg is not None) if use_cache else None
        self.last_cache = cache
        hw, S = self.patch_nums[-1], len(self.patch_nums)
        vdt = self.vae.quantize.embedding.weight.dtype
        f_hat = sos.new_zeros(B, self.Cvae, hw, hw, dtype=vdt)
        cond_g = self.shared_ada_lin(cond)
        next_map, prefix = None, []
        for si, pn in enumerate(self.patch_nums):
            x = self._scale_inputs(si, next_map, sos, lvl_pos, rows).to(dtype)
            if cache is not None:
                for i, b in enumerate(self.blocks):
                    x = b(x, cond_g, None, cache[i], si)
                cache.end_scale()
            else:
                prefix.append(x)
                x = torch.cat(prefix, 1)
                ed = x.shape[1]
                mask = self.attn_bias_for_masking[:, :, :ed, :ed].to(x.dtype)
                for b in self.blocks:
                    x = b(x, cond_g, mask)
                x = x[:, ed - pn * pn:]
            logits = self.logits(x, cond)
            if cfg is not None:
                t = cfg * si / (S - 1)
                logits = (1 + t) * logits[:B] - t * logits[B:]
            idx = sample_top_k_top_p(logits, top_k=top_k, top_p=top_p, rng=rng)
            if not more_smooth:
                h = self.vae.quantize.embedding(idx)
            else:  # the authors' visualisation option (gumbel-softmax blend), not used for FID
                tau = max(0.27 * (1 - si / (S - 1) * 0.95), 0.005)
                g = -torch.empty_like(logits).exponential_(generator=rng).log()
                h = ((logits * (1 + si / (S - 1)) + g) / tau).softmax(-1).to(vdt) @ self.vae.quantize.embedding.weight
            h = h.transpose(1, 2).reshape(B, self.Cvae, pn, pn).to(vdt)
            f_hat, next_map = self.vae.quantize.next_input(si, f_hat, h)
            next_map = next_map.to(dtype)
        return self.vae.fhat_to_img(f_hat).float().add(1).mul(0.5)
