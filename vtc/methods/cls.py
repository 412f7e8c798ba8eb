"""VTC-CLS: keep the visual tokens the vision tower's [CLS] query attends to most (arXiv 2412.05819).

As in THU-MIG/VTC-CLS: score = sum over layers ``start_layer .. feature_layer`` of the head-averaged
post-softmax CLS attention row with the CLS->CLS entry removed (not renormalised); keep the top ``k``
and restore raster order. Defaults: ``start_layer=16`` on a 24-layer CLIP ViT-L whose features come from
layer 22 (``--layer 16`` in the authors' scripts), i.e. the 7 layers ending at the feature layer; on other
depths we keep the same 7-layer window, clipped at layer 0.

Towers without a CLS token (Qwen2-VL, SigLIP): ``score="auto"`` falls back to the mean attention each
token receives from all tokens of its image at the last global-attention layer (per merged token on Qwen).

Deviations from the reference: it runs at batch size > 1 (per-image keep sets) and keeps the original
RoPE positions of the kept tokens (the reference renumbers them contiguously); ``position_mode`` is an
adapter concern and is documented in the README.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.scores import combine_layers
from ..core.select import topk_sorted
from .base import Method, ScoreRequest, Selection, VisionInfo, VisualInput

DEFAULT_WINDOW = 7  # layers 16..22 of CLIP ViT-L/14-336


@dataclass
class ClsPruning(Method):
    """Prune by ensembled CLS attention from the vision tower."""

    ratio: float | None = None
    tokens: int | None = None
    start_layer: int | None = None  # None: the 7 layers ending at the feature layer (16 for ViT-L/14)
    ensemble: str = "sum"  # sum (reference), mean, max, min
    score: str = "auto"  # "cls", "received", or auto: cls when the tower has a CLS token, else received

    name = "cls"
    sites = ("vision",)
    batched = True

    def __post_init__(self) -> None:
        if self.ensemble not in ("sum", "mean", "max", "min"):
            raise ValueError(f"ensemble must be one of sum, mean, max, min; got {self.ensemble!r}")
        if self.start_layer is not None and self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0; got {self.start_layer}")
        if self.score not in ("auto", "cls", "received"):
            raise ValueError(f"score must be 'auto', 'cls' or 'received'; got {self.score!r}")
        self._layers: tuple[int, ...] = ()
        self._kind = "cls_prob"

    def setup(self, info: VisionInfo) -> None:
        super().setup(info)
        if self.score == "cls" and not info.has_cls:
            raise ValueError("method 'cls' with score='cls' needs a vision tower with a CLS token; this model has "
                             "none (use score='received' or the default 'auto')")
        if not info.has_cls or self.score == "received":
            # No CLS query (Qwen-VL, SigLIP): the documented equivalent is the attention each token receives
            # from all tokens of its image, at the last global-attention layer.
            self._kind = "received"
            self._layers = (info.score_layer if info.score_layer is not None else info.feature_layer,)
            return
        start = self.start_layer if self.start_layer is not None else max(0, info.feature_layer - DEFAULT_WINDOW + 1)
        if start > info.feature_layer:
            raise ValueError(
                f"start_layer={start} is after the feature layer {info.feature_layer} of this vision tower "
                f"(allowed: 0..{info.feature_layer})"
            )
        self._layers = tuple(range(start, info.feature_layer + 1))

    def score_requests(self) -> list[ScoreRequest]:
        return [ScoreRequest(self._kind, self._layers)]

    def select(self, visual: VisualInput) -> Selection:
        score = combine_layers([visual.scores[(self._kind, l)] for l in self._layers], self.ensemble)
        return Selection(topk_sorted(score, visual.budget))
