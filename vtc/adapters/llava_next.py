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
from ..hook_owner import WrappedMethod
from .base import register_adapter
from .hf import llava_next_helpers
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
        self._set_instance_attr(self.base, "get_image_features", self._wrap_compressing(
            original, self._compress_image_call, "image"))
        self._hook(self.base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
        self._install_llm(self.base.language_model, runtime)

    def _capture_features(self, module: nn.Module, args: tuple):
        if self.scratch.active:
            self.scratch.features = args[0]  # (all crops, N, D) pre-projector
        return None

    def _wrap_compressing(self, original, compress, modality: str) -> WrappedMethod:
        """``original`` (the model's get_image/video_features) run with the vision hooks armed; its
        ``pooler_output`` replaced by ``compress(features, bound_arguments) -> (new features, keeps)``."""
        return WrappedMethod(functools.partial(self._compressing_call, compress, modality), original)

    def _compressing_call(self, compress, modality: str, original, *args, **kwargs):
        with self.lock:
            out = self._encode(original, args, kwargs)
            feats = getattr(out, "pooler_output", None)
            if feats is None or self.scratch.features is None:
                return out
            bound = inspect.signature(original).bind(*args, **kwargs).arguments
            with self.rt.timed():
                new, keeps = compress(feats, bound)
            out.pooler_output = new
            self._remember_keeps(new, keeps, modality)
            return out

    def _compress_image_call(self, feats, bound: dict[str, Any]):
        return self._compress_packed(list(feats), bound)

    # ------------------------------------------------------------------ packing
    def _crops_per_image(self, bound: dict[str, Any]) -> list[int]:
        image_size_to_num_patches = llava_next_helpers()[0]
        cfg = self.base.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) for s in bound["image_sizes"]]

    def _pack_options(self, bound: dict[str, Any]) -> dict[str, Any]:
        """The family's own options of ``pack_image_features``, from this call's arguments."""
        return {"vision_feature_select_strategy": bound.get("vision_feature_select_strategy") or self.strategy}

    def _packer(self, bound: dict[str, Any], size: torch.Tensor):
        """``pack(t, fill)``: a (crops, N, C) per-crop map through the model's own packing; separators = fill."""
        options = self._pack_options(bound)

        def pack(t: torch.Tensor, fill: float) -> torch.Tensor:
            newline = torch.full((t.shape[-1],), fill, dtype=t.dtype, device=t.device)
            return self.base.pack_image_features([t], size, image_newline=newline, **options)[0][0]

        return pack

    def _layout(self, n_crops: int, size: torch.Tensor, pack) -> ViewLayout:
        """Push (is-thumbnail, row, col) maps through ``pack``; the crop of each packed token follows from its
        canvas cell (rounded where the model resized the canvas), separators come out as -1."""
        get_anyres_image_grid_shape = llava_next_helpers()[1]
        cfg = self.base.config
        h, w = self.grid
        nph, npw = get_anyres_image_grid_shape(size[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size) \
            if n_crops > 1 else (0, 0)
        device = self.base.image_newline.device
        r = torch.arange(h * w, device=device) // w
        c = torch.arange(h * w, device=device) % w
        maps = []
        for v in range(n_crops):
            pi, pj = divmod(v - 1, max(npw, 1)) if v else (0, 0)
            maps.append(torch.stack([torch.full_like(r, int(v == 0)), pi * h + r, pj * w + c], -1))
        packed = pack(torch.stack(maps).float(), -1.0).round().long()
        flag, row, col = packed.unbind(-1)
        view = torch.where(flag == 1, 0, 1 + (row // h) * max(npw, 1) + col // w)
        view = torch.where(flag < 0, -1, view)
        return ViewLayout(view, row, col, base_grid=(h, w), crop_grid=(nph, npw), crop_tokens=(h, w))

    def _compress_packed(self, feats: list[torch.Tensor], bound: dict[str, Any]):
        x = self.scratch.features
        counts = self._crops_per_image(bound)
        out_feats, keeps, layouts = [], [], []
        start = 0
        for i, f in enumerate(feats):
            crops = slice(start, start + counts[i])
            start += counts[i]
            pack = self._packer(bound, bound["image_sizes"][i:i + 1])
            lay = self._layout(counts[i], bound["image_sizes"][i:i + 1], pack)
            if lay.view.numel() != f.shape[0]:
                raise RuntimeError(f"vtc: packed layout has {lay.view.numel()} tokens, the model packed {f.shape[0]}")
            scores = {key: pack(s[crops], 0.0) if s.dim() == 3 else pack(s[crops, :, None], 0.0)[:, 0]
                      for key, s in self.scratch.scores.items()}
            sel = self.rt.compress_views(pack(x[crops], 0.0), lay, scores)
            f = self._apply(f, sel, lay.view < 0, project=True)
            keep = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
            keep[sel.index] = True
            out_feats.append(f)
            keeps.append(keep)
            layouts.append(lay)
        self.rt.last_layouts = layouts
        return out_feats, keeps

    def _apply(self, f: torch.Tensor, sel, separator: torch.Tensor, project: bool) -> torch.Tensor:
        """Write a selection's replacement features (through the projector if they are pre-projector) into
        the kept slots of ``f``; separators keep the model's own embedding."""
        if sel.features is None:
            return f
        visual = ~separator[sel.index]
        new = sel.features[visual]
        if project:
            new = self.base.multi_modal_projector(new.to(self.scratch.features.dtype))
        f = f.clone()
        f[sel.index[visual]] = new.to(f.dtype)
        return f


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP tower (no CLS: ``received`` scores), AnyRes images packed like NeXT (bilinearly
    shrunk beyond ``anyres_max_9``), and videos: per-frame tower -> projector -> 2x2 bilinear pooling -> one
    newline per video. Video frames are views of a ``frames`` layout: scores and the projected features go
    through the model's own ``apply_pooling``, so each pooled token has its own score; every method works per
    frame (per-frame budgets) and the trailing newline is always kept."""

    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    family = "llava-onevision"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.placeholders = {"image": self.image_token_id, "video": self.base.config.video_token_id}

    def install(self, runtime: Runtime) -> None:
        super().install(runtime)
        original = self.base.get_video_features
        self._set_instance_attr(self.base, "get_video_features", self._wrap_compressing(
            original, self._compress_video_call, "video"))

    def _pack_options(self, bound: dict[str, Any]) -> dict[str, Any]:
        default = getattr(self.base.config, "vision_aspect_ratio", "anyres_max_9")
        return {"vision_aspect_ratio": bound.get("vision_aspect_ratio") or default}

    def _crops_per_image(self, bound: dict[str, Any]) -> list[int]:
        counts = super()._crops_per_image(bound)
        per_sample = bound.get("batch_num_images")
        if per_sample is None:
            return counts
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [c if s else 1 for c, s in zip(counts, single)]

    # ------------------------------------------------------------------ video
    def _compress_video_call(self, feats: torch.Tensor, bound: dict[str, Any]):
        return self._compress_video(feats)

    def _compress_video(self, feats: torch.Tensor):
        b, n, d = feats.shape
        frames = self.scratch.features.shape[0] // b
        pool = self.base.apply_pooling
        pooled_scores = {key: pool(s if s.dim() == 3 else s[..., None]) for key, s in self.scratch.scores.items()}
        per_frame = (n - 1) // frames
        h, w = self.grid
        ph, pw = -(-h // 2), -(-w // 2)
        r = torch.arange(per_frame, device=feats.device)
        view = torch.cat([torch.arange(frames, device=feats.device).repeat_interleave(per_frame),
                          torch.tensor([-1], device=feats.device)])
        row = torch.cat([(r // pw).repeat(frames), torch.tensor([-1], device=feats.device)])
        col = torch.cat([(r % pw).repeat(frames), torch.tensor([-1], device=feats.device)])
        lay = ViewLayout(view, row, col, base_grid=(ph, pw), crop_grid=(0, 0), crop_tokens=(ph, pw), kind="frames")
        out, keeps = [], []
        for i in range(b):
            rows = slice(i * frames, (i + 1) * frames)
            scores = {}
            for key, s in pooled_scores.items():
                flat = s[rows].reshape(frames * per_frame, -1)
                flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
                scores[key] = flat if self.scratch.scores[key].dim() == 3 else flat[:, 0]
            sel = self.rt.compress_views(feats[i], lay, scores)
            keep = torch.zeros(n, dtype=torch.bool, device=feats.device)
            keep[sel.index] = True
            out.append(self._apply(feats[i], sel, view < 0, project=False))
            keeps.append(keep)
        self.rt.last_layouts = [lay] * b
        return torch.stack(out), keeps
