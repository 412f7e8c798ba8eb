"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-style tower -> MLP projector -> Llama-style LM.

Sites:
- ``vision``: hooks on the requested ``CLIPAttention`` layers capture the layer's own q/k projections and
  compute only the CLS query row (any attention backend, no extra projection FLOPs); a pre-hook on the
  projector hands each image's features to the runtime and projects only the kept tokens; a forward hook
  lays them back into the placeholder layout (dropped rows are zero and never reach the LM).
- ``llm_input``: :class:`~vtc.adapters.llm_input.LLMInputPruner` on ``model.model.language_model``.
- ``projector``: a TokenPacker projector (:mod:`vtc.models.tokenpacker`) packs each s x s region of the patch grid
  into one token, so selection runs on its outputs instead: every score is average-pooled over the same regions
  (the packed token's share of the CLS attention, its mean key, ...), and dropped packed rows are zeroed.

Keep sets travel from the vision site to the LM through the identity of the per-image feature tensors in
``pooler_output`` (``generate`` pre-encodes images, then may repeat the same tensor objects for beams).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..core.batch import scatter_rows
from ..core.scores import attention_received, attention_rows, head_mean
from ..runtime import Runtime
from ..sites import VisionInfo
from ..hook_owner import WrappedMethod
from .base import Adapter, register_adapter


@dataclass
class _VisionScratch:
    active: bool = False
    scores: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (kind, layer) -> (B, N)
    layout: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (index (B,k), valid (B,k), N)
    keep: torch.Tensor | None = None  # (B, N) bool
    features: torch.Tensor | None = None  # pre-projector features (multi-view adapters)


def vision_layers(tower: nn.Module) -> nn.ModuleList:
    """Encoder layers of a CLIP/SigLIP-style vision tower (with or without the ``vision_model`` wrapper)."""
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


@register_adapter
class LlavaAdapter(Adapter):
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    family = "llava"
    supported_sites = ("vision", "llm_input", "llm_layer", "attention")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.base = model.model if hasattr(model, "lm_head") else model  # LlavaModel
        cfg = self.base.config
        self.image_token_id = cfg.image_token_id
        self.placeholders = {"image": cfg.image_token_id}  # modality -> placeholder token id
        self.strategy = cfg.vision_feature_select_strategy
        tower = self.base.vision_tower
        self.layers = vision_layers(tower)
        vcfg = tower.config
        n_layers = len(self.layers)
        fl = cfg.vision_feature_layer
        fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
        hidden_index = fl % (n_layers + 1)
        self.grid = (vcfg.image_size // vcfg.patch_size,) * 2
        from ..models.tokenpacker import is_tokenpacker

        proj = self.base.multi_modal_projector
        #: (s, tower grid) when the projector packs regions into tokens (TokenPacker), else None
        self.packing = (proj.scale_factor, self.grid) if is_tokenpacker(proj) else None
        if self.packing is not None:
            self.grid = proj.packed_grid
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        self.has_cls = hasattr(embeddings, "class_embedding")
        self.drop_cls_column = self.has_cls and self.strategy == "default"
        self._info = VisionInfo(
            num_layers=n_layers,
            feature_layer=hidden_index - 1,
            has_cls=self.has_cls,
            grid=self.grid,
            llm_layers=len(self.base.language_model.layers),
            llm_type=getattr(self.base.config.text_config, "model_type", ""),
        )

    def vision_info(self) -> VisionInfo:
        return self._info

    # ------------------------------------------------------------------ install
    def install(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.scratch = _VisionScratch()
        self._install_scores(runtime)
        proj = self.base.multi_modal_projector
        self._hook(proj.register_forward_pre_hook(self._projector_pre))
        self._hook(proj.register_forward_hook(self._projector_post))

        original = self.base.get_image_features  # bound method; wraps() keeps its signature for generate()
        self._set_instance_attr(self.base, "get_image_features", self._wrap_image_features(original))
        self._hook(self.base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
        self._install_llm(self.base.language_model, runtime)

    def _install_scores(self, runtime: Runtime) -> None:
        self._captured: dict[int, dict[str, torch.Tensor]] = {}
        by_layer: dict[int, set[str]] = {}
        for req in runtime.score_requests():
            for l in req.layers:
                l = l % len(self.layers) if l < 0 else l
                if not 0 <= l < len(self.layers):
                    raise ValueError(f"score layer {l} outside the vision tower's layers 0..{len(self.layers) - 1}")
                by_layer.setdefault(l, set()).add(req.kind)
        for l, kinds in by_layer.items():
            self._install_score_hooks(l, sorted(kinds))

    # ------------------------------------------------------------------ vision site
    def _install_score_hooks(self, layer: int, kinds: list[str]) -> None:
        """Capture the layer's own q/k projections (no extra projection FLOPs) and compute the CLS row."""
        attn = self.layers[layer].self_attn
        self._captured[layer] = {}
        self._hook(attn.q_proj.register_forward_hook(functools.partial(self._grab, layer, "q", kinds)))
        self._hook(attn.k_proj.register_forward_hook(functools.partial(self._grab, layer, "k", kinds)))
        self._hook(attn.register_forward_hook(functools.partial(self._compute_scores, layer, kinds), with_kwargs=True))

    def _grab(self, layer: int, name: str, kinds: list[str], module: nn.Module, args: tuple,
              output: torch.Tensor) -> None:
        if self.scratch.active:
            self._captured[layer][name] = output[:, :1] if name == "q" and "received" not in kinds else output

    def _compute_scores(self, layer: int, kinds: list[str], module: nn.Module, args: tuple, kwargs: dict[str, Any],
                        output: Any) -> None:
        captured = self._captured[layer]
        if not self.scratch.active or "q" not in captured or "k" not in captured:
            return None
        with self.rt.timed():
            q, k = captured.pop("q"), captured.pop("k")
            captured_k = k.view(k.shape[0], k.shape[1], module.num_heads, module.head_dim).transpose(1, 2)
            b, s, _ = k.shape
            nh, hd = module.num_heads, module.head_dim
            q = q.view(b, q.shape[1], nh, hd).transpose(1, 2)
            k = k.view(b, s, nh, hd).transpose(1, 2)
            for kind in kinds:
                if kind == "received":
                    rec = torch.stack([attention_received(q[i], k[i], module.scale) for i in range(b)])
                    self.scratch.scores[(kind, layer)] = rec[:, 1:] if self.drop_cls_column else rec
                    continue
                if kind == "keys":
                    keys = captured_k.transpose(1, 2).reshape(b, s, -1)
                    self.scratch.scores[(kind, layer)] = keys[:, 1:] if self.drop_cls_column else keys
                    continue
                row = head_mean(attention_rows(q[:, :, :1], k, module.scale, softmax=(kind == "cls_prob")))[:, 0]
                if self.drop_cls_column:
                    row = row[:, 1:]
                self.scratch.scores[(kind, layer)] = row
        return None

    def _projector_pre(self, module: nn.Module, args: tuple):
        if not self.scratch.active or self.packing is not None:  # a packing projector: select on its outputs
            return None
        with self.rt.timed():
            x = args[0]  # (B, N, D)
            b, n, _ = x.shape
            grid = self.grid if self.grid[0] * self.grid[1] == n else None
            sels = [
                self.rt.compress_image(x[i], grid, {key: v[i] for key, v in self.scratch.scores.items()})
                for i in range(b)
            ]
            keep = torch.zeros(b, n, dtype=torch.bool, device=x.device)
            for i, s in enumerate(sels):
                keep[i, s.index] = True
            self.scratch.keep = keep
            untouched = all(s.features is None for s in sels) and bool(keep.all())
            if untouched:
                self.scratch.layout = None
                return None
            k = max(s.index.numel() for s in sels)
            index = torch.zeros(b, k, dtype=torch.long, device=x.device)
            valid = torch.zeros(b, k, dtype=torch.bool, device=x.device)
            packed = x.new_zeros(b, k, x.shape[-1])
            for i, s in enumerate(sels):
                m = s.index.numel()
                index[i, :m] = s.index
                valid[i, :m] = True
                packed[i, :m] = s.features if s.features is not None else x[i, s.index]
            self.scratch.layout = (index, valid, n)
        return (packed,) + args[1:]

    def _pooled_scores(self) -> dict[tuple[str, int], torch.Tensor]:
        """The tower's per-patch scores averaged over each packed region: (B, g*g[, D]) -> (B, (g/s)^2[, D])."""
        s, (gh, gw) = self.packing
        out = {}
        for key, v in self.scratch.scores.items():
            x = v.reshape(v.shape[0], gh, gw, -1).permute(0, 3, 1, 2).float()
            pooled = torch.nn.functional.avg_pool2d(x, s).flatten(2).transpose(1, 2)  # (B, n', D)
            out[key] = (pooled[..., 0] if v.dim() == 2 else pooled).to(v.dtype)
        return out

    def _select_packed(self, output: torch.Tensor) -> torch.Tensor:
        b, n, _ = output.shape
        scores = self._pooled_scores()
        sels = [self.rt.compress_image(output[i], self.grid, {k: v[i] for k, v in scores.items()}) for i in range(b)]
        keep = torch.zeros(b, n, dtype=torch.bool, device=output.device)
        out = torch.zeros_like(output)
        for i, s in enumerate(sels):
            keep[i, s.index] = True
            out[i, s.index] = s.features.to(output.dtype) if s.features is not None else output[i, s.index]
        self.scratch.keep = keep
        return out

    def _projector_post(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if self.scratch.active and self.packing is not None:
            with self.rt.timed():
                return self._select_packed(output)
        layout = self.scratch.layout
        if not self.scratch.active or layout is None:
            return None
        with self.rt.timed():
            index, valid, n = layout
            return scatter_rows(output, index, valid, n)

    def _wrap_image_features(self, original):
        return WrappedMethod(self._get_image_features, original)

    def _get_image_features(self, original, *args, **kwargs):
        with self.lock:
            out = self._encode(original, args, kwargs)
            keep = self.scratch.keep
            feats = out.pooler_output if hasattr(out, "pooler_output") else None
            if keep is None or feats is None:
                return out
            if len(feats) != keep.shape[0] or any(f.shape[0] != keep.shape[1] for f in feats):
                raise RuntimeError("vtc: unexpected image feature layout from get_image_features")
            self._remember_keeps(feats, list(keep.unbind(0)))
            return out

    def _encode(self, original, args: tuple, kwargs: dict[str, Any]):
        """Run the model's own image encoder with the vision-site hooks armed for this call."""
        self.scratch = _VisionScratch(active=True)
        try:
            return original(*args, **kwargs)
        finally:
            self.scratch.active = False

    # ------------------------------------------------------------------ base model
    def _base_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        masks = {}
        for modality, token_id in self.placeholders.items():
            if input_ids is not None:
                masks[modality] = input_ids == token_id
            elif embeds is not None:
                token = self.base.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
                masks[modality] = (embeds == token).all(-1)
        self._begin_call(kwargs, masks)
        return None
