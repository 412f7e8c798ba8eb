"""Train the bundled toy video model (LLaVA-OneVision style) on ShapesVideo, starting from the toy LLaVA.

    python -m vtc.zoo.train_video --out vtc/zoo/checkpoints/toy-llava-onevision

Why OneVision and why from the toy LLaVA: the toy LLaVA's CLIP tower, projector and LM already see and name the
shapes and colours (the bundled one: ShapesMME 85.75 %); OneVision's video path runs that tower per frame and pools
each frame's 14x14 tokens 2x2 to 7x7, so a 32-frame clip is 32 x 49 + 1 = 1,569 visual tokens (one newline per
video), the shape of a real OneVision video at a toy scale, and its CLS token keeps ``cls`` available per frame. The
toy Qwen2-VL (64.2 % on ShapesMME, shapes at chance) would start from a weaker model.

Training sees what evaluation sees: each ShapesVideo training clip is encoded to H.264 and decoded with decord
(``load_video``, ``--frames`` uniformly), the lmms-eval Video-MME prompt with question and options after the video
(OneVision's order; the toy OneVision chat template puts a video first). ``--raw-frames`` skips the codec round
trip (the tower's features of raw and decoded frames agree to cosine 0.9995; for machines without PyAV / decord)
and ``--workers`` draws the rows in worker processes. The tower is frozen (features computed once per clip); the
LM and the projector are trained, in two phases:

- letters (text only, ~70-token rows): the correct option's words stand in for the video, so the LM learns to
  find the option that holds them and name its letter; the reply names the option's words, then its letter
  ("red B": the words are lower case in this tokenizer, so Video-MME's rule, the first capital A-D, reads the
  letter).
- video: clips, with training-only signals besides the reply: option probes (:func:`option_probe_loss`: a linear
  probe per layer at each option's last token predicts which option is the answer; with the video first, an
  option's tokens can look at it), a linear head on the answer position that predicts the answer's content
  class, the projected video tokens regressed onto :func:`cell_targets` (the word embeddings of what each pooled
  cell shows, plus its column and row), as the image stage aligns its visual tokens, and ``--letter``: extra
  weight on the reply's letter token (:func:`letter_loss`).

The bundled ``toy-llava-onevision`` (ShapesVideo test split, 480 clips, 32 frames through H.264 and decord:
**81.7 %**; motion 98.3, change 98.3, order 68.3, count 61.7 %) came from three runs of this script on one H100
(16 CPU cores; ~3 video steps of 32 clips a second, 19 minutes of training in all), each continuing the last:

    python -m vtc.zoo.train_video --device cuda --raw-frames --workers 12 --threads 4 --frames 32 --batch 32 \
        --warmup-minutes 1 --minutes 6.8 --val-every 200 --out stage1
    python -m vtc.zoo.train_video --device cuda --raw-frames --workers 12 --threads 4 --frames 32 --batch 32 \
        --init stage1 --warmup-minutes 0 --minutes 6.8 --letter 3 --val-every 200 --out stage2
    python -m vtc.zoo.train_video --device cuda --raw-frames --workers 12 --threads 4 --frames 32 --batch 32 \
        --init stage2 --warmup-minutes 0 --minutes 3.4 --lr 5e-4 --proj-lr 5e-4 --letter 3 --val-every 150 \
        --out toy-llava-onevision

Validation (96 clips): letters 83 % on text rows at step 600 (of 634); video 39.6 % after stage 1's 1,238 steps,
71.9 % after stage 2's 1,346, 81.2 % in stage 3 (logs next to the weights). The stages drew their rows from
``random.Random(4000)``; rows are now seeded by their index, so that worker and in-process draws agree: a rerun
sees other clips of the same distribution. Stage 1 showed why the letter weight:
its model named the right *content* ("red cross") for 42 of 48 validation clips but the right letter for 38 %:
the video tokens, aligned to word embeddings, distract the lookup of the option that holds those words. On 2 CPU
cores a step of 32 clips at 32 frames takes ~15 s, so the recipe's 3,328 steps would take ~14 hours there. What
2 CPU cores do reach, measured: ``--raw-frames --frames 8 --batch 16 --warmup-minutes 6 --minutes 38 --letter 3``
(44 min, 721 letter steps, 1,329 video steps at ~1.7 s) gives 76.0 % on validation at 8 frames and, on the
480-clip test split, **69.6 % when evaluated at 8 frames** (``--frames 8``: motion 87.5, change 100, order 61.7,
count 29.2 %) but 40.0 % at Video-MME's 32: its reading does not carry over to rows four times longer, and 18
more minutes at 32 frames (240 steps of 8 clips) only took validation from 33 to 46 %. What we learnt on the way:

- With the question before the video (the first recipe), the video phase stayed at chance in every run, even
  with *oracle* visual tokens (the exact :func:`cell_targets`): the LM's reading, not the tower, was the block.
  Putting the video first and adding the option probes broke that plateau.
- "What changed" is learnt first; motion and order (which need *when*) came with more steps at 32 frames.

Seeds: train 4000+, validation 5000, test 3000 (the CLI's ShapesVideo test split; never used here).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..eval.videomme_scoring import POST_PROMPT, extract_letter, videomme_prompt
from ..video import load_video, sample_indices, write_video
from .processor import LETTERS, build_llava_onevision_processor
from .shapes import COLORS, NUMBERS, SHAPES
from .shapes_video import DIRECTIONS, DURATIONS, FPS, TASKS, ShapesVideoGenerator
from .train_toy import IMAGE_SIZE, NEXT_PINPOINTS, PATCH, from_toy_llava
from .training import lr_at, run_log

TRAIN_SEED, VAL_SEED = 4000, 5000
FRAMES = 32  # Video-MME's default, what the evaluation samples
TRAIN_FRAMES = 8  # what training samples by default (rows 4x shorter)
CONTENT_FIRST = True
# every option text ShapesVideo uses: the auxiliary head's classes
CONTENTS = list(DIRECTIONS) + list(COLORS) + list(NUMBERS[1:6]) + [f"{c} {s}" for c in COLORS for s in SHAPES]


def onevision_from_llava(path: str | Path, proc) -> nn.Module:
    """A toy ``LlavaOnevisionForConditionalGeneration`` holding a toy LLaVA's weights (tower, projector, LM), with
    the embedding table grown for ``proc``'s extra tokens (``<video>``, ``A``-``D``) and ``image_newline`` set to
    the mean projected feature of a blank frame."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tok = proc.tokenizer
    model, src = from_toy_llava(path, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                image_token_id=tok.convert_tokens_to_ids("<image>"),
                                video_token_id=tok.convert_tokens_to_ids("<video>"))
    if model.config.image_token_id != src.config.image_token_id:
        raise ValueError(f"{path}: its <image> id {src.config.image_token_id} differs from the processor's "
                         f"{model.config.image_token_id}")
    model.resize_token_embeddings(len(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = False
    return model


def decoded_clip(gen: ShapesVideoGenerator, task: str, duration: str, folder: str | None, frames: int = FRAMES):
    """A clip as evaluation sees it: H.264-encoded, decoded with decord, ``frames`` sampled uniformly; returns
    (clip, decoded frames, their indices in the clip). ``folder=None``: the drawn frames at the same indices,
    without the codec round trip (the tower's features of the two agree to cosine 0.9995 on ShapesVideo; for
    machines without PyAV / decord)."""
    clip = gen.clip(task, duration)
    if folder is None:
        idx = sample_indices(len(clip.frames), frames)
        return clip, np.stack([clip.frames[t] for t in idx]), idx
    path = write_video(clip.frames, Path(folder) / "clip.mp4", fps=FPS)
    decoded, idx, _ = load_video(path, frames)
    return clip, decoded, idx


def evidence_mask(clip, idx: list[int], cell: int = 2 * PATCH) -> torch.Tensor:
    """(len(idx) * cells + 1,) bool over the video tokens: the pooled tokens (``cell``-px squares, 2x2 patches)
    that show an object in the clip's key frames (where the answer is read from); the newline is never one."""
    out = []
    for t in idx:
        f = clip.frames[t].astype(int)
        obj = (abs(f - f[0, 0]).max(-1) > 40)  # the corner is background in every ShapesVideo frame
        g = obj.shape[0] // cell
        cells = obj[: g * cell, : g * cell].reshape(g, cell, g, cell).sum((1, 3)) >= cell
        out.append(torch.from_numpy(cells.reshape(-1)) & (t in clip.key_frames))
    return torch.cat(out + [torch.zeros(1, dtype=torch.bool)])


CELL_WORDS = ("empty", "object", "left", "right", "up", "down", *COLORS, *SHAPES)  # what cell_targets sum


def cell_coefficients(clip, idx: list[int], grid: int = 7) -> np.ndarray:
    """(len(idx) * grid^2 + 1, len(CELL_WORDS)) float32: how many times each word of :data:`CELL_WORDS` enters
    each pooled video token's target (see :func:`cell_targets`; no model needed, so it runs in data workers)."""
    col = {x: i for i, x in enumerate(CELL_WORDS)}
    content = [col["empty"], col["object"]] + [col[x] for x in (*COLORS, *SHAPES)]
    side = clip.frames[idx[0]].shape[0]
    cell, n = side / grid, grid * grid
    gx = np.tile(np.arange(grid), grid) / (grid - 1)
    gy = np.repeat(np.arange(grid), grid) / (grid - 1)
    lo, hi = np.arange(grid) * cell, (np.arange(grid) + 1) * cell
    out = np.zeros((len(idx) * n + 1, len(CELL_WORDS)), np.float32)
    for k, t in enumerate(idx):
        f = out[k * n: (k + 1) * n]
        f[:, col["empty"]] = 3
        for x, v in (("left", 1 - gx), ("right", gx), ("up", 1 - gy), ("down", gy)):
            f[:, col[x]] = v
        for o in clip.layouts[t]:
            x0, y0, x1, y1 = o.box
            cover = np.outer(np.clip(np.minimum(y1, hi) - np.maximum(y0, lo), 0, None),
                             np.clip(np.minimum(x1, hi) - np.maximum(x0, lo), 0, None)).reshape(-1)
            on = cover > 0.2 * cell * cell
            f[np.ix_(on, content)] = 0  # a later object overwrites an earlier one
            f[on, col[o.color]] = f[on, col[o.shape]] = 1
            f[on, col["empty"]] = 2
            centre = min(int(o.cy // cell), grid - 1) * grid + min(int(o.cx // cell), grid - 1)
            if on[centre]:
                f[centre, col["empty"]], f[centre, col["object"]] = 1, 1
    out[-1, col["empty"]] = 4
    return out


def cell_words(embedding: torch.Tensor, tok) -> torch.Tensor:
    """(len(CELL_WORDS), hidden): the word embeddings :func:`cell_targets` sums (detached), the direction words
    scaled to norm 0.75."""
    w = embedding[tok.convert_tokens_to_ids(list(CELL_WORDS))].detach().clone()
    for i, x in enumerate(CELL_WORDS):
        if x in ("left", "right", "up", "down"):
            w[i] = w[i] * (0.75 / w[i].norm())
    return w


def cell_targets(clip, idx: list[int], embedding: torch.Tensor, tok, grid: int = 7) -> torch.Tensor:
    """(len(idx) * grid^2 + 1, hidden): what each pooled video token should look like (detached), the video
    analogue of the image stage's :func:`summary_aux.word_target`: per cell of each sampled frame the sum of the
    word embeddings of what it shows (colour, shape, 'empty' for the digit slot, 'object' on the cell holding an
    object's centre; 'empty' for each on background) plus the cell's column and row as linear codes between
    'left' / 'right' and 'up' / 'down' (each code word scaled to norm 0.75, near the trained words'); the newline's
    target is four 'empty'. A cell shows an object when its bounding box covers over 20 % of the cell."""
    w = cell_words(embedding, tok)
    return torch.from_numpy(cell_coefficients(clip, idx, grid)).to(w) @ w


def option_positions(ids: list[int], tok) -> list[int]:
    """The position of each option's last token ("A. red circle" -> 'circle') in a Video-MME prompt: where the
    training-only option probes read whether that option is the answer."""
    letters, dot = set(tok.convert_tokens_to_ids(list(LETTERS))), tok.convert_tokens_to_ids(".")
    starts = [i for i in range(len(ids) - 1) if ids[i] in letters and ids[i + 1] == dot]
    if len(starts) != len(LETTERS):
        raise ValueError(f"expected {len(LETTERS)} options in the prompt, found {len(starts)}")
    end = tok.convert_tokens_to_ids("answer")  # the post-prompt ("Answer with the option's letter ...")
    ends = starts[1:] + [next(i for i in range(starts[-1], len(ids)) if ids[i] == end)]
    return [e - 1 for e in ends]


def pixel_values(proc, frames) -> torch.Tensor:
    """(n, 3, H, W) float: the video processor's pixel values for RGB uint8 frames (n, H, W, 3) (numpy or a
    tensor, on any device). Frames already at the processor's size are only rescaled and normalised, on their own
    device, as the processor does (equal to it, tested); others go through the processor."""
    vp = proc.video_processor
    x = torch.as_tensor(frames)
    if tuple(x.shape[1:3]) != (vp.size.height, vp.size.width):
        return vp([list(x.cpu().numpy())], return_tensors="pt")["pixel_values_videos"][0]
    mean = torch.tensor(vp.image_mean, device=x.device)[:, None, None]
    std = torch.tensor(vp.image_std, device=x.device)[:, None, None]
    return (x.permute(0, 3, 1, 2).float() * vp.rescale_factor - mean) / std


def tower_features(model, proc, frames) -> torch.Tensor:
    """(n, patches, width): the frozen tower's feature-layer patch tokens for each frame (what the projector reads)."""
    pv = pixel_values(proc, torch.as_tensor(np.asarray(frames)).to(model.device))
    with torch.no_grad():
        hs = model.model.vision_tower(pv.to(model.dtype), output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:]


def project(model, tower: torch.Tensor) -> torch.Tensor:
    """(n * 49 + 1, hidden): projector, OneVision's 2x2 pooling and the newline, as ``get_video_features`` does
    (differentiable in the projector)."""
    m = model.model
    f = m.apply_pooling(m.multi_modal_projector(tower))
    return torch.cat([f.flatten(0, 1), m.image_newline[None].to(f.dtype)])


def _content(clip) -> str:
    """The text of the clip's correct option ("red", "left", "three", "red circle")."""
    return clip.options[LETTERS.index(clip.answer)].split(". ", 1)[1]


def encode(proc, clip, n_video: int, answer: bool, video_text: str | None = None,
           content_first: bool = False) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template, video placeholders expanded) and labels (only the reply and eos are learnt).

    ``video_text``: words standing in for the video (the letter warm-up), instead of ``n_video`` placeholders.
    ``content_first``: the reply names the option's text, then its letter ("red B"; Video-MME's extraction takes
    the first capital A-D, and the toy tokenizer writes every other word in lower case)."""
    tok = proc.tokenizer
    conv = [{"role": "user", "content": [{"type": "video"},
                                         {"type": "text", "text": videomme_prompt(clip.question, clip.options)}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    text = text.replace(proc.video_token, video_text if video_text is not None else proc.video_token * n_video)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    if answer:
        reply = clip.answer if not content_first else f"{_content(clip)} {clip.answer}"
        target = tok(" " + reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = ids + target, labels + target
    return ids, labels


@dataclass
class Prepared:
    """The model-free part of a training row (:func:`prepare`, cheap to build in a worker process): the clip
    (its frames dropped), the sampled frames (None for a letter warm-up row), their :func:`cell_coefficients` and
    :func:`evidence_mask`, the token ids and labels, each option's last token and the answer's index / content
    class."""

    clip: object
    frames: np.ndarray | None
    coef: np.ndarray | None
    evidence: torch.Tensor
    ids: list[int]
    labels: list[int]
    options: list[int]
    correct: int
    content: int


_WORKER: dict = {}


def prepare(job: tuple[int, int, bool, bool, bool], proc=None) -> Prepared:
    """Draw one row from ``job`` = (seed, frames, raw, text_only, evidence): a ShapesVideo clip of a random task
    and duration (text-only: a short one, whose answer's words stand in for the video), its frames through the
    codec (or raw, see :func:`decoded_clip`) and everything but the model's features. ``evidence``: compute
    :func:`evidence_mask` (only the evidence loss reads it; most of a row's cost), else an all-False mask."""
    seed, frames, raw, text_only, evidence = job
    if proc is None:
        if "proc" not in _WORKER:
            _WORKER["proc"] = build_llava_onevision_processor(IMAGE_SIZE, PATCH, NEXT_PINPOINTS)
        proc = _WORKER["proc"]
    rng, gen = random.Random(seed), ShapesVideoGenerator(seed)
    task, duration = rng.choice(list(TASKS)), rng.choice(list(DURATIONS))
    if text_only:
        clip, decoded, coef, mask = gen.clip(task, "short"), None, None, torch.zeros(0, dtype=torch.bool)
        n_video = 0
    else:
        with contextlib.nullcontext(None) if raw else tempfile.TemporaryDirectory() as folder:
            clip, decoded, idx = decoded_clip(gen, task, duration, folder, frames)
        coef = cell_coefficients(clip, idx)
        n_video = len(coef)
        mask = evidence_mask(clip, idx) if evidence else torch.zeros(n_video, dtype=torch.bool)
    answer_text = _content(clip)
    ids, labels = encode(proc, clip, n_video, answer=True, video_text=answer_text if text_only else None,
                         content_first=CONTENT_FIRST)
    correct = LETTERS.index(clip.answer)
    clip.frames = []  # not needed any more; keeps the row small between processes
    return Prepared(clip, decoded, coef, mask, ids, labels, option_positions(ids, proc.tokenizer), correct,
                    CONTENTS.index(answer_text))


class Sample:
    """One training / validation row: a :class:`Prepared` row plus its video features on the model's device.

    Video rows keep the frozen tower's features (``tower``) and their :func:`cell_targets` (``target``);
    ``feats`` (what the LM sees) is re-projected by :meth:`refresh` while the projector trains; letter rows have
    no features."""

    def __init__(self, model, prep: Prepared, tower: torch.Tensor | None = None, words: torch.Tensor | None = None):
        self.clip, self.ids, self.labels = prep.clip, prep.ids, prep.labels
        self.options, self.correct, self.content = prep.options, prep.correct, prep.content
        self.evidence = prep.evidence
        self.tower = tower
        self.target = None if tower is None else torch.from_numpy(prep.coef).to(words) @ words
        self.feats = torch.zeros(0, model.config.text_config.hidden_size, device=model.device)
        self.refresh(model)

    def refresh(self, model, grad: bool = False) -> None:
        """Re-project the stored tower features with the current projector (with autograd when ``grad``)."""
        if self.tower is not None:
            with torch.set_grad_enabled(grad):
                self.feats = project(model, self.tower)


def make_samples(model, proc, preps: list[Prepared]) -> list[Sample]:
    """Samples from prepared rows, the tower run once over all their frames."""
    video = [p for p in preps if p.frames is not None]
    towers = iter([])
    if video:
        towers = iter(tower_features(model, proc, np.concatenate([p.frames for p in video])).split(
            [len(p.frames) for p in video]))
    words = cell_words(model.get_input_embeddings().weight, proc.tokenizer)
    return [Sample(model, p, next(towers) if p.frames is not None else None, words) for p in preps]


class RowStream:
    """Prepared rows from seeded jobs (row ``i`` of a stream always gets the same seed), drawn by ``workers``
    processes while the trainer works (0: in the trainer, when asked); ``evidence``: rows carry their
    :func:`evidence_mask`."""

    def __init__(self, seed: int, frames: int, raw: bool, workers: int = 0, evidence: bool = False):
        import multiprocessing as mp

        self.seed, self.frames, self.raw, self.evidence, self.count = seed, frames, raw, evidence, 0
        self.pool = mp.get_context("spawn").Pool(workers) if workers > 0 else None
        self.pending = None  # (first row, n, text_only, the rows being drawn)

    def _jobs(self, start: int, n: int, text_only: bool) -> list[tuple[int, int, bool, bool, bool]]:
        seeds = [(self.seed * 1_000_003 + i) % 2 ** 31 for i in range(start, start + n)]
        return [(s, self.frames, self.raw, text_only, self.evidence) for s in seeds]

    def take(self, n: int, text_only: bool = False) -> list[Prepared]:
        """The next ``n`` rows; with workers, the ``n`` after them are drawn meanwhile."""
        start, self.count = self.count, self.count + n
        if self.pool is None:
            return [prepare(j) for j in self._jobs(start, n, text_only)]
        if self.pending is not None and self.pending[:3] == (start, n, text_only):
            rows = self.pending[3].get()
        else:
            rows = self.pool.map(prepare, self._jobs(start, n, text_only))
        self.pending = (self.count, n, text_only, self.pool.map_async(prepare, self._jobs(self.count, n, text_only)))
        return rows

    def close(self) -> None:
        if self.pool:
            self.pool.terminate()


def _embed_rows(model, proc, samples: list[Sample], rows: list[list[int]], left: bool = False):
    """Pad token-id rows (on the right, or on the left for generation) and embed them with each sample's video
    features scattered into its placeholders; returns (ids, attention mask, embeddings)."""
    width, dev = max(len(r) for r in rows), model.device
    ids = torch.full((len(rows), width), proc.tokenizer.pad_token_id, device=dev)
    am = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        am[i, span] = 1
    embeds = model.get_input_embeddings()(ids)
    feats = torch.cat([s.feats for s in samples]).to(embeds.dtype)
    if len(feats):
        embeds = embeds.masked_scatter((ids == model.config.video_token_id)[..., None], feats)
    return ids, am, embeds


def batch_forward(model, proc, samples: list[Sample], layer: int, **kw):
    """Right-padded rows with the video features scattered into their placeholders; returns (output, labels,
    evidence, attention mask) where evidence (rows, L) marks the video tokens of :func:`evidence_mask`."""
    ids, am, embeds = _embed_rows(model, proc, samples, [s.ids for s in samples])
    lab = torch.full_like(ids, -100)
    for i, s in enumerate(samples):
        lab[i, : len(s.labels)] = torch.tensor(s.labels)
    out = model(inputs_embeds=embeds, attention_mask=am, labels=lab, output_hidden_states=layer >= 0, **kw)
    evidence = torch.zeros_like(ids, dtype=torch.bool)
    evidence[ids == model.config.video_token_id] = torch.cat([s.evidence for s in samples]).to(ids.device)
    return out, lab, evidence, am


def _prompt_embeds(model, proc, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt embeddings (the rows' ids up to the answer, video features scattered in) and mask."""
    prompts = [s.ids[: next(i for i, x in enumerate(s.labels) if x != -100)] for s in samples]
    _, am, embeds = _embed_rows(model, proc, samples, prompts, left=True)
    return embeds, am


@torch.no_grad()
def accuracy(model, proc, samples: list[Sample], batch: int = 8) -> dict[str, float]:
    """Greedy replies (up to 4 tokens) scored with Video-MME's letter extraction, overall and per task."""
    model.eval()
    hits: dict[str, list[int]] = {t: [] for t in TASKS}
    for i in range(0, len(samples), batch):
        chunk = samples[i: i + batch]
        embeds, am = _prompt_embeds(model, proc, chunk)
        out = model.generate(inputs_embeds=embeds, attention_mask=am, max_new_tokens=4, do_sample=False)
        for s, reply in zip(chunk, proc.batch_decode(out, skip_special_tokens=True)):
            hits[s.clip.task].append(int(extract_letter(reply) == s.clip.answer))
    model.train()
    res = {t: sum(h) / max(1, len(h)) for t, h in hits.items()}
    res["overall"] = sum(sum(h) for h in hits.values()) / max(1, sum(len(h) for h in hits.values()))
    return res


class AnswerAttention:
    """Captures q, k and RoPE of chosen LM layers during an ordinary (sdpa) forward, so the few attention rows the
    evidence loss needs are computed from q/k afterwards (:func:`vtc.core.scores.attention_rows`) instead of
    materialising every layer's (L, L) map in eager attention."""

    def __init__(self, lm, layers: tuple[int, ...]):
        import sys

        self.layers, self.grab, self.handles = layers, {}, []
        for j in layers:
            attn = lm.layers[j].self_attn
            self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
            self.handles += [
                attn.q_proj.register_forward_hook(lambda m, i, o, j=j: self.grab.__setitem__((j, "q"), o)),
                attn.k_proj.register_forward_hook(lambda m, i, o, j=j: self.grab.__setitem__((j, "k"), o)),
                attn.register_forward_pre_hook(
                    lambda m, a, kw, j=j: self.grab.__setitem__((j, "rope"), kw["position_embeddings"]),
                    with_kwargs=True),
            ]

    def rows(self, pos: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(J, B, H, L) attention of each row's position ``pos`` over all keys, per captured layer."""
        from ..core.scores import attention_rows

        out = []
        b_idx = torch.arange(len(pos), device=pos.device)
        for j in self.layers:
            q, k = self.grab[(j, "q")], self.grab[(j, "k")]
            b, n, _ = q.shape
            q = q.view(b, n, self.heads, -1).transpose(1, 2)
            k = k.view(b, n, self.kv_heads, -1).transpose(1, 2)
            cos, sin = self.grab[(j, "rope")]
            q, k = self.rope(q, k, cos, sin)
            keys = torch.arange(n, device=pos.device)[None, :]
            allowed = (keys <= pos[:, None]) & attention_mask.bool()
            out.append(attention_rows(q[b_idx, :, pos][:, :, None], k, q.shape[-1] ** -0.5,
                                      allowed[:, None, None, :])[:, :, 0])
        self.grab.clear()
        return torch.stack(out)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def evidence_loss(att: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass (mean over heads) that the answer position puts on the evidence tokens, averaged
    over layers and rows with evidence; ``att`` (J, B, H, L) from :meth:`AnswerAttention.rows`."""
    has = evidence.any(1)
    mass = (att * evidence[None, :, None, :]).sum(-1).mean(2)  # (J, B)
    return -torch.log(mass[:, has] + 1e-4).mean()


def letter_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row's letter token: the label before the last (the reply ends "<letter> </s>")."""
    rows = torch.arange(len(labels), device=labels.device)
    last = (labels != -100).float().cumsum(1).argmax(1)  # the eos label's position
    return F.cross_entropy(logits[rows, last - 2], labels[rows, last - 1])


def option_probe_loss(probes: nn.ModuleList, hidden: tuple[torch.Tensor, ...], samples: list[Sample]) -> torch.Tensor:
    """Cross-entropy of "which option is the answer", read by a linear probe at each option's last token from the
    outputs of LM layers 1, 2, ... (one probe per layer). With the video before the question, an option's tokens
    can attend to the video; the probes reward that per-option match directly, which the answer position then
    only has to look up (the image stage's per-visual-token relevance probe, moved to the options)."""
    rows = torch.arange(len(samples), device=hidden[0].device)[:, None]
    pos = torch.tensor([s.options for s in samples], device=hidden[0].device)
    target = torch.tensor([s.correct for s in samples], device=hidden[0].device)
    return sum(F.cross_entropy(probe(hidden[j + 1][rows, pos]).squeeze(-1), target) for j, probe in enumerate(probes))


def train(model, proc, minutes: float, batch: int, lr: float, aux: float, log, val: list[Sample],
          val_every: int, seed: int, warmup_minutes: float = 0.0, warmup_batch: int = 64,
          attend: float = 0.0, probe: float = 1.0, proj_lr: float = 0.0, align: float = 0.0,
          frames: int = FRAMES, raw: bool = False, workers: int = 0, on_best=None, letter: float = 0.0) -> float:
    """Train the LM (and the projector when ``proj_lr`` > 0; tower and newline frozen): first ``warmup_minutes``
    on text-only letter rows, then ``minutes`` on freshly drawn clips of ``frames`` frames; returns the best
    validation accuracy (whose weights are kept). Losses: the reply, ``aux`` x the answer-content head,
    ``probe`` x :func:`option_probe_loss`, on video rows ``align`` x the MSE of the projected video tokens to
    :func:`cell_targets`, ``attend`` x :func:`evidence_loss` and ``letter`` x the reply's letter token's
    cross-entropy (the option lookup after the content words, which the video tokens' word-like features
    distract: one toy model named the right content for 87.5 % of validation clips and the right letter for
    38 %). ``raw``: frames without the codec round trip;
    ``workers``: processes drawing the rows; ``on_best()`` is called on each new best validation accuracy."""
    stream = RowStream(seed, frames, raw, workers, evidence=attend > 0)
    lm = model.model.language_model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lm.parameters():
        p.requires_grad_(True)
    proj = list(model.model.multi_modal_projector.parameters()) if proj_lr > 0 else []
    for p in proj:
        p.requires_grad_(True)
    n_layers, hidden = lm.config.num_hidden_layers, lm.config.hidden_size
    layer = max(1, n_layers - 1)
    head = nn.Linear(hidden, len(CONTENTS)).to(model.device)
    probes = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(1, n_layers)]).to(model.device)
    params = list(lm.parameters()) + list(head.parameters()) + list(probes.parameters())
    groups = [{"params": params, "base": lr}] + ([{"params": proj, "base": proj_lr}] if proj else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    best = (-1.0, None)
    model.train()

    def validate(rows: list[Sample]) -> dict[str, float]:
        for s in rows if proj else []:  # re-projected only when the projector has moved
            s.refresh(model)
        return accuracy(model, proc, rows)

    phases = [("letters", warmup_minutes, warmup_batch, True), ("video", minutes, batch, False)]
    for name, phase_minutes, phase_batch, text_only in phases:
        if phase_minutes <= 0:
            continue
        if text_only:
            text_val = make_samples(model, proc, [prepare((VAL_SEED + 1 + i, frames, True, True, False), proc)
                                                  for i in range(200)])
        # q/k of all layers but the first are captured only in the phase whose loss reads them
        capture = AnswerAttention(lm, tuple(range(1, n_layers))) if attend > 0 and not text_only else None
        step, t0 = 0, time.time()
        while time.time() - t0 < phase_minutes * 60:
            samples = make_samples(model, proc, stream.take(phase_batch, text_only))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, (time.time() - t0) / (phase_minutes * 60), g["base"])
            for s in samples if proj else []:  # (a frozen projector's features were computed with the sample)
                s.refresh(model, grad=True)
            out, lab, evidence, am = batch_forward(model, proc, samples, layer)
            loss, logs = out.loss, {}
            pos = (lab != -100).float().argmax(1) - 1  # the position that predicts the reply's first token
            if capture is not None:
                logs["attend"] = evidence_loss(capture.rows(pos, am), evidence)
                loss = loss + attend * logs["attend"]
            if letter > 0:
                logs["letter"] = letter_loss(out.logits, lab)
                loss = loss + letter * logs["letter"]
            if aux > 0:
                h = out.hidden_states[layer][torch.arange(len(samples)), pos]
                target = torch.tensor([s.content for s in samples], device=model.device)
                logs["aux"] = F.cross_entropy(head(h), target)
                loss = loss + aux * logs["aux"]
            if probe > 0:
                logs["probe"] = option_probe_loss(probes, out.hidden_states, samples)
                loss = loss + probe * logs["probe"]
            if align > 0 and not text_only:  # the newline (last token) is not the projector's
                logs["align"] = sum(F.mse_loss(s.feats[:-1], s.target[:-1].to(s.feats.device))
                                    for s in samples) / len(samples)
                loss = loss + align * logs["align"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + proj, 1.0)
            opt.step()
            if step % 25 == 0:
                log(f"{name} step {step} loss {out.loss.item():.4f} "
                    + " ".join(f"{k} {v.item():.4f}" for k, v in logs.items()) + f" ({time.time() - t0:.0f}s)")
            if val_every and step and step % val_every == 0:
                acc = validate(text_val if text_only else val)
                log(f"{name} step {step} val {json.dumps({k: round(v, 3) for k, v in acc.items()})}")
                if not text_only and acc["overall"] > best[0]:
                    best = (acc["overall"], {k: v.detach().clone() for k, v in model.state_dict().items()})
                    if on_best is not None:
                        on_best()
            step += 1
        if capture is not None:
            capture.remove()
        log(f"{name}: {step} steps")
    stream.close()
    acc = validate(val)["overall"]
    log(f"final val {acc:.3f}")
    if best[1] is not None and best[0] > acc:
        model.load_state_dict(best[1])
        acc = best[0]
    for s in val if proj else []:
        s.refresh(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return acc


def validation_set(model, proc, n: int, frames: int = FRAMES, raw: bool = False) -> list[Sample]:
    """``n`` validation rows (seeded by VAL_SEED; never drawn in training)."""
    return make_samples(model, proc, [prepare((VAL_SEED + i, frames, raw, False, False), proc) for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-llava", default=str(Path(__file__).parent / "checkpoints" / "toy-llava"),
                    help="the toy LLaVA to start from")
    ap.add_argument("--init", help="a toy video checkpoint to continue instead")
    ap.add_argument("--out", default=str(Path(__file__).parent / "checkpoints" / "toy-llava-onevision"))
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=TRAIN_FRAMES, help="frames sampled uniformly per training clip")
    ap.add_argument("--warmup-minutes", type=float, default=8,
                    help="text-only letter warm-up before the video phase (0: off)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the answer-content head (0: off)")
    ap.add_argument("--attend", type=float, default=0.0,
                    help="weight of the evidence-attention loss in the video phase (0: off)")
    ap.add_argument("--probe", type=float, default=1.0, help="weight of the option probes (0: off)")
    ap.add_argument("--proj-lr", type=float, default=1e-3, help="projector learning rate (0: frozen)")
    ap.add_argument("--align", type=float, default=10.0,
                    help="weight of the projected video tokens' MSE to cell_targets (needs --proj-lr > 0)")
    ap.add_argument("--letter", type=float, default=0.0, help="extra weight of the reply's letter token")
    ap.add_argument("--val", type=int, default=96, help="validation clips")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="processes drawing training rows (0: in the trainer)")
    ap.add_argument("--raw-frames", action="store_true",
                    help="skip the H.264 round trip (no PyAV / decord needed; features agree to cosine 0.9995)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    log = run_log(out)

    if args.init:
        from ..adapters.hf import LOAD_KWARGS
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.init, **LOAD_KWARGS)
        proc = AutoProcessor.from_pretrained(args.init)
    else:
        proc = build_llava_onevision_processor(IMAGE_SIZE, PATCH, NEXT_PINPOINTS)
        model = onevision_from_llava(args.from_llava, proc)
    model.set_attn_implementation("sdpa")
    model.to(args.device)
    t0 = time.time()
    val = validation_set(model, proc, args.val, args.frames, args.raw_frames)
    log(f"validation set: {len(val)} clips ({time.time() - t0:.0f}s); before training: "
        f"{json.dumps({k: round(v, 3) for k, v in accuracy(model, proc, val).items()})}")
    def save(acc: float | None = None) -> None:
        model.save_pretrained(out)
        proc.save_pretrained(out)
        (out / "training.json").write_text(json.dumps({
            "from_llava": None if args.init else args.from_llava, "init": args.init, "minutes": args.minutes,
            "batch": args.batch, "warmup_minutes": args.warmup_minutes, "lr": args.lr, "aux": args.aux,
            "attend": args.attend, "probe": args.probe, "proj_lr": args.proj_lr, "align": args.align,
            "letter": args.letter, "seed": args.seed, "train_seed": TRAIN_SEED + args.seed, "val_seed": VAL_SEED,
            "val_clips": args.val,
            "val_accuracy": acc, "frames": args.frames, "raw_frames": args.raw_frames,
            "device": str(model.device), "workers": args.workers, "threads": args.threads,
            "post_prompt": POST_PROMPT,
        }, indent=2))

    acc = train(model, proc, args.minutes, args.batch, args.lr, args.aux, log, val, args.val_every,
                TRAIN_SEED + args.seed, warmup_minutes=args.warmup_minutes, attend=args.attend, probe=args.probe,
                proj_lr=args.proj_lr, align=args.align, frames=args.frames, raw=args.raw_frames,
                workers=args.workers, on_best=save, letter=args.letter)  # the best so far is on disk, in case
    model.eval()
    save(acc)
    log(f"saved to {out} (val {acc:.3f}, {(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
