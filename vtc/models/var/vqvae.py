"""VAR's multi-scale residual VQ-VAE, state-dict compatible with ``vae_ch160v4096z32.pth`` (FoundationVision/VAR).

Parameter and buffer names follow the authors' ``models/vqvae.py``, ``quant.py`` and ``basic_vae.py`` (which follow
taming-transformers / latent-diffusion): ``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``,
``quantize.embedding``, ``quantize.quant_resi.qresi_ls.{k}`` (the partially shared phi convolutions) and the
``quantize.ema_vocab_hit_SV`` buffer. ``ch_mult``, ``num_res_blocks`` and ``using_sa`` are options so a small toy
can share the code; their defaults are the released checkpoint's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, c), num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 ``qkv`` convolution (the authors' layout)."""

    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(c: int, attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c) if attn else nn.Identity(), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], z_channels: int, num_res_blocks: int = 2,
                 using_sa: bool = True, using_mid_sa: bool = True, in_channels: int = 3):
        super().__init__()
        self.nres, self.nblocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i in range(self.nres):
            cin, cout = ch * in_mult[i], ch * ch_mult[i]
            down = nn.Module()
            down.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks)])
            last = i == self.nres - 1
            down.attn = nn.ModuleList([AttnBlock(cout) for _ in range(num_res_blocks)] if last and using_sa else [])
            if not last:
                down.downsample = Downsample2x(cout)
            self.down.append(down)
        c = ch * ch_mult[-1]
        self.mid = _mid(c, using_mid_sa)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j in range(self.nblocks):
                h = down.block[j](h)
                if len(down.attn):
                    h = down.attn[j](h)
            if i != self.nres - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], z_channels: int, num_res_blocks: int = 2,
                 using_sa: bool = True, using_mid_sa: bool = True, out_channels: int = 3):
        super().__init__()
        self.nres, self.nblocks = len(ch_mult), num_res_blocks
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = _mid(c, using_mid_sa)
        ups: list[nn.Module] = []
        for i in reversed(range(self.nres)):
            cout = ch * ch_mult[i]
            up = nn.Module()
            up.block = nn.ModuleList([ResnetBlock(c if j == 0 else cout, cout) for j in range(num_res_blocks + 1)])
            c = cout
            up.attn = nn.ModuleList([AttnBlock(cout) for _ in range(num_res_blocks + 1)]
                                    if i == self.nres - 1 and using_sa else [])
            if i != 0:
                up.upsample = Upsample2x(cout)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.nres)):
            up = self.up[i]
            for j in range(self.nblocks + 1):
                h = up.block[j](h)
                if len(up.attn):
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual convolution applied to each scale's upsampled codes."""

    def __init__(self, c: int, resi_ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class PhiPartiallyShared(nn.Module):
    """K phi convolutions shared over the scales: scale ``si`` of S uses the one whose tick is nearest si/(S-1)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        K = len(qresi_ls)
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def __getitem__(self, at: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class MultiScaleQuantizer(nn.Module):
    """The residual multi-scale quantizer (the authors' ``VectorQuantizer2``, Euclidean nearest code, no z-norm)."""

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], quant_resi: float = 0.5,
                 share_quant_resi: int = 4, beta: float = 0.25):
        super().__init__()
        self.vocab_size, self.Cvae, self.v_patch_nums, self.beta = vocab_size, Cvae, tuple(patch_nums), beta
        self.quant_resi = PhiPartiallyShared(nn.ModuleList([Phi(Cvae, quant_resi) for _ in range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def phi(self, si: int) -> Phi:
        return self.quant_resi[si / (len(self.v_patch_nums) - 1)]

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        w = self.embedding.weight
        d = z_NC.square().sum(1, keepdim=True) + w.square().sum(1) - 2 * z_NC @ w.T
        return d.argmin(1)

    def _scale_codes(self, f_rest: torch.Tensor, si: int) -> torch.Tensor:
        B, C, H, W = f_rest.shape
        pn = self.v_patch_nums[si]
        z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != len(self.v_patch_nums) - 1 else f_rest
        return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)

    def upsampled(self, idx_Bl: torch.Tensor, si: int, hw: int) -> torch.Tensor:
        """phi_si(upsample(embedding(idx))): scale si's contribution to f_hat at the final resolution."""
        B, pn = idx_Bl.shape[0], self.v_patch_nums[si]
        h = self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
        if si != len(self.v_patch_nums) - 1:
            h = F.interpolate(h, size=(hw, hw), mode="bicubic")
        return self.phi(si)(h)

    def f_to_idxBl(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Encode features (B, Cvae, H, W) into the per-scale code indices [(B, pn^2)] (small to large)."""
        f_rest, out = f.detach().clone(), []
        for si in range(len(self.v_patch_nums)):
            idx = self._scale_codes(f_rest, si)
            f_rest = f_rest - self.upsampled(idx, si, f.shape[-1])
            out.append(idx)
        return out

    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor], hw: int) -> torch.Tensor:
        return sum(self.upsampled(idx, si, hw) for si, idx in enumerate(ms_idx_Bl))  # type: ignore[return-value]

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: straight-through f_hat and the VQ loss averaged over scales (the authors' rule)."""
        f_nograd = f.detach()
        f_rest, f_hat, loss = f_nograd.clone(), torch.zeros_like(f_nograd), f.new_zeros(())
        for si in range(len(self.v_patch_nums)):
            idx = self._scale_codes(f_rest, si)
            h = self.upsampled(idx, si, f.shape[-1])
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f_nograd)
        return (f_hat.detach() - f_nograd) + f, loss / len(self.v_patch_nums)  # straight-through to the encoder

    def next_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: add scale si's codes (B, Cvae, pn, pn) to f_hat; return it and the next scale's input map."""
        S, hw = len(self.v_patch_nums), f_hat.shape[-1]
        if si != S - 1:
            f_hat = f_hat + self.phi(si)(F.interpolate(h_BChw, size=(hw, hw), mode="bicubic"))
            nxt = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")
        f_hat = f_hat + self.phi(si)(h_BChw)
        return f_hat, f_hat

    def teacher_inputs(self, ms_idx_Bl: Sequence[torch.Tensor], hw: int) -> torch.Tensor:
        """VAR training input: for each scale after the first, f_hat so far area-downsampled to it (B, L-1, Cvae)."""
        f_hat, out = None, []
        for si in range(len(self.v_patch_nums) - 1):
            h = self.upsampled(ms_idx_Bl[si], si, hw)
            f_hat = h if f_hat is None else f_hat + h
            nxt = self.v_patch_nums[si + 1]
            out.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(out, 1)


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder. Images are in [-1, 1]."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), using_sa: bool = True, share_quant_resi: int = 4,
                 quant_resi: float = 0.5, patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 num_res_blocks: int = 2):
        super().__init__()
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.patch_nums = tuple(patch_nums)
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=list(ch_mult),
                           using_sa=using_sa, share_quant_resi=share_quant_resi, quant_resi=quant_resi,
                           patch_nums=list(patch_nums), num_res_blocks=num_res_blocks)
        self.encoder = Encoder(ch, ch_mult, z_channels, num_res_blocks, using_sa=using_sa, using_mid_sa=using_sa)
        self.decoder = Decoder(ch, ch_mult, z_channels, num_res_blocks, using_sa=using_sa, using_mid_sa=using_sa)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: reconstruction and VQ loss."""
        f_hat, vq_loss = self.quantize(self.quant_conv(self.encoder(img)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl(self.quant_conv(self.encoder(img)))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(ms_idx_Bl, self.patch_nums[-1]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """As the authors do: a hit-count buffer of another length (training stats only) is not an error."""
        sd = dict(state_dict)
        hit = sd.get("quantize.ema_vocab_hit_SV")
        if hit is not None and hit.shape != self.quantize.ema_vocab_hit_SV.shape:  # zeros: also on a meta build
            sd["quantize.ema_vocab_hit_SV"] = torch.zeros(self.quantize.ema_vocab_hit_SV.shape, dtype=hit.dtype)
        return super().load_state_dict(sd, strict=strict, assign=assign)
