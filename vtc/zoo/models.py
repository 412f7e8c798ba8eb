"""Loading models for examples and evaluation: a local checkpoint, the bundled toy model, or a tiny random one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = Path(__file__).parent / "checkpoints"
TOY_LLAVA = CHECKPOINTS / "toy-llava"


def load_llava(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, attn: str = "sdpa"):
    """Load a local llava-hf style checkpoint (``LlavaForConditionalGeneration`` + its processor), offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a local folder saved with save_pretrained")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn, local_files_only=True
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def default_model(device: str = "cpu") -> tuple[Any, Any, str]:
    """The bundled toy LLaVA if present, else a tiny random-weight LLaVA (returned label says which)."""
    if (TOY_LLAVA / "config.json").exists():
        model, proc = load_llava(TOY_LLAVA, device)
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
