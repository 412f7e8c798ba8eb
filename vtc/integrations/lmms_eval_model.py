"""The lmms-eval model ``vtc``: any checkpoint vtc supports (LLaVA-1.5 / NeXT / OneVision, Qwen2 / 2.5 / 3-VL, the
bundled toys), optionally compressed with any vtc method, answering lmms-eval's ``generate_until`` requests
through the same generation code as ``vtc eval`` (:mod:`vtc.eval.generation`), so both harnesses give the same
replies and, with lmms-eval's scoring rules reproduced in :mod:`vtc.eval`, the same numbers.

model_args: ``pretrained`` (folder or toy name), ``method``, ``ratio``, ``tokens``, ``frames`` (per video, 32),
``batch_size`` (1), ``device`` ("cpu"), ``dtype`` ("float32"), ``attn`` ("sdpa"), ``stats_path`` (a JSON file for
the compression stats); any other key is a method hyperparameter (numbers are parsed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.model import lmms
from loguru import logger

import vtc

from ..eval.generation import image_replies, video_replies
from ..eval.runner import resolve_method
from ..video import load_video
from ..zoo.models import load_model


def _value(v: Any) -> Any:
    """lmms-eval passes model_args as strings: numbers, booleans and "none" become Python values."""
    if not isinstance(v, str):
        return v
    low = v.strip().lower()
    if low in ("none", "null", ""):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


class VTCModel(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "toy-llava", method: str | None = None, ratio: Any = None, tokens: Any = None,
                 frames: Any = 32, batch_size: Any = 1, device: str = "cpu", dtype: str = "float32",
                 attn: str = "sdpa", stats_path: str | None = None, **hyperparameters: Any) -> None:
        super().__init__()
        hp = {k: _value(v) for k, v in hyperparameters.items()}
        method, ratio, tokens = _value(method), _value(ratio), _value(tokens)
        built = resolve_method(method or None, ratio, tokens, hp)  # bad settings fail before the model loads
        self.frames, self.batch_size_per_gpu = int(_value(frames)), int(_value(batch_size))
        self.model, self.processor = load_model(str(pretrained), device, dtype=getattr(torch, dtype), attn=attn)
        self.processor.tokenizer.padding_side = "left"
        self.patch = vtc.patch(self.model, built) if built is not None else None
        self.stats_path = stats_path
        self.label = f"{pretrained} {built.describe() if built is not None else '(uncompressed)'}"

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests) -> list[str]:
        replies: list[str] = []
        args = [r.args for r in requests]
        for i in range(0, len(args), self.batch_size_per_gpu):
            replies += self._batch(args[i:i + self.batch_size_per_gpu])
        self._log_stats(len(args))
        return replies

    def _batch(self, batch: list[tuple]) -> list[str]:
        texts, visuals, limits, until = [], [], [], []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in batch:
            vis = doc_to_visual(self.task_dict[task][split][doc_id])
            vis = vis if isinstance(vis, list) else [vis]
            if len(vis) != 1:
                raise ValueError(f"vtc's lmms-eval model answers one image or video per question; {task} gave "
                                 f"{len(vis)}")
            texts.append(context)
            visuals.append(vis[0])
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("vtc's lmms-eval model decodes greedily (temperature 0, do_sample false)")
            limits.append(int(gen_kwargs.get("max_new_tokens", 16)))
            stop = gen_kwargs.get("until") or []
            until.append([stop] if isinstance(stop, str) else list(stop))
        n = max(limits)
        if all(isinstance(v, str) for v in visuals):  # video paths
            videos = [list(load_video(v, self.frames)[0]) for v in visuals]
            out = video_replies(self.model, self.processor, texts, videos, n)
        else:
            out = image_replies(self.model, self.processor, texts, [v.convert("RGB") for v in visuals], n)
        for i, stops in enumerate(until):
            for s in stops:
                if s:
                    out[i] = out[i].split(s)[0]
        return out

    def _log_stats(self, n_requests: int) -> None:
        if self.patch is None:
            return
        stats = self.patch.stats
        before = [t for s in stats for t in s.tokens_before]
        after = [t for s in stats for t in s.tokens_after]
        summary = {"model": self.label, "requests": n_requests, "compressed_rows": len(before),
                   "visual_tokens_before": sum(before) / len(before) if before else None,
                   "visual_tokens_after": sum(after) / len(after) if after else None,
                   "vtc_seconds": sum(s.seconds for s in stats)}
        logger.info(f"vtc compression: {json.dumps(summary)}")
        if self.stats_path:
            Path(self.stats_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.stats_path).write_text(json.dumps(summary, indent=1) + "\n")

    def loglikelihood(self, requests) -> list:
        raise NotImplementedError("vtc's lmms-eval model implements generate_until tasks only (MME, Video-MME, ...)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtc's lmms-eval model implements single-round generate_until tasks only")
