"""A transformers ``Cache`` whose layers hold each token at one of two precisions, or not at all (ZipVL).

Each layer keeps, per batch row, a list of *segments* (the prompt, then every ``stream_gap`` decode tokens), and a
full-precision *buffer* of the newest tokens shared by all rows. A segment holds its important tokens at
``bits_high`` and the others at ``bits_low`` (or drops them: ``evict``), bit-packed by :mod:`vtc.core.quant`,
plus one uint8 code per token (0 = not held, 1 = low, 2 = high). Nothing else is kept: the keys / values the
attention needs are dequantized on each call and dropped after it. Bits 16 store the model's own dtype.

The cache reports its *logical* length (every token the model has seen, held or not), so generate()'s positions
and masks stay those of an uncompressed cache. The attention that reads it must map mask columns to the held
tokens: :attr:`MixedPrecisionLayer.positions` gives each returned key's logical position (-1 = row padding).
Padding tokens of a left-padded batch are never held, and statistics are taken per row, so a row's cache does
not depend on the other rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..core.quant import Quantized, quantize_keys, quantize_values
from ..sites import KVPolicy

NOT_HELD, LOW, HIGH = 0, 1, 2


def _nbytes(x: Quantized | torch.Tensor) -> int:
    return x.nbytes if isinstance(x, Quantized) else x.numel() * x.element_size()


@dataclass
class _Stored:
    """Keys and values (1, Hk, n, D) of some tokens of one row, quantized or at full precision."""

    keys: Quantized | torch.Tensor
    values: Quantized | torch.Tensor

    @classmethod
    def make(cls, k: torch.Tensor, v: torch.Tensor, bits: int) -> "_Stored":
        if bits >= 16:
            return cls(k.clone(), v.clone())
        return cls(quantize_keys(k, bits), quantize_values(v, bits))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.keys.dequantize() if isinstance(self.keys, Quantized) else self.keys
        v = self.values.dequantize() if isinstance(self.values, Quantized) else self.values
        return k, v

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


@dataclass
class _Segment:
    """Logical positions ``start .. start + len(code) - 1`` of one row."""

    start: int
    code: torch.Tensor  # (n,) uint8: NOT_HELD / LOW / HIGH
    high: _Stored | None
    low: _Stored | None

    def held(self) -> torch.Tensor:
        return self.code != NOT_HELD

    def positions(self) -> torch.Tensor:
        return self.start + self.held().nonzero()[:, 0]

    def dequantize(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (Hk, n_held, D) in position order."""
        held = self.held()
        n = int(held.sum())
        k = like.new_empty(like.shape[1], n, like.shape[3])
        v = torch.empty_like(k)
        rank = held.cumsum(0) - 1
        for part, code in ((self.high, HIGH), (self.low, LOW)):
            if part is not None:
                pk, pv = part.dequantize()
                slots = rank[self.code == code]
                k[:, slots], v[:, slots] = pk[0].to(k.dtype), pv[0].to(v.dtype)
        return k, v

    @property
    def nbytes(self) -> int:
        return self.code.numel() * self.code.element_size() + sum(p.nbytes for p in (self.high, self.low) if p)


class MixedPrecisionLayer(CacheLayerMixin):
    """One decoder layer's cache: per-row quantized segments plus a shared full-precision buffer."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: KVPolicy):
        super().__init__()
        self.policy = policy
        self.rows: list[list[_Segment]] = []
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, Hk, nb, D) each
        self.length = 0  # logical tokens seen
        #: (B, S) logical position of each key the last update returned (-1: padding of a shorter row)
        self.positions: torch.Tensor | None = None
        self.committed = 0  # tokens moved from the buffer into segments (all rows), for tests and stats

    # ----- transformers' layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.kv_heads, self.head_dim = key_states.shape[1], key_states.shape[3]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.buffer is None:
            self.buffer = (key_states, value_states)
        else:
            self.buffer = (torch.cat([self.buffer[0], key_states], -2), torch.cat([self.buffer[1], value_states], -2))
        if not self.rows:
            self.rows = [[] for _ in range(key_states.shape[0])]
        self.length += key_states.shape[-2]
        return self._materialize()

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.length + q, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.rows, self.buffer, self.length, self.positions, self.committed = [], None, 0, None, 0

    def offload(self):  # the packed tensors stay where they are
        return None

    def prefetch(self):
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length == 0:
            return
        idx = torch.as_tensor(indices, device=self.device).flatten()
        if idx.dtype == torch.bool:
            idx = idx.nonzero()[:, 0]
        self.rows = [self.rows[int(i)] for i in idx.tolist()]  # segments are immutable: rows may share them
        if self.buffer is not None:
            self.buffer = (self.buffer[0].index_select(0, idx), self.buffer[1].index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length == 0:
            return
        n = len(self.rows)
        self.batch_select_indices(torch.arange(n, device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count (tokens to remove from the end)")
        n = -tokens_to_remove
        buffered = 0 if self.buffer is None else self.buffer[0].shape[-2]
        if n == 0:
            return
        if n > buffered:
            raise NotImplementedError(f"vtc: cannot crop {n} tokens from a mixed-precision cache: only the {buffered} "
                                      "newest (full-precision) tokens can be removed")
        self.buffer = (self.buffer[0][..., :-n, :], self.buffer[1][..., :-n, :])
        self.length -= n

    # ----- what the attention of a compressing method calls
    def take_positions(self) -> torch.Tensor:
        """The logical positions of the keys the last :meth:`update` returned, (B, S), -1 for row padding; the
        layer forgets them (nothing but the packed tokens and the buffer stays held between calls)."""
        pos, self.positions = self.positions, None
        return pos

    @property
    def buffered(self) -> int:
        """Full-precision tokens waiting to be stored (the whole prompt until the prefill commits)."""
        return 0 if self.buffer is None else self.buffer[0].shape[-2]

    def commit(self, important: torch.Tensor, valid: torch.Tensor) -> None:
        """Store the buffer: ``important`` (B, nb) tokens at ``bits_high``, other ``valid`` ones at ``bits_low``
        (or dropped: ``evict``); tokens not ``valid`` (padding) are not held."""
        if self.buffer is None:
            return
        k, v = self.buffer
        start = self.length - k.shape[-2]
        pol = self.policy
        for b in range(k.shape[0]):
            hi = important[b] & valid[b]
            lo = valid[b] & ~hi if pol.mode == "mixed" else torch.zeros_like(hi)
            code = hi.to(torch.uint8) * HIGH + lo.to(torch.uint8) * LOW
            parts = []
            for mask, bits in ((hi, pol.bits_high), (lo, pol.bits_low)):
                idx = mask.nonzero()[:, 0]
                parts.append(_Stored.make(k[b:b + 1, :, idx], v[b:b + 1, :, idx], bits) if idx.numel() else None)
            self.rows[b].append(_Segment(start, code, parts[0], parts[1]))
        self.committed += k.shape[-2]
        self.buffer = self.positions = None

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        bk, bv = self.buffer if self.buffer is not None else (None, None)
        b = len(self.rows)
        nb = 0 if bk is None else bk.shape[-2]
        tail = torch.arange(self.length - nb, self.length, device=self.device)
        if not any(self.rows):
            self.positions = tail.expand(b, nb)
            return bk, bv
        like = bk if bk is not None else torch.empty(1, self.kv_heads, 0, self.head_dim, dtype=self.dtype,
                                                     device=self.device)
        per_row = []
        for segs in self.rows:
            kv = [s.dequantize(like) for s in segs]
            pos = torch.cat([s.positions() for s in segs]) if segs else tail[:0]
            per_row.append((torch.cat([x[0] for x in kv], 1), torch.cat([x[1] for x in kv], 1), pos))
        width = max(p.numel() for _, _, p in per_row)
        keys = like.new_zeros(b, self.kv_heads, width + nb, self.head_dim)
        values = torch.zeros_like(keys)
        positions = torch.full((b, width + nb), -1, dtype=torch.long, device=self.device)
        for i, (k, v, pos) in enumerate(per_row):
            n = pos.numel()
            keys[i, :, width - n: width], values[i, :, width - n: width] = k, v  # left-padded, like the batch
            positions[i, width - n: width] = pos
        if nb:
            keys[:, :, width:], values[:, :, width:] = bk, bv
            positions[:, width:] = tail
        self.positions = positions
        return keys, values

    # ----- sizes
    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds: packed values, their statistics, codes and the buffer."""
        held = sum(s.nbytes for segs in self.rows for s in segs)
        if self.buffer is not None:
            held += sum(t.numel() * t.element_size() for t in self.buffer)
        return held

    def dense_nbytes(self, bytes_per_value: int = 2) -> int:
        """Bytes a plain cache holding every logical token of every row would take (fp16 by default)."""
        if not self.is_initialized:
            return 0
        return 2 * len(self.rows) * self.kv_heads * self.length * self.head_dim * bytes_per_value


class MixedPrecisionCache(Cache):
    """One :class:`MixedPrecisionLayer` per decoder layer."""

    def __init__(self, num_layers: int, policy: KVPolicy):
        super().__init__(layers=[MixedPrecisionLayer(policy) for _ in range(num_layers)])
        self.policy = policy

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def dense_nbytes(self, bytes_per_value: int = 2) -> int:
        return sum(layer.dense_nbytes(bytes_per_value) for layer in self.layers)
