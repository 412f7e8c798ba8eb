"""Loading models for examples and evaluation: a local checkpoint, the bundled toy model, or a tiny random one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = Path(__file__).parent / "checkpoints"
TOY_LLAVA = CHECKPOINTS / "toy-llava"
TOY_QWEN = CHECKPOINTS / "toy-qwen2-vl"
TOY_NEXT = CHECKPOINTS / "toy-llava-next"
TOY_OV = CHECKPOINTS / "toy-llava-onevision"
TOY_TOKENPACKER = CHECKPOINTS / "toy-tokenpacker"  # the toy LLaVA with a trained TokenPacker (49 visual tokens)
TOYS = ("toy-llava", "toy-qwen2-vl", "toy-llava-next", "toy-llava-onevision", "toy-tokenpacker")


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, attn: str = "sdpa"):
    """Load a local checkpoint (llava-hf, Qwen2-VL, ... any image-text-to-text model) and its processor, offline.

    ``path`` may also be the name of a bundled toy model (:data:`TOYS`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..adapters.hf import LOAD_KWARGS

    if str(path) in TOYS:
        path = CHECKPOINTS / str(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a local folder saved with save_pretrained")
    if (path / "config.json").exists() and '"tokenpacker"' in (path / "config.json").read_text():
        from ..models import tokenpacker  # its projector is not a transformers class

        return tokenpacker.from_pretrained(path, device, dtype, attn)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn, local_files_only=True, **LOAD_KWARGS
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def default_model(device: str = "cpu") -> tuple[Any, Any, str]:
    """The bundled toy LLaVA if present, else a tiny random-weight LLaVA (returned label says which)."""
    if (TOY_LLAVA / "config.json").exists():
        model, proc = load_model(TOY_LLAVA, device)
        return model, proc, f"bundled toy LLaVA ({TOY_LLAVA.name}, trained on ShapesMME)"
    from .processor import build_llava_processor
    from .tiny import tiny_llava

    proc = build_llava_processor(112, 8)
    model = tiny_llava(image_size=112, patch_size=8)
    tok = proc.tokenizer
    model.resize_token_embeddings(len(tok))
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.to(device), proc, "tiny RANDOM-WEIGHT LLaVA (no toy checkpoint found): answers are meaningless"


def default_video_model(device: str = "cpu") -> tuple[Any, Any, str]:
    """The bundled toy video model (LLaVA-OneVision style, trained on ShapesVideo) if present, else the toy
    Qwen2-VL (trained on images only), else a tiny random-weight Qwen2-VL (the label says which)."""
    if (TOY_OV / "config.json").exists():
        model, proc = load_model(TOY_OV, device)
        return model, proc, f"bundled toy LLaVA-OneVision ({TOY_OV.name}, trained on ShapesVideo)"
    if (TOY_QWEN / "config.json").exists():
        model, proc = load_model(TOY_QWEN, device)
        return model, proc, (f"bundled toy Qwen2-VL ({TOY_QWEN.name}, trained on ShapesMME images only: "
                             "its video answers are not meaningful yet)")
    from transformers import Qwen2VLForConditionalGeneration

    from .processor import build_qwen_processor
    from .train_toy import toy_qwen_config

    proc = build_qwen_processor(112, 4)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(toy_qwen_config(proc.tokenizer)).eval()
    model.generation_config.eos_token_id = proc.tokenizer.eos_token_id
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    label = "tiny RANDOM-WEIGHT Qwen2-VL (no toy video checkpoint found): answers are meaningless"
    return model.to(device), proc, label



TOY_VAR = CHECKPOINTS / "toy-var"  # VQ-VAE + VAR (16 shape x colour classes, 64 px) + the judge classifier


def load_judge(path: str | Path = TOY_VAR, device: str = "cpu"):
    """The toy VAR's judge classifier (:mod:`vtc.zoo.var_classifier`)."""
    import json

    from safetensors.torch import load_file

    from .var_classifier import ShapeClassifier

    path = Path(path)
    if not (path / "classifier.safetensors").exists():
        raise FileNotFoundError(f"no judge classifier in {path} (classifier.safetensors); train it with "
                                "python -m vtc.zoo.train_var --stage classifier")
    clf = ShapeClassifier(**json.loads((path / "classifier.json").read_text()))
    clf.load_state_dict(load_file(str(path / "classifier.safetensors")))
    return clf.to(device).eval()


def load_var(path: str | Path = TOY_VAR, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(vae, var) from a folder written by :func:`vtc.models.var.save_folder` (default: the bundled toy VAR)."""
    from ..models.var import load_folder

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no VAR folder at {path} (config.json, vae.safetensors, var.safetensors)")
    return load_folder(path, device, dtype)
