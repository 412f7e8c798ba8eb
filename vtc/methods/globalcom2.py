"""GlobalCom²: thumbnail-guided compression of AnyRes crops (arXiv 2501.05179, xuyang-liu16/GlobalCom2).

For one LLaVA-NeXT image (thumbnail + crops + newline tokens), with retention ratio R:

- scores are the head-mean **pre-softmax** CLS logits of the vision tower's **last** layer (the authors'
  code; the paper writes a softmax), s_G for the thumbnail and s_L,j for crop j;
- the thumbnail keeps ``int(R * n_thumb)`` tokens by s_G;
- crop j keeps ``int(N_j * r_j)`` of its N_j (unpadded) tokens, ``r_j = min(R * (1 + sigma_j - mean(sigma)), 1)``,
  sigma = softmax over crops (temperature ``tau`` = 10) of s_G summed over each crop's region of the
  thumbnail grid (no lower clamp, no renormalisation, as in the reference);
- inside crop j the score is ``L2norm(s_L,j) + L2norm(G_j)``, G = s_G bilinearly resized to the unpadded
  crop canvas and cut at crop borders (alpha = 0.5 in the paper).

Newline tokens are always kept and, as in the reference, do not count in the budget; ``count_newlines=True``
lowers R so that kept visual tokens plus newlines are R of all tokens. Deviation (a bug fix): kept tokens
keep their true positions in raster order; the reference keeps the thumbnail in score order and scatters crop
tokens by their index in the valid list, scrambling column-padded (tall) images. ``ratio=1.0`` keeps
everything (the formula would still drop tokens from crops with a below-average share).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.select import topk_sorted
from .base import Method, ScoreRequest, Selection, VisionInfo, VisualInput


def crop_retention(thumb_scores: torch.Tensor, crop_grid: tuple[int, int], ratio: float,
                   tau: float = 10.0) -> torch.Tensor:
    """Per-crop retention ratios r_j (row-major over ``crop_grid``) from the (h, w) thumbnail score map."""
    h, w = thumb_scores.shape
    nph, npw = crop_grid
    ph, pw = max(h // nph, 1), max(w // npw, 1)
    rr = (torch.arange(h, device=thumb_scores.device) // ph).clamp(max=nph - 1)
    cc = (torch.arange(w, device=thumb_scores.device) // pw).clamp(max=npw - 1)
    region = (rr[:, None] * npw + cc[None, :]).flatten()
    s = torch.zeros(nph * npw, dtype=torch.float64, device=thumb_scores.device)
    s.index_add_(0, region, thumb_scores.flatten().double())
    e = torch.exp((s - s.max()) / tau)
    sigma = e / (e.sum() + 1e-8)
    return (ratio * (1 + sigma - sigma.mean())).clamp(max=1.0)


@dataclass
class GlobalCom2(Method):
    """Thumbnail-guided per-crop budgets and scores for AnyRes models (LLaVA-NeXT)."""

    ratio: float | None = None  # R, the retention ratio (the authors' default: 0.25)
    tokens: int | None = None  # alternatively a total visual-token budget (R = tokens / visual tokens)
    tau: float = 10.0
    count_newlines: bool = False

    name = "globalcom2"
    sites = ("vision",)
    requires_cls = True

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0; got {self.tau}")
        self._layer = -1

    def setup(self, info: VisionInfo) -> None:
        super().setup(info)
        if not info.multi_view:
            raise ValueError("method 'globalcom2' compresses AnyRes crops guided by the thumbnail; this model "
                             "has single-view images (use it with LLaVA-NeXT, or use 'cls' here)")
        self._layer = info.num_layers - 1  # the last encoder layer, as the reference (features: layer -2)

    def score_requests(self) -> list[ScoreRequest]:
        return [ScoreRequest("cls_logit", (self._layer,))]

    def select(self, visual: VisualInput) -> Selection:
        raise ValueError("method 'globalcom2' needs an AnyRes image layout (thumbnail + crops)")

    def select_views(self, visual: VisualInput) -> Selection:
        lay = visual.layout
        assert lay is not None
        if lay.kind != "anyres":
            raise ValueError(f"method 'globalcom2' needs an AnyRes image (thumbnail + crops); got {lay.kind!r} views")
        dev = lay.view.device
        score = visual.scores[("cls_logit", self._layer)].float()
        sep = lay.view < 0
        n_vis, n_sep = int((~sep).sum()), int(sep.sum())
        r = self.ratio if self.tokens is None else self.tokens / n_vis
        if self.count_newlines:
            r = max(0.0, (r * (n_vis + n_sep) - n_sep) / n_vis)
        if r >= 1.0:
            return Selection(torch.arange(lay.view.numel(), device=dev))
        keep = [torch.nonzero(sep).flatten()]
        base = torch.nonzero(lay.view == 0).flatten()
        h, w = lay.base_grid
        s_g = score[base]
        keep.append(base[topk_sorted(s_g, max(1, int(base.numel() * r)))])
        crops = [v for v in lay.views() if v > 0]
        if crops:
            s_g = s_g.view(h, w)
            ratios = crop_retention(s_g, lay.crop_grid, r, self.tau)
            is_crop = lay.view > 0
            r0, c0 = int(lay.row[is_crop].min()), int(lay.col[is_crop].min())
            cur_h, cur_w = int(lay.row[is_crop].max()) - r0 + 1, int(lay.col[is_crop].max()) - c0 + 1
            guide = F.interpolate(s_g[None, None], size=(cur_h, cur_w), mode="bilinear", align_corners=False)[0, 0]
            for v in crops:
                slots = torch.nonzero(lay.view == v).flatten()
                k = int(slots.numel() * float(ratios[v - 1]))
                if k <= 0:
                    continue
                local = F.normalize(score[slots], dim=0)
                glob = F.normalize(guide[lay.row[slots] - r0, lay.col[slots] - c0], dim=0)
                keep.append(slots[topk_sorted(local + glob, k)])
        return Selection(torch.cat(keep).sort().values)
