"""Training-only auxiliary heads for the toy VQA stage (not part of the shipped checkpoint).

A from-scratch LM answering ShapesMME yes/no questions sits on a long plateau: the answer needs the question's
attributes *and* the image's content at the answer position, and under the near-uniform attention of a fresh
model each arrives diluted ~200x, so neither attention pattern is rewarded before the other exists. Linear heads
on the answer position's hidden states that predict each factor on its own (what the question asks: colour,
shape, number, digit, relation; what the scene holds: colours and shapes present, per-shape counts, digit,
x-position of each shape) reward both attention patterns independently and break the plateau.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapes import COLORS, NUMBERS, SHAPES, Scene, plural

_C, _S = list(COLORS), list(SHAPES)
_PLURAL = {plural(s): s for s in SHAPES}
HEADS = {"present": len(_C) + len(_S), "xpos": len(_S), "digit": 11, "count": 6 * len(_S), "q_color": len(_C) + 1,
         "q_shape": len(_S) + 1, "q_shape2": len(_S) + 1, "q_number": len(NUMBERS) + 1, "q_digit": 11,
         "q_relation": 3}
_QUESTION_KEYS = ("q_color", "q_shape", "q_shape2", "q_number", "q_digit", "q_relation")


def summary_targets(question: str, scene: Scene, canvas: int) -> dict[str, torch.Tensor | int]:
    """Targets for one (question, scene): scene summary and question parse (0 = not asked)."""
    t: dict = {"present": torch.zeros(len(_C) + len(_S)), "xpos": torch.zeros(len(_S)), "xmask": torch.zeros(len(_S)),
               "count": torch.zeros(len(_S), dtype=torch.long), **{k: 0 for k in _QUESTION_KEYS}}
    for o in scene.objects:
        s = _S.index(o.shape)
        t["present"][_C.index(o.color)] = t["present"][len(_C) + s] = 1.0
        t["xpos"][s] += o.cx / canvas
        t["xmask"][s] += 1.0
        t["count"][s] += 1
    t["xpos"] = t["xpos"] / t["xmask"].clamp(min=1)  # mean x of each shape's objects
    t["xmask"] = (t["xmask"] > 0).float()
    t["count"] = t["count"].clamp(max=5)
    t["digit"] = 0 if scene.digit is None else int(scene.digit) + 1
    q = question
    if m := re.match(r"Is there an? (\w+) object in", q):
        t["q_color"] = _C.index(m[1]) + 1
    elif m := re.match(r"Is there an? (\w+) in", q):
        t["q_shape"] = _S.index(m[1]) + 1
    elif m := re.match(r"Are there (\w+) (\w+) in", q):
        t["q_number"], t["q_shape"] = NUMBERS.index(m[1]) + 1, _S.index(_PLURAL[m[2]]) + 1
    elif m := re.match(r"Is the (\w+) on the (left|right) of the (\w+)\?", q):
        t["q_shape"], t["q_shape2"] = _S.index(m[1]) + 1, _S.index(m[3]) + 1
        t["q_relation"] = 1 if m[2] == "left" else 2
    elif m := re.match(r"Is the number (\d) written", q):
        t["q_digit"] = int(m[1]) + 1
    return t


class SummaryHeads(nn.Module):
    """One set of linear heads per probed LM layer (:meth:`loss` sums their losses), plus a per-visual-token
    relevance probe (:meth:`relevance_loss`)."""

    def __init__(self, hidden: int, n_layers: int):
        super().__init__()
        self.sets = nn.ModuleList([nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
                                   for _ in range(n_layers)])
        self.relevance = nn.Linear(hidden, 1)

    def relevance_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden: (rows, N, hidden) states of the visual tokens; targets: (rows, N) 0/1. Positives are rare,
        so they are weighted up (x10)."""
        logits = self.relevance(hidden).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=logits.new_tensor(10.0))

    def loss(self, hidden: list[torch.Tensor], targets: list[dict]) -> torch.Tensor:
        """hidden: one (rows, hidden) tensor per probed layer; targets: one dict per row."""
        dev = hidden[0].device
        stack = {k: torch.stack([t[k] for t in targets]).to(dev) for k in ("present", "xpos", "xmask", "count")}
        ints = {k: torch.tensor([t[k] for t in targets], device=dev) for k in ("digit", *_QUESTION_KEYS)}
        total = torch.zeros((), device=dev)
        for heads, h in zip(self.sets, hidden):
            total = total + F.binary_cross_entropy_with_logits(heads["present"](h), stack["present"])
            err = (torch.sigmoid(heads["xpos"](h)) - stack["xpos"]) ** 2 * stack["xmask"]
            total = total + 10 * err.sum() / stack["xmask"].sum().clamp(min=1)
            counts = heads["count"](h).view(-1, len(_S), 6).flatten(0, 1)
            total = total + F.cross_entropy(counts, stack["count"].flatten())
            for k, v in ints.items():
                total = total + F.cross_entropy(heads[k](h), v)
        return total


def relevance_targets(question: str, labels: torch.Tensor) -> torch.Tensor:
    """(N,) 0/1: the visual tokens the question is about, from per-patch labels (colour, shape, digit, ...) as
    built by ``train_toy.patch_labels``: the asked shape's (or colour's) patches, both shapes of a position
    question, the digit's patches when it is the asked digit. A linear probe on the image tokens' hidden states
    learns this per-token match, which the answer position then only has to detect."""
    colour, shape, digit = labels[0], labels[1], labels[2]
    t = summary_targets(question, Scene([]), 1)
    if t["q_digit"]:
        rel = digit == t["q_digit"]
    elif t["q_color"]:
        rel = colour == t["q_color"]
    elif t["q_shape"]:
        second = (shape == t["q_shape2"]) if t["q_shape2"] else torch.zeros_like(shape, dtype=torch.bool)
        rel = (shape == t["q_shape"]) | second
    else:
        rel = torch.zeros_like(shape, dtype=torch.bool)
    return rel.float()


def word_target(labels: torch.Tensor, embedding: torch.Tensor, word_ids: list[list[int]],
                x_words: tuple[int, int] | None = None) -> torch.Tensor:
    """(rows, N, hidden): for each patch, the sum of the LM word embeddings of what it shows (detached).

    labels: (rows, k, N) per-patch class ids (0 = none) for k attributes (e.g. ``train_toy.patch_labels``' colour,
    shape, digit and centre rows); embedding: (vocab, hidden) LM input embeddings; word_ids[a]: the token ids of
    attribute ``a``'s classes, the 'none' word first. A background patch's target is the sum of the 'none'
    words. ``x_words`` = (left, right) token ids adds the patch's column as a linear code on a square grid,
    (1 - x) * left + x * right with x in [0, 1] from the leftmost to the rightmost column."""
    target = sum(embedding[ids][labels[:, a]] for a, ids in enumerate(word_ids))
    if x_words is not None:
        grid = math.isqrt(labels.shape[-1])
        x = (torch.arange(labels.shape[-1], device=labels.device) % grid).float() / (grid - 1)
        left, right = embedding[x_words[0]], embedding[x_words[1]]
        target = target + (1 - x)[:, None] * left + x[:, None] * right
    return target.detach()


def word_alignment_loss(feats: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor,
                        word_ids: list[list[int]], x_words: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean squared error between each projected visual token (feats: (rows, N, hidden)) and
    :func:`word_target`, so a visual token *is* (close to) the words a question uses for it.

    A cross-entropy over the dot products with those words (the previous form) only asks for the right
    argmax: projector outputs reached 99% colour-word accuracy that way, yet a fresh LM stayed at chance on
    colour-only questions for 600 steps. Regressed onto the embeddings themselves (after
    ``train_toy.align_projector``), the same LM learns them to 100% in 400 steps; with the embeddings as
    oracle visual tokens it learns them too, so what the LM needed was visual tokens in the word space."""
    return F.mse_loss(feats, word_target(labels, embedding, word_ids, x_words))


def word_spread_loss(embedding: torch.Tensor, ids: list[int], max_cos: float = 0.2) -> torch.Tensor:
    """Mean of relu(cos - ``max_cos``)^2 over the pairs of the words ``ids`` (e.g. the colour words): pushes apart
    word embeddings that training let collapse onto one shared direction. In the toy LLaVA the colour words
    ended at cosine 0.6-0.8 with each other (shapes 0.3-0.4), so the colour a question names, and the colour
    aligned visual tokens carry, differed only in a small residual."""
    e = F.normalize(embedding[ids], dim=-1)
    cos = e @ e.T
    pairs = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
    return F.relu(cos[pairs] - max_cos).pow(2).mean()
