"""HACK's offline head calibration: ``cal = vtc.hack.calibrate(var_model, n=50)``; ``cal.save("heads.json")``.

For each layer and head, the column-wise variance of the attention matrix at the final scale (the variance over
query rows of each key column, summed over columns), averaged over generated samples (both CFG halves). Attention
rows come from the layer's own q/k at the ``generation_kv`` site, so sdpa stays on. The file records the model's
shape; loading it for another shape is an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from .core.kv_scores import column_variance
from .methods.generation_kv import GenerationKVMethod
from .sites import GenerationInfo, GenerationKVInput, KVSelection


@dataclass
class HackCalibration:
    """variance: (layers, heads) float; model_id: the shape it was measured on (``GenerationInfo.model_id``)."""

    model_id: str
    variance: torch.Tensor
    samples: int = 0
    meta: dict = field(default_factory=dict)

    def contextual(self, alpha: float) -> torch.Tensor:
        """(layers, heads) bool: the lowest-variance ``alpha`` fraction of heads."""
        from .methods.hack import split_heads

        return split_heads(self.variance, alpha)

    def check(self, info: GenerationInfo) -> None:
        if self.model_id != info.model_id or tuple(self.variance.shape) != (info.num_layers, info.num_heads):
            raise ValueError(f"this HACK calibration was measured on {self.model_id} "
                             f"({tuple(self.variance.shape)} layers x heads); the model is {info.model_id} "
                             f"({info.num_layers} x {info.num_heads}): calibrate it with vtc.hack.calibrate(model)")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"format": "vtc-hack-calibration-1", "model_id": self.model_id,
                                    "samples": self.samples, "meta": self.meta,
                                    "variance": self.variance.tolist()}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HackCalibration":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"HACK calibration file {path} not found")
        try:
            d = json.loads(path.read_text())
            assert d.get("format") == "vtc-hack-calibration-1"
            return cls(d["model_id"], torch.tensor(d["variance"], dtype=torch.float64), d.get("samples", 0),
                       d.get("meta", {}))
        except (ValueError, KeyError, AssertionError):
            raise ValueError(f"{path} is not a HACK calibration file (vtc.hack.HackCalibration.save)") from None


@dataclass
class _HeadVarianceProbe(GenerationKVMethod):
    """Records each head's column variance at the final scale; evicts nothing."""

    name: ClassVar[str] = "_hack_probe"
    ratio: float | None = 1.0
    tokens: int | None = None

    def setup(self, info) -> None:  # type: ignore[override]
        super().setup(info)
        self.sums = torch.zeros(info.num_layers, info.num_heads, dtype=torch.float64)
        self.rows = torch.zeros(info.num_layers, info.num_heads, dtype=torch.float64)

    def kv_select(self, inp: GenerationKVInput) -> KVSelection | None:
        if inp.final:
            var = column_variance(inp.q, inp.k, inp.attn_scale).double().cpu()  # (R, Hg)
            self.sums[inp.layer, inp.heads.cpu()] += var.sum(0)
            self.rows[inp.layer, inp.heads.cpu()] += var.shape[0]
        return None


def calibrate(model: Any, class_labels: Sequence[int] | None = None, n: int = 50, batch: int = 16, seed: int = 0,
              cfg: float | None = 1.5, top_k: int = 900, top_p: float = 0.96) -> HackCalibration:
    """Generate ``n`` images (labels cycled from ``class_labels``, default every class in turn) and average each
    head's final-scale column variance. The paper uses 50 samples and finds even one enough (stable split)."""
    from .api import patch, unpatch

    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    num_classes = getattr(model, "num_classes", None)
    labels = list(class_labels) if class_labels is not None else list(range(num_classes or 1))
    labels = [labels[i % len(labels)] for i in range(n)]
    probe = _HeadVarianceProbe()
    handle = patch(model, probe)
    try:
        info = handle.adapter.vision_info()
        for j, i in enumerate(range(0, n, batch)):
            model.generate(labels[i:i + batch], cfg=cfg, top_k=top_k, top_p=top_p, seed=seed + j)
    finally:
        unpatch(model)
    if not bool((probe.rows > 0).all()):
        raise RuntimeError("the calibration probe saw no final scale for some heads")
    return HackCalibration(info.model_id, probe.sums / probe.rows, n,
                           {"class_labels": sorted(set(labels)), "seed": seed, "cfg": cfg})


def with_calibration(model: Any, hyperparameters: dict, path: str | Path | None = None, n: int = 16, seed: int = 0,
                     **generate_kwargs: Any) -> dict:
    """``hyperparameters`` of a ``hack`` run with a calibration: the one given, else ``path`` if it holds one for this
    model, else one measured now on ``n`` samples and saved to ``path`` (scripts and the CLI use this). ``path``
    defaults to ``<vtc cache>/hack/<model shape>.json`` (``$VTC_CACHE``, default ``~/.cache/vtc``)."""
    if hyperparameters.get("calibration") is not None:
        return hyperparameters
    from .adapters import find_adapter
    from .cli import cache_dir

    info = find_adapter(model)(model).vision_info()
    path = Path(path) if path is not None else cache_dir() / "hack" / f"{info.model_id}.json"
    if path.is_file():
        try:
            HackCalibration.load(path).check(info)
            return {**hyperparameters, "calibration": str(path)}
        except ValueError:
            pass  # another model's file: measure again
    path.parent.mkdir(parents=True, exist_ok=True)
    calibrate(model, n=n, seed=seed, **generate_kwargs).save(path)
    return {**hyperparameters, "calibration": str(path)}


__all__ = ["HackCalibration", "calibrate", "with_calibration"]
