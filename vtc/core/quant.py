"""Uniform asymmetric quantization at 2, 4 and 8 bits with real bit-packing into ``uint8`` — the storage of a
mixed-precision KV cache (ZipVL reuses ZipCache's quantizers; ``shared/research/zipvl_hack_var.md`` §1.4).

- :func:`pack_bits` / :func:`unpack_bits`: 4-bit values two per byte (the first half of the last dimension in
  the low nibble, the second half in the high nibble), 2-bit values four per byte in quarters, as ZipCache packs
  them; a last dimension that does not divide is zero-padded and cut again on unpacking.
- :func:`quantize_keys`: channel-wise (min / max per channel over the set's tokens).
- :func:`quantize_values`: channel-separable token-wise (divide by sqrt(max |V|) per channel, then min / max per
  token over all channels; dequantized as (q * step + min) * c).

Statistics are taken per batch row (ZipCache pools them over the batch): a row's quantized cache then does not
depend on the other rows, so a batch still equals its single runs. Torch reference; fused kernels share these
signatures.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels

BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits!r}; allowed: {', '.join(map(str, BITS))}")


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q`` (..., n) integers in [0, 2**bits) -> uint8 (..., ceil(n * bits / 8)): :func:`vtc.kernels.pack_bits`."""
    _check_bits(bits)
    return kernels.pack_bits(q, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n * bits / 8)) -> uint8 (..., n)."""
    _check_bits(bits)
    return kernels.unpack_bits(packed, bits, n)


@dataclass
class Quantized:
    """A packed tensor and what dequantizes it: ``x ~ (q * step + minimum) * channel`` (channel: values only)."""

    packed: torch.Tensor  # uint8
    bits: int
    shape: tuple[int, ...]  # the original (unpacked) shape
    step: torch.Tensor  # broadcastable to shape
    minimum: torch.Tensor  # broadcastable to shape
    channel: torch.Tensor | None = None  # sqrt(max |V|) per channel (values), broadcastable to shape
    dtype: torch.dtype = torch.float16

    def dequantize(self) -> torch.Tensor:
        return kernels.unpack_dequantize(self.packed, self.bits, self.shape[-1], self.step, self.minimum,
                                         self.channel, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this object holds (packed values and their statistics)."""
        held = [self.packed, self.step, self.minimum] + ([self.channel] if self.channel is not None else [])
        return sum(t.numel() * t.element_size() for t in held)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in the tensor's own dtype when it is a 16-bit float (as ZipCache, which works in the
    model's fp16), else in float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _stats(x: torch.Tensor, bits: int, dims: tuple[int, ...],
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, minimum) of asymmetric uniform quantization with min / max over ``dims``, rounded to ``dtype``
    (the quantized values are computed against the statistics that are stored)."""
    lo = x.amin(dim=dims, keepdim=True).to(dtype)
    hi = x.amax(dim=dims, keepdim=True)
    step = ((hi - lo.float()) / (2 ** bits - 1)).to(dtype)
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant set: q = 0 gives back the minimum
    return step, lo


def quantize_keys(k: torch.Tensor, bits: int) -> Quantized:
    """Keys (B, H, n, D): channel-wise, min / max per (row, head, channel) over the n tokens."""
    _check_bits(bits)
    x = k.float()
    step, lo = _stats(x, bits, (2,), stats_dtype(k.dtype))
    return Quantized(kernels.quantize_pack(x, step, lo, None, bits), bits, tuple(k.shape), step, lo, None, k.dtype)


def quantize_values(v: torch.Tensor, bits: int) -> Quantized:
    """Values (B, H, n, D): channel-separable token-wise: c = sqrt(max |V|) per (row, head, channel) over the n
    tokens, then min / max per (row, token) over all H x D channels of V / c."""
    _check_bits(bits)
    x = v.float()
    c = x.abs().amax(dim=2, keepdim=True).sqrt().to(stats_dtype(v.dtype))
    c = torch.where(c > 0, c, torch.ones_like(c))
    step, lo = _stats(x / c.float(), bits, (1, 3), stats_dtype(v.dtype))
    return Quantized(kernels.quantize_pack(x, step, lo, c, bits), bits, tuple(v.shape), step, lo, c, v.dtype)


def max_error(qt: Quantized) -> torch.Tensor:
    """The analytic bound on |x - dequantize(x)|: half a step (times the channel scale for values)."""
    bound = qt.step.float() / 2
    return bound * qt.channel.float() if qt.channel is not None else bound
