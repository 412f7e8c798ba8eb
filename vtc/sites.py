"""The data that crosses the boundary between adapters and methods (no transformers, no method logic)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ScoreKind = Literal["cls_prob", "cls_logit", "keys", "received"]
QueryKind = Literal["last", "all"]


@dataclass(frozen=True)
class ScoreRequest:
    """Scores a method needs from the vision tower.

    kind: ``cls_prob`` = head-mean post-softmax attention of the CLS query over the feature tokens (N,);
    ``cls_logit`` = head-mean pre-softmax logits of the same row (N,); ``keys`` = the layer's key vectors,
    all heads concatenated (N, D); ``received`` = head-mean attention each token receives from all tokens
    of its image (N,), averaged over each spatial-merge unit where the tower merges patches. layers: 0-based
    encoder layer indices; -1 means the last layer.
    """

    kind: ScoreKind
    layers: tuple[int, ...]


@dataclass(frozen=True)
class VisionInfo:
    """What a method may know about the vision side of a model, filled in by the adapter."""

    num_layers: int  # encoder layers in the vision tower
    feature_layer: int  # 0-based index of the encoder layer whose output feeds the projector
    has_cls: bool  # the tower has a CLS token whose attention row can be scored
    grid: tuple[int, int] | None  # (rows, cols) of the patch grid of one image, if it is a grid
    llm_layers: int = 0  # decoder layers of the language model
    score_layer: int | None = None  # last layer with global attention (None: feature_layer)
    llm_type: str = ""  # the LM config's model_type ("llama", "qwen2", ...)
    multi_view: bool = False  # images arrive as AnyRes views (thumbnail + crops) with a ViewLayout
    mrope: bool = False  # the LM places visual tokens on a 2-D (M-RoPE) grid per frame (Qwen-VL)


@dataclass(frozen=True)
class ViewLayout:
    """Where each token of one AnyRes image's packed sequence comes from (thumbnail, crops, separators).

    view: (N,) 0 = the base view (thumbnail), j >= 1 = crop j (row-major over the crop grid), -1 = a
    separator token (LLaVA-NeXT's ``image_newline``); row, col: (N,) the token's cell, in the base grid for
    view 0 and in the full (padded) crop canvas of ``crop_grid`` x ``crop_tokens`` cells for crops (-1 for
    separators). Packed order is raster order of each view; unpadding may have removed canvas rows/columns.
    """

    view: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    base_grid: tuple[int, int]  # (rows, cols) of the thumbnail's tokens
    crop_grid: tuple[int, int]  # (rows, cols) of crops; (0, 0) for a single-view image
    crop_tokens: tuple[int, int]  # (rows, cols) of tokens in one crop
    kind: str = "anyres"  # "anyres": view 0 is the thumbnail; "frames": view t is video frame t (no thumbnail)

    def views(self) -> list[int]:
        """The view ids present, ascending (separators excluded)."""
        return sorted(int(v) for v in self.view.unique() if v >= 0)

    def view_grid(self, v: int) -> tuple[int, int] | None:
        """(rows, cols) of view ``v``'s tokens when they form a full rectangle (after unpadding), else None."""
        m = self.view == v
        rows, cols = self.row[m].unique().numel(), self.col[m].unique().numel()
        return (rows, cols) if rows * cols == int(m.sum()) else None


@dataclass
class VisualInput:
    """One image's tokens at the ``vision`` site."""

    features: torch.Tensor  # (N, D) pre-projector features
    budget: int  # tokens to keep (already resolved from ratio / tokens)
    grid: tuple[int, int] | None = None  # (rows, cols) with rows * cols == N, when the tokens form a grid
    scores: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (kind, layer) -> (N,)
    layout: ViewLayout | None = None  # AnyRes images: where each token comes from (budget is then advisory)


@dataclass
class Selection:
    """Result at the ``vision`` site: which placeholder slots survive, and optionally their new features.

    index: (k,) ascending slot indices into the image's N placeholders; the kept tokens take these slots'
    positions. features: (k, D) replacement features (pooling, merging) or None to keep the originals.
    """

    index: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class LLMLayerInput:
    """What a method sees at the ``llm_layer`` site, after decoder layer ``layer`` during prefill.

    q: (B, H, Q, d) post-RoPE queries of the requested rows (Q = 1 for "last", L for "all");
    k: (B, Hk, L, d) post-RoPE keys of the current (possibly already pruned) sequence;
    allowed: (B, Q, L) bool, True where a query may attend (causal and not padding);
    visual: (B, L) bool, visual tokens still present; valid: (B, L) bool, non-padding slots;
    visual_input: (B,) visual tokens each row had at the LLM input (the base of schedules);
    dropped: (B, L) bool, tokens an earlier layer dropped that are still present as queries only (methods whose
    ``llm_keeps_dropped_queries()`` is True; they are masked as keys in ``allowed``), else None.
    """

    layer: int
    num_layers: int
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    allowed: torch.Tensor
    visual: torch.Tensor
    valid: torch.Tensor
    visual_input: torch.Tensor
    dropped: torch.Tensor | None = None


@dataclass(frozen=True)
class KVPolicy:
    """How a method wants the KV cache stored (``attention`` site methods): ``mode`` "mixed" = important tokens at
    ``bits_high``, the rest at ``bits_low``; "evict" = important tokens only (at ``bits_high``); "full" = every
    token at full precision. Bits 16 = the model's own dtype (no quantization). New decode tokens stay at full
    precision until ``stream_gap`` of them are buffered, then they are stored by the same rule."""

    mode: str = "mixed"
    bits_high: int = 4
    bits_low: int = 2
    stream_gap: int = 100


@dataclass
class AttentionInput:
    """What a method sees at the ``attention`` site: one decoder layer's attention inputs, before attention runs.

    q: (B, H, Q, d) post-RoPE queries of this forward pass; k: (B, Hk, S, d) post-RoPE keys it attends to.
    valid: (B, S) keys that exist (not padding); candidates: (B, S) the tokens the decision is about (prefill:
    every valid token; decode: the buffered new tokens); always: (B, S) tokens that must be important (the text
    prompt, the last token); query_pos: (B, Q) the key index of each query (causal: a query sees keys <= its own).
    phase: "prefill" (Q == S, causal) or "decode" (a few new queries after the cache).
    """

    layer: int
    num_layers: int
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    valid: torch.Tensor
    candidates: torch.Tensor
    always: torch.Tensor
    query_pos: torch.Tensor
    phase: str = "prefill"


@dataclass(frozen=True)
class GenerationInfo:
    """What a method may know about a scale-wise image generator (VAR), filled in by its adapter; the ``generation_kv``
    site's counterpart of :class:`VisionInfo` (``has_cls`` is False: methods that need a vision tower refuse it)."""

    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    scale_sizes: tuple[int, ...]  # tokens of each scale, in generation order (VAR: pn * pn)
    model_id: str = ""  # the model's shape, e.g. "var-d16-pn1_2_3_4_5_6_8_10_13_16" (calibration files check it)
    has_cls: bool = False


@dataclass
class GenerationKVInput:
    """What a method sees at the ``generation_kv`` site: one layer's cache for one group of heads, right after the
    current scale's keys were appended and before that scale's attention runs.

    heads: (Hg,) head indices of the group; q: (R, Hg, l, d) the current scale's queries (R = rows: both CFG halves);
    k, v: (R, Hg, T, d) what the group holds, current scale included; pos: (R, Hg, T) sequence position of each key;
    key_scale: (R, Hg, T) the scale each key came from; scale_index: the current scale; scale_sizes: tokens per
    scale; attn_scale: the softmax scale of q @ k^T; cfg_rows: rows per CFG half (R // 2 with guidance, else R);
    layer_groups: every group of this layer as (heads, keys held) once the current scale is appended, before any
    group of the layer is reduced at this scale.
    """

    layer: int
    num_layers: int
    heads: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    key_scale: torch.Tensor
    scale_index: int
    scale_sizes: tuple[int, ...]
    attn_scale: float
    cfg_rows: int
    layer_groups: tuple[tuple[torch.Tensor, int], ...] = ()

    @property
    def final(self) -> bool:
        return self.scale_index == len(self.scale_sizes) - 1

    @property
    def full_length(self) -> int:
        """Keys an uncompressed cache would hold now (every scale so far, the current one included)."""
        return sum(self.scale_sizes[: self.scale_index + 1])


@dataclass
class KVSelection:
    """Result at the ``generation_kv`` site: index (R, Hg, K) ascending positions into the group's T keys to keep
    (the same K for every row and head of the group); k / v: optional (R, Hg, K, d) replacements (soft merging)."""

    index: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
