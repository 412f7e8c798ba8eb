"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes thumbnail + crops, unpadded, ``image_newline`` rows.

Sites:
- ``vision``: the LLaVA CLS-row hooks run on every crop (the tower sees thumbnail and crops as one batch);
  after the model packs each image (thumbnail, unpadded crop canvas, one newline per canvas row), vtc pushes
  the scores, the pre-projector features and a (view, row, col) index map through the model's own
  ``pack_image_features``, so every signal is aligned 1:1 with the packed tokens. The method sees one
  :class:`~vtc.sites.VisualInput` per image with a :class:`~vtc.sites.ViewLayout`; replacement features
  (pooling, merging) go through the projector. Newline tokens are never dropped.
- ``llm_input`` / ``llm_layer``: as for LLaVA-1.5 (kept tokens keep their original positions).

Every crop is projected (the projector runs before packing, which needs the image size); the saving is in
the language model, where the tokens are.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
import torch.nn as nn

from ..runtime import Runtime
from ..sites import ViewLayout
from .base import register_adapter
from .llava import LlavaAdapter, _VisionScratch


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    family = "llava-next"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._info = dataclasses.replace(self._info, multi_view=True)

    def install(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.scratch = _VisionScratch()
        self._install_scores(runtime)
        self._hook(self.base.multi_modal_projector.register_forward_pre_hook(self._capture_features))
        original = self.base.get_image_features
        self._set_instance_attr(self.base, "get_image_features", self._wrap_packed_features(original))
        self._hook(self.base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
        self._install_llm(self.base.language_model, runtime)

    def _capture_features(self, module: nn.Module, args: tuple):
        if self.scratch.active:
            self.scratch.features = args[0]  # (all crops, N, D) pre-projector
        return None

    def _wrap_packed_features(self, original):
        sig = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            out = self._encode(original, args, kwargs)
            feats = getattr(out, "pooler_output", None)
            if feats is None or self.scratch.features is None:
                return out
            bound = sig.bind(*args, **kwargs).arguments
            strategy = bound.get("vision_feature_select_strategy") or self.strategy
            with self.rt.timed():
                new_feats, keeps = self._compress_packed(list(feats), bound["image_sizes"], strategy)
            out.pooler_output = new_feats
            self.rt.last_keep = [k.detach().cpu() for k in keeps]
            self._remember_keeps(new_feats, keeps)
            return out

        return get_image_features

    # ------------------------------------------------------------------ packing
    def _crops_per_image(self, image_sizes: torch.Tensor) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.base.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) for s in image_sizes]

    def _pack(self, t: torch.Tensor, size: torch.Tensor, strategy: str, fill: float) -> torch.Tensor:
        """Push a (crops, N, C) per-crop map through the model's own packing; separators get ``fill``."""
        newline = torch.full((t.shape[-1],), fill, dtype=t.dtype, device=t.device)
        return self.base.pack_image_features([t], size, strategy, image_newline=newline)[0][0]

    def _layout(self, n_crops: int, size: torch.Tensor, strategy: str, device: torch.device) -> ViewLayout:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.base.config
        h, w = self.grid
        nph, npw = get_anyres_image_grid_shape(size[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size) \
            if n_crops > 1 else (0, 0)
        r = torch.arange(h * w, device=device) // w
        c = torch.arange(h * w, device=device) % w
        maps = []
        for v in range(n_crops):
            pi, pj = divmod(v - 1, max(npw, 1)) if v else (0, 0)
            maps.append(torch.stack([torch.full_like(r, v), pi * h + r, pj * w + c], -1))
        packed = self._pack(torch.stack(maps).float(), size, strategy, fill=-1.0).round().long()
        return ViewLayout(packed[:, 0], packed[:, 1], packed[:, 2], base_grid=(h, w), crop_grid=(nph, npw),
                          crop_tokens=(h, w))

    def _compress_packed(self, feats: list[torch.Tensor], image_sizes: torch.Tensor, strategy: str):
        x = self.scratch.features
        counts = self._crops_per_image(image_sizes)
        out_feats, keeps, layouts = [], [], []
        start = 0
        for i, f in enumerate(feats):
            crops = slice(start, start + counts[i])
            start += counts[i]
            size = image_sizes[i:i + 1]
            lay = self._layout(counts[i], size, strategy, f.device)
            if lay.view.numel() != f.shape[0]:
                raise RuntimeError(f"vtc: packed layout has {lay.view.numel()} tokens, the model packed {f.shape[0]}")
            scores = {}
            for key, s in self.scratch.scores.items():
                p = self._pack(s[crops] if s.dim() == 3 else s[crops, :, None], size, strategy, fill=0.0)
                scores[key] = p if s.dim() == 3 else p[:, 0]
            sel = self.rt.compress_views(self._pack(x[crops], size, strategy, fill=0.0), lay, scores)
            keep = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
            keep[sel.index] = True
            if sel.features is not None:
                visual = lay.view[sel.index] >= 0
                f = f.clone()
                proj = self.base.multi_modal_projector(sel.features[visual].to(x.dtype))
                f[sel.index[visual]] = proj.to(f.dtype)
            out_feats.append(f)
            keeps.append(keep)
            layouts.append(lay)
        self.rt.last_layouts = layouts
        return out_feats, keeps
