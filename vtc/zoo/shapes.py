"""ShapesMME: a seeded synthetic benchmark in the style of MME perception, drawn with PIL.

Each scene holds several objects (shape x colour x size, small ones included) and sometimes a drawn digit.
Each test image belongs to one category and carries two yes/no questions, one "Yes" and one "No", as in
MME: existence (a shape), count (of a shape), position (of two shapes), color (an object of a colour), OCR (a
digit). Every question looks up single attributes (shape, colour, digit): questions binding two attributes
("a red circle") need a far longer training run than the 45 CPU minutes a from-scratch toy model gets (see
``train_toy``). Training samples carry several question-answer pairs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SIZES = {"small": (8, 11), "large": (20, 28)}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
CATEGORIES = ("existence", "count", "position", "color", "OCR")
MME_SUFFIX = " Please answer yes or no."


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    objects: list[Obj]
    digit: str | None = None
    digit_box: tuple[int, int, int, int] | None = None
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, "Yes"|"No")


def _free(box, boxes, margin=3) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + margin <= b[0] or b[2] + margin <= x0 or y1 + margin <= b[1] or b[3] + margin <= y0 for b in boxes)


def _place(rng: random.Random, size: int, canvas: int, boxes: list) -> tuple[int, int, int, int] | None:
    for _ in range(100):
        x, y = rng.randint(2, canvas - size - 2), rng.randint(2, canvas - size - 2)
        box = (x, y, x + size, y + size)
        if _free(box, boxes):
            return box
    return None


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill=None) -> None:
    x0, y0, x1, y1 = o.box
    fill = COLORS[o.color] if fill is None else fill
    if o.shape == "circle":
        draw.ellipse(o.box, fill=fill)
    elif o.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    elif o.shape == "cross":
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx - w // 2 + w - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1 - 1, cy - w // 2 + w - 1), fill=fill)


class ShapesGenerator:
    """Seeded scene + question generator. ``canvas`` is the image side in pixels."""

    def __init__(self, seed: int, canvas: int = 112, font_size: int | None = None):
        self.rng = random.Random(seed)
        self.canvas = canvas
        self.font = ImageFont.load_default(size=font_size or max(12, canvas // 5))
        self.set_difficulty(1.0)

    def set_difficulty(self, d: float) -> None:
        """Training curriculum knob in [0, 1]: 1 is the benchmark's distribution (tests always use 1); lower
        values draw fewer, larger objects (from one object up to five, sizes up to 2x)."""
        self.difficulty = max(0.0, min(1.0, d))
        self.max_objects = 1 + round(4 * self.difficulty)
        self.size_scale = 2.0 - self.difficulty
        self.small_ok = self.difficulty >= 0.5

    # ---------------------------------------------------------------- scenes
    def scene(self, n_objects: int | None = None, digit: bool | None = None,
              forced: list[tuple[str, str, str]] | None = None) -> Scene:
        rng = self.rng
        boxes: list = []
        objs: list[Obj] = []
        digit_txt = digit_box = None
        if digit if digit is not None else rng.random() < 0.3:
            digit_txt = str(rng.randint(0, 9))
            bb = self.font.getbbox(digit_txt)
            w, h = bb[2] - bb[0], bb[3] - bb[1]
            box = _place(rng, max(w, h) + 2, self.canvas, boxes)
            if box is not None:
                digit_box = box
                boxes.append(box)
            else:
                digit_txt = None
        specs = list(forced or [])
        n = n_objects if n_objects is not None else rng.randint(min(2, self.max_objects), self.max_objects)
        while len(specs) < n:
            specs.append((rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))))
        for shape, color, size in specs:
            if not self.small_ok:
                size = "large"
            lo, hi = SIZES[size]
            lo, hi = int(lo * self.size_scale), int(hi * self.size_scale)
            box = _place(rng, rng.randint(lo, hi), self.canvas, boxes)
            if box is None:
                continue
            boxes.append(box)
            objs.append(Obj(shape, color, size, box))
        return Scene(objs, digit_txt, digit_box)

    def render(self, scene: Scene) -> Image.Image:
        bg = tuple(self.rng.randint(235, 255) for _ in range(3))
        img = Image.new("RGB", (self.canvas, self.canvas), bg)
        draw = ImageDraw.Draw(img)
        for o in scene.objects:
            _draw(draw, o)
        if scene.digit is not None and scene.digit_box is not None:
            bb = self.font.getbbox(scene.digit)
            x0, y0 = scene.digit_box[:2]
            draw.text((x0 - bb[0] + 1, y0 - bb[1] + 1), scene.digit, font=self.font, fill=(20, 20, 20))
        return img

    # ---------------------------------------------------------------- questions
    def questions(self, scene: Scene, category: str) -> list[tuple[str, str]] | None:
        """One Yes and one No question of ``category`` about ``scene``, or None if the scene can't support it."""
        rng = self.rng
        objs = scene.objects
        if category == "existence":
            present = sorted({o.shape for o in objs})
            absent = [x for x in SHAPES if x not in present]
            if not present or not absent:
                return None
            return [(f"Is there a {rng.choice(present)} in the image?", "Yes"),
                    (f"Is there a {rng.choice(absent)} in the image?", "No")]
        if category == "count":
            shape = rng.choice(SHAPES)
            n = sum(o.shape == shape for o in objs)
            wrong = rng.choice([m for m in (n - 1, n + 1, n + 2) if 0 <= m < len(NUMBERS)])
            return [(f"Are there {NUMBERS[n]} {plural(shape)} in the image?", "Yes"),
                    (f"Are there {NUMBERS[wrong]} {plural(shape)} in the image?", "No")]
        if category == "position":
            uniq = [o for o in objs if sum(x.shape == o.shape for x in objs) == 1]
            pairs = [(a, b) for a in uniq for b in uniq if a is not b and a.cx + 16 < b.cx]
            if not pairs:
                return None
            a, b = rng.choice(pairs)
            qa = [(f"Is the {a.shape} on the left of the {b.shape}?", "Yes"),
                  (f"Is the {a.shape} on the right of the {b.shape}?", "No")]
            if rng.random() < 0.5:
                qa = [(f"Is the {b.shape} on the right of the {a.shape}?", "Yes"),
                      (f"Is the {b.shape} on the left of the {a.shape}?", "No")]
            return qa
        if category == "color":
            present = sorted({o.color for o in objs})
            absent = [c for c in COLORS if c not in present]
            if not present or not absent:
                return None
            return [(f"Is there a {rng.choice(present)} object in the image?", "Yes"),
                    (f"Is there a {rng.choice(absent)} object in the image?", "No")]
        if category == "OCR":
            if scene.digit is None:
                return None
            other = rng.choice([d for d in "0123456789" if d != scene.digit])
            return [(f"Is the number {scene.digit} written in the image?", "Yes"),
                    (f"Is the number {other} written in the image?", "No")]
        raise ValueError(f"unknown category {category!r}; allowed: {CATEGORIES}")

    def sample(self, category: str) -> tuple[Image.Image, Scene]:
        """A test-style sample: one scene built for ``category`` with its two questions (Yes first)."""
        while True:
            if category == "count":
                shape = self.rng.choice(SHAPES)
                k = self.rng.randint(0, 4)
                forced = [(shape, self.rng.choice(list(COLORS)), self.rng.choice(list(SIZES))) for _ in range(k)]
                others = [s for s in SHAPES if s != shape]
                forced += [(self.rng.choice(others), self.rng.choice(list(COLORS)), self.rng.choice(list(SIZES)))
                           for _ in range(self.rng.randint(1, 3))]
                scene = self.scene(n_objects=len(forced), forced=forced, digit=False)
                if sum(o.shape == shape for o in scene.objects) != k:
                    continue
                n = k
                wrong = self.rng.choice([m for m in (n - 1, n + 1, n + 2) if 0 <= m < len(NUMBERS)])
                scene.qa = [(f"Are there {NUMBERS[n]} {plural(shape)} in the image?", "Yes"),
                            (f"Are there {NUMBERS[wrong]} {plural(shape)} in the image?", "No")]
            else:
                n = self.rng.randint(2, max(2, self.max_objects)) if category == "position" else None
                scene = self.scene(n_objects=n, digit=True if category == "OCR" else None)
                qa = self.questions(scene, category)
                if qa is None:
                    continue
                scene.qa = qa
            return self.render(scene), scene

    def training_sample(self, max_questions: int = 6,
                        weights: dict[str, float] | None = None) -> tuple[Image.Image, Scene]:
        """A scene with several question-answer pairs drawn from every applicable category.

        ``weights`` (category -> relative weight, missing ones 1) picks the scene's category by weight and keeps
        its two questions first, so weighted categories get more of the questions; None keeps uniform draws."""
        if weights is not None:
            unknown = set(weights) - set(CATEGORIES)
            if unknown:
                raise ValueError(f"unknown categories {sorted(unknown)} in weights; allowed: {CATEGORIES}")
            cat = self.rng.choices(CATEGORIES, [weights.get(c, 1.0) for c in CATEGORIES])[0]
            img, scene = self.sample(cat)
            rest = [x for c in CATEGORIES for x in (self.questions(scene, c) or []) if x not in scene.qa]
            self.rng.shuffle(rest)
            scene.qa = (list(scene.qa) + rest)[:max_questions]
            return img, scene
        cat = self.rng.choice(CATEGORIES)
        img, scene = self.sample(cat)
        qa = list(scene.qa)
        for c in self.rng.sample(CATEGORIES, len(CATEGORIES)):
            more = self.questions(scene, c)
            if more:
                qa.extend(x for x in more if x not in qa)
        self.rng.shuffle(qa)
        scene.qa = qa[:max_questions]
        return img, scene

    @staticmethod
    def caption(scene: Scene) -> str:
        parts = [f"a {o.size} {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: (o.cx, o.cy))]
        if scene.digit is not None:
            parts.append(f"the number {scene.digit}")
        return " , ".join(parts) if parts else "an empty image"
