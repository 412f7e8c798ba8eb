"""Shared parts of the toy trainers: wall-clock learning-rate schedule, run logs, resumable clocked stages."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch


def lr_at(step: int, progress: float, base: float, warmup: int = 100) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` in [0, 1], the fraction of the
    stage's wall-clock budget spent. (The schedule used to assume a fixed time per step; when steps got faster,
    the learning rate reached 0 at ~2,770 of a 60-minute stage's 4,100 steps.)"""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def run_log(out: Path, name: str = "train_log.txt", append: bool = False) -> Callable[[str], None]:
    """Create ``out`` and return a ``log(msg)`` that prints and writes to ``out/name``."""
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / name, "a" if append else "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    return log


class ClockedStage:
    """A training stage that runs for ``minutes`` of wall clock with :func:`lr_at` on every param group's ``base``
    lr, saving ``{model, optimizer, step, elapsed}`` to ``state_path`` every ``save_every`` seconds and at the
    end; ``resume=True`` continues from that file (the clock continues where it stopped).

    >>> stage = ClockedStage(model, opt, 20, out / "var_state.pt", resume=args.resume)
    >>> for step in stage: loss = ...; loss.backward(); opt.step()
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, minutes: float, state_path: Path,
                 resume: bool = False, warmup: int = 100, save_every: float = 300.0):
        self.model, self.opt, self.minutes, self.path = model, opt, minutes, Path(state_path)
        self.warmup, self.save_every = warmup, save_every
        for g in opt.param_groups:
            g.setdefault("base", g["lr"])
        self.step, self.elapsed = 0, 0.0
        if resume and self.path.is_file():
            st = torch.load(self.path, map_location="cpu", weights_only=False)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            self.step, self.elapsed = st["step"], st["elapsed"]

    @property
    def progress(self) -> float:
        return self.elapsed / (self.minutes * 60)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                    "elapsed": self.elapsed}, self.path)

    def __iter__(self) -> Iterator[int]:
        t0, last_save, start = time.time(), time.time(), self.elapsed
        self.model.train()
        while self.elapsed < self.minutes * 60:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, self.progress, g["base"], self.warmup)
            yield self.step
            self.step += 1
            self.elapsed = start + time.time() - t0
            if time.time() - last_save > self.save_every:
                self.save()
                last_save = time.time()
        self.save()
        self.model.eval()
