"""The VAR adapter: the only code that knows :mod:`vtc.models.var`'s internals (its KV cache object, ``make_cache``
and ``generate``). It serves the ``generation_kv`` site: after each scale's keys are appended to a layer's cache,
the method decides, per group of heads, which keys stay; the kept keys are gathered into dense tensors, so the
cache's memory really shrinks (heads of one group share a length; groups may differ, e.g. HACK's contextual and
structural heads, which then attend separately over their own groups)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.batch import gather_rows
from ..hook_owner import WrappedMethod
from ..runtime import Runtime
from ..sites import GenerationInfo, GenerationKVInput, KVSelection
from .base import Adapter, register_adapter


@register_adapter
class VARAdapter(Adapter):
    model_classes = ("VAR",)
    family = "VAR"
    supported_sites = ("generation_kv",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from ..models.var import VAR

        return isinstance(model, VAR)

    def vision_info(self) -> GenerationInfo:
        m = self.model
        pn = "_".join(str(p) for p in m.patch_nums)
        return GenerationInfo(family="var", num_layers=m.depth, num_heads=m.num_heads, head_dim=m.C // m.num_heads,
                              scale_sizes=tuple(p * p for p in m.patch_nums),
                              model_id=f"var-d{m.depth}-c{m.C}-h{m.num_heads}-pn{pn}")

    def install(self, runtime: Runtime) -> None:
        self.rt = runtime
        m = self.model
        self.scale_sizes = self.vision_info().scale_sizes
        self._set_instance_attr(m, "make_cache", WrappedMethod(self._make_cache, m.make_cache))
        self._set_instance_attr(m, "generate", WrappedMethod(self._generate, m.generate))

    # ------------------------------------------------------------------ hooks
    def _make_cache(self, original, batch: int, cfg: bool):
        cache = original(batch, cfg)
        for layer in cache.layers:
            layer.compressor = self._compress
        return cache

    def _generate(self, original, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One generation = one :class:`CallStats`: keys per head of an uncompressed cache at the end (before) and
        held on average per head (after), per row; ``kv_bytes`` = (peak bytes held, peak of an uncompressed cache)."""
        with self.lock:
            out = original(*args, **kwargs)
            cache = self.model.last_cache
            if cache is not None:
                for layer in cache.layers:  # the kept cache must not hold vtc's hooks (pickling, unpatch)
                    layer.compressor = None
                rows = cache.batch * (2 if cache.cfg else 1)
                held = sum(layer.stored_tokens() for layer in cache.layers) / rows  # per row, all heads
                kept = round(held / (self.model.num_heads * len(cache.layers)))
                st = self.rt.record([cache.layers[0].length] * rows, [kept] * rows)
                st.kv_bytes = (cache.peak_bytes, cache.dense_peak_bytes)
            return out

    def _compress(self, layer, q: torch.Tensor, si: int) -> None:
        rt, m = self.rt, self.model
        with rt.timed():
            if si == 0:
                self._split_heads(layer)
            rows = q.shape[0]
            cfg_rows = rows // 2 if m.last_cache is not None and m.last_cache.cfg else rows
            present = tuple((g.heads, g.k.shape[2]) for g in layer.groups)
            for g in layer.groups:
                hq = q if g.heads.numel() == q.shape[1] else q[:, g.heads]
                inp = GenerationKVInput(layer=layer.index, num_layers=m.depth, heads=g.heads, q=hq, k=g.k, v=g.v,
                                        pos=g.pos, key_scale=layer.scale_of(g.pos), scale_index=si,
                                        scale_sizes=self.scale_sizes, attn_scale=m.blocks[layer.index].attn.scale,
                                        cfg_rows=cfg_rows, layer_groups=present)
                sel = rt.method.kv_select(inp)
                if sel is not None:
                    self._apply(g, sel)
                    rt.events["generation_kv.select"] += 1

    def _split_heads(self, layer) -> None:
        groups = self.rt.method.kv_head_groups(layer.index, layer.num_heads)
        if groups is None:
            return
        (g,) = layer.groups
        groups = [h.flatten().to(g.k.device) for h in groups]
        heads = torch.cat(groups).cpu()
        if sorted(heads.tolist()) != list(range(layer.num_heads)) or any(h.numel() == 0 for h in groups):
            raise RuntimeError(f"method {self.rt.method.name!r} split layer {layer.index}'s heads into groups that are "
                               f"not a partition of 0..{layer.num_heads - 1}")
        from ..models.var import KVGroup

        layer.groups = [KVGroup(h, g.k[:, h], g.v[:, h], g.pos[:, h]) for h in groups]

    @staticmethod
    def _apply(g, sel: KVSelection) -> None:
        idx = sel.index
        R, Hg, T = g.pos.shape
        if idx.dim() != 3 or idx.shape[:2] != (R, Hg) or idx.shape[2] > T:
            raise RuntimeError(f"kv_select returned index {tuple(idx.shape)}; expected ({R}, {Hg}, K <= {T})")
        flat = idx.reshape(R * Hg, -1)  # rows x heads as one batch of ragged-gather rows

        def kept(x: torch.Tensor) -> torch.Tensor:
            return gather_rows(x.reshape(R * Hg, T, *x.shape[3:]), flat).view(R, Hg, idx.shape[2], *x.shape[3:])

        g.k = sel.k if sel.k is not None else kept(g.k)
        g.v = sel.v if sel.v is not None else kept(g.v)
        g.pos = kept(g.pos)
