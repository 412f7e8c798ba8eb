"""The toy trainers' shared parts: wall-clock schedule and resumable stages."""
from __future__ import annotations

import torch

from vtc.zoo.training import ClockedStage, run_log


def test_clocked_stage_saves_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = ClockedStage(model, opt, minutes=0.002, state_path=tmp_path / "s.pt", warmup=2)
    steps = []
    for step in stage:
        steps.append(step)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert steps == list(range(len(steps))) and stage.progress >= 1.0
    saved = torch.load(tmp_path / "s.pt", weights_only=False)
    assert saved["step"] == len(steps) and torch.equal(saved["model"]["weight"], model.weight.detach())
    # resuming: weights and step come back; a finished stage runs no further step
    fresh = torch.nn.Linear(3, 1)
    again = ClockedStage(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), 0.002, tmp_path / "s.pt", resume=True)
    assert again.step == len(steps) and torch.equal(fresh.weight, model.weight)
    assert list(again) == []
    longer = ClockedStage(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), 0.02, tmp_path / "s.pt", resume=True)
    assert next(iter(longer)) == len(steps)  # continues the step count


def test_run_log_appends_when_resuming(tmp_path):
    run_log(tmp_path, "x.txt")("first")
    run_log(tmp_path, "x.txt", append=True)("second")
    assert (tmp_path / "x.txt").read_text().splitlines() == ["first", "second"]
    run_log(tmp_path, "x.txt")("new")
    assert (tmp_path / "x.txt").read_text().splitlines() == ["new"]
