"""VAR (visual autoregressive generation by next-scale prediction): the multi-scale VQ-VAE and the transformer,
state-dict compatible with FoundationVision/VAR's released checkpoints, with an explicit KV cache.

>>> vae, var = from_pretrained("vae_ch160v4096z32.pth", "var_d16.pth", depth=16)   # local files
>>> images = var.generate([207, 360], cfg=1.5, seed=0)                             # (2, 3, 256, 256) in [0, 1]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache import KVGroup, VARKVCache, VARLayerCache
from .transformer import VAR
from .vqvae import VQVAE

#: the released 256-px schedule; 512 px uses (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def build(depth: int = 16, patch_nums: Sequence[int] = PATCH_NUMS_256, num_classes: int = 1000,
          vae_kwargs: dict[str, Any] | None = None, **var_kwargs: Any) -> tuple[VQVAE, VAR]:
    """The authors' ``build_vae_var`` shapes: heads = depth, width = 64 * depth, VQ-VAE ch=160, V=4096, Cvae=32
    (``vae_kwargs`` / ``var_kwargs`` override, e.g. for a toy). Random weights; both in eval mode."""
    vae = VQVAE(**{"patch_nums": tuple(patch_nums), **(vae_kwargs or {})})
    kw = dict(num_classes=num_classes, depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums)
    var = VAR(vae, **{**kw, **var_kwargs})
    return vae.eval(), var.eval()


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("trainer", "var_wo_ddp", "state_dict", "model"):  # training snapshots nest the weights
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key].get("var_wo_ddp", sd[key]) if key == "trainer" else sd[key]
    return sd


def from_pretrained(vae_path: str | Path, var_path: str | Path, depth: int = 16,
                    patch_nums: Sequence[int] = PATCH_NUMS_256, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, vae_kwargs: dict[str, Any] | None = None,
                    **var_kwargs: Any) -> tuple[VQVAE, VAR]:
    """Load the official ``vae_ch160v4096z32.pth`` and ``var_d{depth}.pth`` from local paths (the shapes of
    :func:`build`; ``vae_kwargs`` / ``var_kwargs`` for other shapes), strictly: a missing or unexpected key, or a
    shape that differs, is an error naming it."""
    with torch.device("meta"):
        vae, var = build(depth, patch_nums, vae_kwargs=vae_kwargs, **var_kwargs)
    for name, module, path in (("VQ-VAE", vae, vae_path), ("VAR", var, var_path)):
        sd = _read_state(path)
        try:
            module.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a {name} checkpoint of this shape (depth={depth}, "
                             f"patch_nums={tuple(patch_nums)}): {e}") from None
    var.vae_proxy = (vae,)
    return vae.to(device, dtype).eval(), var.to(device, dtype).eval()


def save_folder(vae: VQVAE, var: VAR, out: str | Path, extra: dict[str, Any] | None = None) -> None:
    """A folder with ``config.json``, ``vae.safetensors`` and ``var.safetensors`` (the toy's format)."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    half = lambda sd: {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}  # noqa
    save_file(half(vae.state_dict()), str(out / "vae.safetensors"))
    save_file(half(var.state_dict()), str(out / "var.safetensors"))
    (out / "config.json").write_text(json.dumps({"vae": vae.config, "var": var.config, **(extra or {})}, indent=1))


def load_folder(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[VQVAE, VAR]:
    """Load a folder written by :func:`save_folder` (weights stored in fp16, loaded as ``dtype``)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    vae = VQVAE(**cfg["vae"])
    var_cfg = dict(cfg["var"])
    var = VAR(vae, **var_cfg)
    vae.load_state_dict({k: v.float() for k, v in _read_state(path / "vae.safetensors").items()})
    var.load_state_dict({k: v.float() for k, v in _read_state(path / "var.safetensors").items()})
    return vae.to(device, dtype).eval(), var.to(device, dtype).eval()


__all__ = ["VAR", "VQVAE", "VARKVCache", "VARLayerCache", "KVGroup", "build", "from_pretrained", "save_folder",
           "load_folder", "PATCH_NUMS_256", "PATCH_NUMS_512"]
