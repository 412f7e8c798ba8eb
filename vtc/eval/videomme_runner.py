"""Batched, resumable Video-MME evaluation of a (possibly patched) video model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


from ..video import load_video
from . import LMMS_EVAL_VERSION
from .generation import video_replies
from .runner import compression_summary, is_main_process, resolve_method, run_identity, run_resumable, save_results
from .videomme_data import VideoMMERecord
from .videomme_scoring import POST_PROMPT, extract_letter, videomme_prompt, videomme_scores


def _generate(model, processor, batch: list[VideoMMERecord], frames: int, max_new_tokens: int,
              post_prompt: str) -> list[str]:
    texts = [videomme_prompt(r.question, r.options, post_prompt) for r in batch]
    videos = [list(load_video(r.video_path, frames)[0]) for r in batch]
    return video_replies(model, processor, texts, videos, max_new_tokens)


def evaluate_videomme(
    model: Any,
    processor: Any,
    records: Sequence[VideoMMERecord],
    out_dir: str | Path | None = None,
    frames: int = 32,
    method: str | None = None,
    ratio: float | None = None,
    tokens: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 16,
    post_prompt: str = POST_PROMPT,
    config: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **hyperparameters: Any,
) -> dict:
    """Video-MME (w/o subtitles) with lmms-eval's prompt and letter extraction, ``frames`` sampled uniformly.

    With ``method`` the model is patched for the run and unpatched after; predictions go to
    ``out_dir/predictions.jsonl`` as they come (resumable) and ``out_dir/results.json`` gets the config, scores
    (overall and by duration / task type / domain), compression stats and predictions."""
    built = resolve_method(method, ratio, tokens, hyperparameters)
    if frames < 1:
        raise ValueError(f"frames must be >= 1; got {frames}")
    processor.tokenizer.padding_side = "left"
    out = Path(out_dir) if out_dir else None
    settings = {"frames": frames, "max_new_tokens": max_new_tokens,
                "prompt": f"lmms-eval {LMMS_EVAL_VERSION} Video-MME (w/o subtitles)", "post_prompt": post_prompt}
    identity = run_identity(model, "videomme", built, records, settings) if out else {}
    preds, stats, t_gen = run_resumable(
        model, records, lambda r: r.question_id,
        lambda b: _generate(model, processor, b, frames, max_new_tokens, post_prompt),
        lambda r, p: {"question_id": r.question_id, "videoID": r.videoID, "duration": r.duration,
                      "domain": r.domain, "sub_category": r.sub_category, "task_type": r.task_type,
                      "answer": r.answer, "prediction": p,
                      "extracted": extract_letter(p)},
        out, built, identity, batch_size, "Video-MME", progress, overwrite)
    if not is_main_process():
        return {}
    return save_results(out, {"method": method or "none", "ratio": ratio, "tokens": tokens,
                              "hyperparameters": hyperparameters, "batch_size": batch_size, **settings,
                              **({"identity": identity} if identity else {}), **(config or {})},
                        videomme_scores(preds), compression_summary(preds, stats, method, t_gen), preds)
