"""ShapesVideo: a seeded synthetic Video-MME, clips drawn with PIL whose questions need time to answer.

Four task types, each a 4-option multiple-choice question (chance 25%):
motion direction ("Action Recognition"), order of appearance ("Temporal Reasoning"), counting objects that
flash on and off ("Counting Problem") and what an object changes into ("Temporal Perception": its colour at the
end, while the first half shows another). Clips come in Video-MME's three duration buckets (short / medium /
long; 2 / 4 / 8 s at 8 fps here). Records follow the Video-MME schema.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .shapes import COLORS, NUMBERS, SHAPES, Obj, _draw, plural

FPS = 8
DURATIONS = {"short": 16, "medium": 32, "long": 64}  # frames at FPS
TASKS = {  # our task -> Video-MME task_type
    "motion": "Action Recognition",
    "order": "Temporal Reasoning",
    "count": "Counting Problem",
    "change": "Temporal Perception",
}
DIRECTIONS = ("left", "right", "up", "down")
LETTERS = "ABCD"


@dataclass
class Clip:
    frames: list[np.ndarray]  # (H, W, 3) uint8 RGB
    task: str
    duration: str
    question: str
    options: list[str]  # ["A. ...", "B. ...", ...]
    answer: str  # a letter
    key_frames: list[int] = field(default_factory=list)  # the frames that show what the answer is read from
    layouts: list[list[Obj]] = field(default_factory=list)  # the objects drawn in each frame


class ShapesVideoGenerator:
    """Seeded clip + question generator; ``side`` is the frame size in pixels (even, for H.264)."""

    def __init__(self, seed: int, side: int = 112, object_size: tuple[int, int] = (18, 26)):
        if side % 2:
            raise ValueError(f"side must be even for H.264; got {side}")
        self.rng = random.Random(seed)
        self.side = side
        self.size = object_size

    def _obj(self, shape: str, color: str, x: float, y: float, s: int) -> Obj:
        return Obj(shape, color, "large", (int(x), int(y), int(x) + s, int(y) + s))

    def _render(self, objs: list[Obj], bg: tuple[int, int, int]) -> np.ndarray:
        self._layouts.append(list(objs))
        img = Image.new("RGB", (self.side, self.side), bg)
        d = ImageDraw.Draw(img)
        for o in objs:
            _draw(d, o)
        return np.asarray(img)

    def _spots(self, n: int, s: int) -> list[tuple[int, int]]:
        """n non-overlapping top-left corners for objects of size s (cells of a 3x3 grid, jittered)."""
        cell = self.side // 3
        cells = self.rng.sample([(i, j) for i in range(3) for j in range(3)], n)
        jit = max(0, cell - s - 2)
        return [(i * cell + 1 + self.rng.randint(0, jit), j * cell + 1 + self.rng.randint(0, jit)) for i, j in cells]

    def _options(self, correct: str, pool: list[str]) -> tuple[list[str], str]:
        wrong = self.rng.sample([p for p in pool if p != correct], 3)
        opts = wrong + [correct]
        self.rng.shuffle(opts)
        k = opts.index(correct)
        return [f"{LETTERS[i]}. {o}" for i, o in enumerate(opts)], LETTERS[k]

    def clip(self, task: str, duration: str) -> Clip:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")
        if duration not in DURATIONS:
            raise ValueError(f"unknown duration {duration!r}; allowed: {list(DURATIONS)}")
        rng, n, side = self.rng, DURATIONS[duration], self.side
        self._layouts: list[list[Obj]] = []
        bg = tuple(rng.randint(235, 255) for _ in range(3))
        s = rng.randint(*self.size)
        names = [(c, sh) for c in COLORS for sh in SHAPES]
        frames: list[np.ndarray] = []
        if task == "motion":
            (color, shape), direction = rng.choice(names), rng.choice(DIRECTIONS)
            lo, hi, mid = 2, side - s - 2, rng.randint(2, side - s - 2)
            start, end = {"left": ((hi, mid), (lo, mid)), "right": ((lo, mid), (hi, mid)),
                          "up": ((mid, hi), (mid, lo)), "down": ((mid, lo), (mid, hi))}[direction]
            for t in range(n):
                a = t / (n - 1)
                x, y = start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1])
                frames.append(self._render([self._obj(shape, color, x, y, s)], bg))
            key = list(range(n))
            q = f"Which direction does the {color} {shape} move?"
            options, answer = self._options(direction, list(DIRECTIONS))
        elif task == "order":
            picks = rng.sample(names, 4)
            spots = self._spots(4, s)
            # object k appears at frame k * n / 5 and stays
            objs = [self._obj(sh, c, x, y, s) for (c, sh), (x, y) in zip(picks, spots)]
            for t in range(n):
                frames.append(self._render([o for k, o in enumerate(objs) if t >= (k + 1) * n // 5], bg))
            key = [t for t in range(n) if n // 5 <= t < 2 * n // 5]  # the first object, alone
            q = "Which object appears first?"
            labels = [f"{c} {sh}" for c, sh in picks]
            order = list(range(4))
            rng.shuffle(order)
            options = [f"{LETTERS[i]}. {labels[k]}" for i, k in enumerate(order)]
            answer = LETTERS[order.index(0)]
        elif task == "count":
            shape = rng.choice(SHAPES)
            k = rng.randint(1, 4)
            others = [sh for sh in SHAPES if sh != shape]
            seq = [shape] * k + [rng.choice(others) for _ in range(rng.randint(0, 1))]
            rng.shuffle(seq)
            # each object is shown alone, at its own spot, for n/len(seq) >= n/5 frames: any uniform sample of
            # 8 or more frames sees every object
            spots = self._spots(len(seq), s)
            objs = [self._obj(sh, rng.choice(list(COLORS)), x, y, s) for sh, (x, y) in zip(seq, spots)]
            for t in range(n):
                frames.append(self._render([objs[t * len(objs) // n]], bg))
            key = [t for t in range(n) if objs[t * len(objs) // n].shape == shape]
            q = f"How many {plural(shape)} appear in the video?"
            options, answer = self._options(NUMBERS[k], list(NUMBERS[1:6]))
        else:  # change
            shape = rng.choice(SHAPES)
            c0, c1 = rng.sample(list(COLORS), 2)
            (x, y), = self._spots(1, s)
            for t in range(n):
                frames.append(self._render([self._obj(shape, c0 if t < n // 2 else c1, x, y, s)], bg))
            key = list(range(n // 2, n))
            q = f"What color does the {shape} change to?"
            options, answer = self._options(c1, list(COLORS))
        return Clip(frames, task, duration, q, options, answer, key, self._layouts)
