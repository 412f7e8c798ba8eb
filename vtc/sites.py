"""The data that crosses the boundary between adapters and methods (no transformers, no method logic)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ScoreKind = Literal["cls_prob", "cls_logit"]


@dataclass(frozen=True)
class ScoreRequest:
    """Scores a method needs from the vision tower.

    kind: ``cls_prob`` = head-mean post-softmax attention of the CLS query over the feature tokens;
    ``cls_logit`` = head-mean pre-softmax logits of the same row. layers: 0-based encoder layer indices.
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


@dataclass
class VisualInput:
    """One image's tokens at the ``vision`` site."""

    features: torch.Tensor  # (N, D) pre-projector features
    budget: int  # tokens to keep (already resolved from ratio / tokens)
    grid: tuple[int, int] | None = None  # (rows, cols) with rows * cols == N, when the tokens form a grid
    scores: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (kind, layer) -> (N,)


@dataclass
class Selection:
    """Result at the ``vision`` site: which placeholder slots survive, and optionally their new features.

    index: (k,) ascending slot indices into the image's N placeholders; the kept tokens take these slots'
    positions. features: (k, D) replacement features (pooling, merging) or None to keep the originals.
    """

    index: torch.Tensor
    features: torch.Tensor | None = None


