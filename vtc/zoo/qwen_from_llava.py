"""A toy Qwen2-VL built from the toy LLaVA: the LLaVA's language model, and a Qwen vision tower distilled onto it.

Trained from scratch with the LLaVA recipe (short GPU runs) the toy Qwen2-VL stayed at 59.8 %, and on 2 CPU cores a
Qwen step costs several LLaVA steps (784 patches per image in the tower). The toy LLaVA's LM already answers
ShapesMME, and both toys share the word-level vocabulary (the Qwen tokenizer appends four vision tokens) and the LM
shape (Llama and Qwen2 differ only by Qwen2's q/k/v biases, set to zero here), so the Qwen LM starts as an exact
copy: on text the two models give the same logits. The Qwen tower (patch 4, 2x2 merge: one merged token per
8x8-pixel cell, the cell of one LLaVA patch) is then regressed onto the LLaVA projector's outputs for the same
images (:func:`distill_tower`), and a short VQA stage adapts the LM to M-RoPE's image positions.

Measured for the bundled toy Qwen2-VL, built from the 81.8 % toy LLaVA (2 CPU cores; first-token accuracy on 120
validation questions): the LLaVA answers 88 %; the Qwen copy fed the LLaVA's own visual tokens 88 % in the LLaVA's
token layout and 77 % in Qwen's (the two ``<|vision_start|>``/``<|vision_end|>`` markers; any embedding for them
gives 76-77 %), before fine-tuning. After 300 distillation steps the tower's tokens match on background cells
(relative error 0.03) but not on cells that show an object (0.58), and they give 64 % in the LLaVA layout. Fine-
tuned (15 + 20 min), the bundled model: 64.2 % of the ShapesMME test split, colour 100 %, existence and position at
chance: colour is a pixel statistic the tower learns at once; shapes and digits apparently need more than 300
regression steps on 4-px patches.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .shapes import ShapesGenerator


def qwen_from_llava(fam, path: str | Path, tower_from: str | Path | None = None):
    """(a ``Qwen2VLForConditionalGeneration`` with the toy LLaVA's LM, that LLaVA). ``fam`` is the qwen2-vl
    :class:`~vtc.zoo.train_toy.Family`; ``tower_from``: a toy Qwen2-VL checkpoint whose vision tower to start
    from (None: a fresh tower)."""
    from transformers import Qwen2VLForConditionalGeneration

    from .train_toy import Family, blank_visual_token, toy_qwen_config

    llava_fam = Family("llava")
    llava = llava_fam.load(path)
    if llava.config.model_type != "llava":
        raise ValueError(f"{path}: a {type(llava).__name__}, not a toy LLaVA")
    text = llava.config.text_config
    cfg = toy_qwen_config(fam.tok)
    cfg.text_config.num_key_value_heads = text.num_key_value_heads
    cfg.text_config.rms_norm_eps = text.rms_norm_eps
    model = Qwen2VLForConditionalGeneration(cfg)
    src = {k: v for k, v in llava.state_dict().items() if k.startswith("model.language_model.")}
    emb = src.pop("model.language_model.embed_tokens.weight")
    n_shared = emb.shape[0]
    shared = list(range(n_shared))
    if fam.tok.convert_ids_to_tokens(shared) != llava_fam.tok.convert_ids_to_tokens(shared):
        raise ValueError("the toy Qwen tokenizer no longer extends the toy LLaVA's: embeddings can't be copied")
    result = model.load_state_dict(src, strict=False)
    lm_missing = [k for k in result.missing_keys if k.startswith("model.language_model.")]
    if result.unexpected_keys or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
                                     and "embed_tokens" not in k for k in lm_missing):
        raise ValueError(f"{path}: LM weights don't map onto Qwen2 ({result.unexpected_keys[:3]}, {lm_missing[:3]})")
    with torch.no_grad():
        lm = model.model.language_model
        for layer in lm.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        new = lm.embed_tokens.weight
        new[:n_shared] = emb
        blank = blank_visual_token(llava)  # the frame markers look like empty background to the LLaVA's LM
        for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
            new[fam.tok.convert_tokens_to_ids(name)] = blank  # (the pads are replaced by visual tokens anyway)
    if tower_from is not None:
        tower = {k: v for k, v in fam.load(tower_from).state_dict().items() if k.startswith("model.visual.")}
        missing = [k for k in model.load_state_dict(tower, strict=False).missing_keys if k.startswith("model.visual.")]
        if missing:
            raise ValueError(f"{tower_from}: no toy Qwen2-VL tower there ({len(missing)} weights missing)")
    model.tie_weights()
    return model, llava


def distill_tower(model, llava, fam, steps: int, batch: int, log, lr: float = 1e-3, seed: int = 1003,
                  object_weight: float = 5.0) -> float:
    """Regress the Qwen tower + PatchMerger's merged tokens onto the toy LLaVA projector's outputs for the same
    ShapesMME training images (both grids are 14x14 cells of 8x8 pixels, in raster order); the cells showing
    an object or digit weigh ``object_weight`` times a background cell (they are few, and hold what questions
    ask about). Returns the final relative error (weighted MSE / mean square of the targets)."""
    from .train_toy import IMAGE_SIZE, PATCH, Family, patch_labels

    teacher = Family("llava", str(fam.device))
    llava.to(fam.device).eval()
    gen = ShapesGenerator(seed)
    visual = model.model.visual
    opt = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=0.0)
    t0, rel = time.time(), float("nan")
    for step in range(steps):
        samples = [gen.training_sample() for _ in range(batch)]
        images = [img for img, _ in samples]
        with torch.no_grad():
            target = teacher.projector(llava)(teacher.projector_input(llava, teacher.pixels(images)))
        shows = torch.stack([patch_labels(sc, IMAGE_SIZE, IMAGE_SIZE // PATCH)[:3].amax(0) > 0 for _, sc in samples])
        weight = 1.0 + (object_weight - 1.0) * shows.to(target.device, target.dtype)[..., None]
        pix = fam.pixels(images)
        out = visual(pix["pixel_values"], grid_thw=pix["image_grid_thw"]).pooler_output
        err = (out.view_as(target) - target).pow(2)
        loss = (err * weight).mean() / weight.mean()
        for g in opt.param_groups:  # linear warm-up, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        rel = loss.item() / target.pow(2).mean().item()
        if step % 25 == 0 or step == steps - 1:
            log(f"distill step {step} mse {loss.item():.3e} (relative {rel:.3f}, {time.time() - t0:.0f}s)")
    return rel
