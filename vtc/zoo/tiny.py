"""Tiny random-weight models built from transformers configs, for tests and offline smoke runs."""
from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 100


#: the shared tiny LM and vision-tower sizes (the vision tower is 32 wide, the LM 64)
_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _build(model_cls, cfg, seed: int, attn: str):
    """Seeded random weights, eval mode, the given attention backend, pad id 0 for generate()."""
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


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

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, num_hidden_layers=vision_layers,
                              projection_dim=32, **_VISION)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(num_hidden_layers=text_layers, **_TEXT),
                      image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    return _build(LlavaForConditionalGeneration, cfg, seed, attn)


def tiny_tokenpacker_llava(seed: int = 0, image_size: int = 64, patch_size: int = 8, scale_factor: int = 2,
                           key_layers: tuple[int, ...] = (1, 2, 3, 3), text_layers: int = 2, attn: str = "sdpa"):
    """A tiny LLaVA whose projector is TokenPacker: an (image_size/patch_size)^2 grid packs to (.../s)^2 tokens; a
    4-layer tower whose hidden states ``key_layers`` stand in for CLIP-L's 12/16/22/23."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..models.tokenpacker import install, tokenpacker_config

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, num_hidden_layers=4, projection_dim=32,
                              **_VISION)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(num_hidden_layers=text_layers, **_TEXT),
                      image_token_id=IMAGE_TOKEN_ID)
    tokenpacker_config(cfg, scale_factor, key_layers)  # the authors' heads rule: hidden // 128 (here 1)
    model = _build(LlavaForConditionalGeneration, cfg, seed, attn)
    torch.manual_seed(seed + 1)
    install(model).eval()
    return model


def tiny_llava_next(seed: int = 0, attn: str = "sdpa", vision_layers: int = 3, text_layers: int = 2):
    """A LlavaNextForConditionalGeneration: 32x32 crops of 4x4 tokens, pinpoints up to 64x64 (2x2 crops)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=8, num_hidden_layers=vision_layers, projection_dim=32,
                              **_VISION)
    cfg = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(num_hidden_layers=text_layers, **_TEXT),
                          image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=_PINPOINTS)
    return _build(LlavaNextForConditionalGeneration, cfg, seed, attn)


def tiny_llava_onevision(seed: int = 0, attn: str = "sdpa", vision_layers: int = 3, text_layers: int = 2):
    """A LlavaOnevisionForConditionalGeneration: SigLIP 32x32 crops of 4x4 tokens (no CLS), Qwen2 LM;
    images like :func:`tiny_llava_next`, a video frame pools to 2x2 tokens (+ one newline per video)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    vision = SiglipVisionConfig(image_size=32, patch_size=8, num_hidden_layers=vision_layers, **_VISION)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(num_hidden_layers=text_layers, **_TEXT),
                               image_token_id=IMAGE_TOKEN_ID, video_token_id=QWEN_VIDEO, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=_PINPOINTS)
    return _build(LlavaOnevisionForConditionalGeneration, cfg, seed, attn)


def llava_next_tokens(model, image_sizes: list[tuple[int, int]]) -> list[int]:
    """Packed visual tokens per image (thumbnail + unpadded crops + newlines) for (H, W) sizes."""
    pv = torch.zeros(len(image_sizes), 5, 3, 32, 32)
    with torch.no_grad():
        out = model.model.get_image_features(pv, torch.tensor(image_sizes), return_dict=True).pooler_output
    return [len(f) for f in out]


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


QWEN_IMAGE, QWEN_VIDEO = 100, 101


def tiny_qwen_vl(version: str = "2", seed: int = 0, attn: str = "sdpa", text_layers: int = 2):
    """A tiny Qwen2-VL (``version="2"``), Qwen2.5-VL (``"2.5"``) or Qwen3-VL (``"3"``), random weights."""
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as Cls
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE,
                            video_token_id=QWEN_VIDEO, vision_start_token_id=102, vision_end_token_id=103)
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as Cls
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE,
                               video_token_id=QWEN_VIDEO, vision_start_token_id=102, vision_end_token_id=103)
    elif version == "3":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration as Cls
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
        text = {**text, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                           "mrope_section": [4, 2, 2], "mrope_interleaved": True}}
        cfg = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE,
                            video_token_id=QWEN_VIDEO, vision_start_token_id=102, vision_end_token_id=103)
    else:
        raise ValueError(f"version must be '2', '2.5' or '3'; got {version!r}")
    model = Cls(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


def qwen_inputs(grids: list[tuple[int, int, int]], prefixes: list[list[int]], suffixes: list[list[int]],
                video: bool = False, seed: int = 0) -> dict:
    """Left-padded Qwen batch, one image (or video) per row with grid (t, h, w) in patches."""
    g = torch.Generator().manual_seed(seed)
    tok = QWEN_VIDEO if video else QWEN_IMAGE
    rows, types = [], []
    for (t, h, w), pre, suf in zip(grids, prefixes, suffixes):
        n = t * h * w // 4
        rows.append(pre + [102] + [tok] * n + [103] + suf)
        types.append([0] * (len(pre) + 1) + [2 if video else 1] * n + [0] * (1 + len(suf)))
    ids, mask = left_pad(rows)
    tt = torch.zeros_like(ids)
    for i, ty in enumerate(types):
        tt[i, ids.shape[1] - len(ty):] = torch.tensor(ty)
    patches = sum(t * h * w for t, h, w in grids)
    pv = torch.randn(patches, 3 * 2 * 4 * 4, generator=g)
    key = "pixel_values_videos" if video else "pixel_values"
    gkey = "video_grid_thw" if video else "image_grid_thw"
    return {"input_ids": ids, "attention_mask": mask, key: pv, gkey: torch.tensor(grids), "mm_token_type_ids": tt}
