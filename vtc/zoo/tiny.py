"""Tiny random-weight models built from transformers configs, for tests and offline smoke runs."""
from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 100


def tiny_llava(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 3,
    text_layers: int = 2,
    attn: str = "sdpa",
    strategy: str = "default",
):
    """A LlavaForConditionalGeneration with a CLIP tower ((image_size/patch_size)^2 visual tokens) and a Llama LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy=strategy,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


def llava_prompt(n_image_tokens: int, prefix: list[int], suffix: list[int]) -> list[int]:
    """Token ids: ``prefix + <image>*n + suffix``."""
    return list(prefix) + [IMAGE_TOKEN_ID] * n_image_tokens + list(suffix)


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask
