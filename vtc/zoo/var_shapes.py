"""Class-conditional synthetic images for the toy VAR: one object on a light background, class = shape x colour.

16 classes (4 shapes x 4 colours), drawn with PIL at 64 px with a random size, position and background shade, so a
class fixes semantics while layout varies. Seeded: ``image(c, seed)`` is the same picture everywhere.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from .shapes import COLORS, SHAPES, Obj, _draw

VAR_COLORS = ("red", "green", "blue", "yellow")
NUM_CLASSES = len(SHAPES) * len(VAR_COLORS)
CANVAS = 64
TRAIN_SEED, TEST_SEED = 1_000, 9_000_000  # image seeds: training from TRAIN_SEED, held-out from TEST_SEED


def class_name(c: int) -> str:
    if not 0 <= c < NUM_CLASSES:
        raise ValueError(f"class must be in [0, {NUM_CLASSES}); got {c}")
    return f"{VAR_COLORS[c % len(VAR_COLORS)]} {SHAPES[c // len(VAR_COLORS)]}"


def image(c: int, seed: int, canvas: int = CANVAS) -> Image.Image:
    """Class ``c``'s picture number ``seed``."""
    class_name(c)
    rng = random.Random(seed * 7919 + c)
    img = Image.new("RGB", (canvas, canvas), tuple(rng.randint(225, 255) for _ in range(3)))
    size = rng.randint(canvas * 5 // 16, canvas * 5 // 8)
    x, y = rng.randint(2, canvas - size - 2), rng.randint(2, canvas - size - 2)
    obj = Obj(SHAPES[c // len(VAR_COLORS)], VAR_COLORS[c % len(VAR_COLORS)], "large", (x, y, x + size, y + size))
    jitter = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[obj.color])
    _draw(ImageDraw.Draw(img), obj, fill=jitter)
    return img


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1] (the VQ-VAE's range)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def batch(classes: list[int], seeds: list[int]) -> torch.Tensor:
    return to_tensor([image(c, s) for c, s in zip(classes, seeds)])


def split(n_per_class: int, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of every class (train or held-out test seeds): images in [-1, 1] and labels."""
    base = TEST_SEED if test else TRAIN_SEED
    labels = [c for c in range(NUM_CLASSES) for _ in range(n_per_class)]
    seeds = [base + i for _ in range(NUM_CLASSES) for i in range(n_per_class)]
    return batch(labels, seeds), torch.tensor(labels)
