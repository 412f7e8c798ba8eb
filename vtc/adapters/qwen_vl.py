"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images and videos): no CLS token, PatchMerger projector, 3-D M-RoPE
positions; Qwen3-VL's deepstack inputs (``visual_pos_masks``, ``deepstack_visual_embeds``) are pruned with the
same keep set at the LM input.

Sites:
- ``vision``: the method acts on the PatchMerger outputs (one token per 2x2 patch unit, LLM width), per image
  and per temporal frame group of a video. ``received`` scores come from the chosen block's own qkv
  projection (any backend), per attention segment (``cu_seqlens``: one per frame), averaged over each
  merge unit; on Qwen2.5 they are taken from a full-attention block and un-permuted from window order.
- ``llm_input`` / ``llm_layer``: the shared LM rewrites; kept tokens keep their original 4xBxL M-RoPE
  positions. After a pruned prefill ``rope_deltas`` is shifted by the removed columns, so a hand-written decode
  loop that passes no ``position_ids`` continues at the same positions as without pruning.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..core.scores import attention_received
from ..runtime import Runtime
from ..sites import VisionInfo
from ..hook_owner import WrappedMethod
from .base import Adapter, register_adapter
from .hf import module_function, qwen_window_index


@dataclass
class _Scratch:
    active: bool = False
    scores: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)


@register_adapter
class QwenVLAdapter(Adapter):
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration", "Qwen2VLModel", "Qwen2_5_VLModel", "Qwen3VLModel")
    family = "qwen2-vl"
    supported_sites = ("vision", "llm_input", "llm_layer", "attention")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.base = model.model if hasattr(model, "lm_head") else model
        self.visual = self.base.visual
        self.blocks = self.visual.blocks
        self.unit = self.visual.spatial_merge_size ** 2
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")
        self.deepstack = len(getattr(self.visual, "deepstack_visual_indexes", None) or [])  # Qwen3-VL
        cfg = self.base.config
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id
        score_layer = len(self.blocks) - 1
        if self.windowed and self.visual.fullatt_block_indexes:
            score_layer = max(self.visual.fullatt_block_indexes)
        self._info = VisionInfo(num_layers=len(self.blocks), feature_layer=len(self.blocks) - 1, has_cls=False,
                                grid=None, llm_layers=len(self.base.language_model.layers),
                                llm_type=getattr(cfg.text_config, "model_type", ""), score_layer=score_layer,
                                mrope=True)
        self._rope = module_function(self.blocks[0].attn, "apply_rotary_pos_emb_vision")

    def vision_info(self) -> VisionInfo:
        return self._info

    # ------------------------------------------------------------------ install
    def install(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.scratch = _Scratch()
        self._cap: dict[int, dict[str, Any]] = {}
        for req in runtime.score_requests():
            if req.kind == "keys":
                continue  # merging methods use the merged features themselves on Qwen
            if req.kind != "received":
                raise ValueError(f"the {self.family} adapter has no {req.kind!r} scores (no CLS token); "
                                 "it offers 'received'")
            for l in req.layers:
                self._install_received(l % len(self.blocks))
        for name, modality in (("get_image_features", "image"), ("get_video_features", "video")):
            original = getattr(self.base, name)
            self._set_instance_attr(self.base, name, self._wrap(original, modality))
        self._hook(self.base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
        self._install_llm(self.base.language_model, runtime)

    def check_layer_plan(self, plan: dict[int, str]) -> None:
        if plan and min(plan) < self.deepstack:
            raise ValueError(f"in-LLM pruning must start after the {self.deepstack} deepstack layer(s) of this "
                             f"Qwen3-VL; the method prunes after layer {min(plan)}")

    def _install_received(self, layer: int) -> None:
        attn = self.blocks[layer].attn
        self._cap[layer] = {}
        self._hook(attn.qkv.register_forward_hook(functools.partial(self._grab_qkv, layer)))
        self._hook(attn.register_forward_pre_hook(functools.partial(self._grab_kwargs, layer), with_kwargs=True))
        self._hook(attn.register_forward_hook(functools.partial(self._compute_received, layer), with_kwargs=True))

    def _grab_qkv(self, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.scratch.active:
            self._cap[layer]["qkv"] = output

    def _grab_kwargs(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.scratch.active:
            self._cap[layer]["cu"] = kwargs.get("cu_seqlens")
            self._cap[layer]["rope"] = kwargs.get("position_embeddings")

    def _compute_received(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                          output: Any) -> None:
        cap = self._cap[layer]
        if not self.scratch.active or "qkv" not in cap:
            return None
        with self.rt.timed():
            qkv = cap.pop("qkv")
            s = qkv.shape[0]
            q, k, _ = qkv.reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = cap["rope"]
            q, k = self._rope(q, k, cos, sin)
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, S, d)
            cu = cap["cu"].tolist()
            per_patch = torch.cat([attention_received(q[:, a:b], k[:, a:b], module.scaling)
                                   for a, b in zip(cu[:-1], cu[1:])])
            merged = per_patch.reshape(-1, self.unit).mean(-1)
            self.scratch.scores.setdefault(("received", layer), []).append(merged)
        return None

    # ------------------------------------------------------------------ vision site
    def _wrap(self, original, modality: str) -> WrappedMethod:
        return WrappedMethod(functools.partial(self._encode_call, modality), original)

    def _encode_call(self, modality: str, original, *args, **kwargs):
        grid_name = "image_grid_thw" if modality == "image" else "video_grid_thw"
        with self.lock:
            grid = inspect.signature(original).bind(*args, **kwargs).arguments.get(grid_name)
            self.scratch = _Scratch(active=True)
            try:
                out = original(*args, **kwargs)
            finally:
                self.scratch.active = False
            feats = getattr(out, "pooler_output", None)
            if feats is None or grid is None:
                return out
            with self.rt.timed():
                new, keeps = self._compress(list(feats), grid)
            out.pooler_output = tuple(new)
            self._remember_keeps(out.pooler_output, keeps, modality)
            return out

    def _scores_in_token_order(self, grid: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        out = {}
        for key, parts in self.scratch.scores.items():
            s = torch.cat(parts)
            if self.windowed:
                window_index = self._window_index(grid)
                s = s[torch.argsort(window_index.to(s.device))]
            out[key] = s
        return out

    def _window_index(self, grid: torch.Tensor) -> torch.Tensor:
        """Qwen2.5's merge-unit permutation into window order (the same helper the tower calls)."""
        v = self.visual
        return qwen_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)

    def _compress(self, feats: list[torch.Tensor], grid: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scores = self._scores_in_token_order(grid)
        new, keeps, offset = [], [], 0
        m = self.visual.spatial_merge_size
        for f, (t, h, w) in zip(feats, grid.tolist()):
            gh, gw = h // m, w // m
            per = gh * gw
            keep = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
            out = torch.zeros_like(f)
            untouched = True
            for g in range(t):  # one budget per temporal frame group
                sl = slice(g * per, (g + 1) * per)
                sc = {key: v[offset + g * per: offset + (g + 1) * per] for key, v in scores.items()}
                sel = self.rt.compress_image(f[sl], (gh, gw), sc)
                idx = sel.index + g * per
                keep[idx] = True
                out[idx] = sel.features.to(f.dtype) if sel.features is not None else f[idx]
                untouched &= sel.features is None and sel.index.numel() == per
            offset += f.shape[0]
            new.append(f if untouched else out)
            keeps.append(keep)
        return new, keeps

    # ------------------------------------------------------------------ base model
    def _base_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self._begin_call(kwargs, {})
            return None
        self._begin_call(kwargs, {"image": input_ids == self.image_token_id, "video": input_ids == self.video_token_id})
        return None

    def _on_prefill_pruned(self, full_len: int, kept_len: int) -> None:
        """Shift ``rope_deltas`` by the columns pruning removed, so a forward call that passes no ``position_ids``
        after this prefill (a hand-written decode loop: the model derives them as cache length + rope_deltas)
        continues at the unpruned positions. generate() passes positions and never reads it. A shift this hook
        made before and that no new prompt has recomputed since is replaced, not added to."""
        deltas = getattr(self.base, "rope_deltas", None)
        if deltas is None:
            return
        last = getattr(self, "_rope_shift", None)
        if last is not None and deltas is last[0]:
            deltas = deltas - last[1]
        shifted = deltas + (full_len - kept_len)
        self.base.rope_deltas = shifted
        self._rope_shift = (shifted, full_len - kept_len)
        self.rt.events["qwen.rope_deltas"] += 1
