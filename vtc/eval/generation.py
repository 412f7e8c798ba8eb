"""Greedy answers for a batch of (text, image) or (text, video frames) questions through the model's own chat
template and processor: the one code path behind ``vtc eval`` and the lmms-eval plugin, so both harnesses feed
the model exactly the same inputs."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def _chat(processor: Any, kind: str, text: str) -> str:
    conv = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def _run(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> list[str]:
    inputs = inputs.to(model.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def image_replies(model: Any, processor: Any, texts: Sequence[str], images: Sequence[Any],
                  max_new_tokens: int) -> list[str]:
    """One image and one question per row, generated as one left-padded batch."""
    prompts = [_chat(processor, "image", t) for t in texts]
    inputs = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    return _run(model, processor, inputs, max_new_tokens)


def video_replies(model: Any, processor: Any, texts: Sequence[str], videos: Sequence[Sequence[Any]],
                  max_new_tokens: int) -> list[str]:
    """One video (a list of RGB frames) and one question per row. Videos shorter than the frame budget give fewer
    frames; models taking a (B, F, ...) tensor (OneVision) need one frame count per call, so each count is
    generated as its own sub-batch (the same results as one call per row)."""
    prompts = [_chat(processor, "video", t) for t in texts]
    replies: list[str] = [""] * len(texts)
    for n in sorted({len(v) for v in videos}):
        rows = [i for i, v in enumerate(videos) if len(v) == n]
        inputs = processor(text=[prompts[i] for i in rows], videos=[list(videos[i]) for i in rows],
                           return_tensors="pt", padding=True)
        for i, reply in zip(rows, _run(model, processor, inputs, max_new_tokens)):
            replies[i] = reply
    return replies
