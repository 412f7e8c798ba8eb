"""``accelerate launch -m vtc eval ...`` shares the records out over processes and merges them into the files a
single process writes; a run killed mid-way resumes without losing or duplicating a prediction (issue #21)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vtc.eval.mme_data import write_shapes_mme

pytest.importorskip("accelerate")


def _cmd(data, out, processes, batch=2):
    args = ["eval", "mme", "--data", str(data), "--out", str(out), "--quiet", "--batch-size", str(batch),
            "--method", "cls", "--ratio", "0.25"]
    if processes == 1:
        return [sys.executable, "-m", "vtc", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vtc", *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(data, out, processes, batch=2):
    run = subprocess.run(_cmd(data, out, processes, batch), env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mme")
    write_shapes_mme(d, seed=3000, per_category=4)  # 20 images, 40 questions
    return d / "mme.parquet"


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _run(data, out, 1)
    return out


def _same_run(a, b):
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["predictions"] == rb["predictions"] and ra["scores"] == rb["scores"]
    assert ra["compression"]["visual_tokens_after"] == rb["compression"]["visual_tokens_after"]
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()
    assert not list(b.glob("predictions.rank*"))


def test_two_processes_equal_one(data, single, tmp_path):
    stdout = _run(data, tmp_path, 2)
    assert stdout.count("perception") == 1  # only the main process reports
    _same_run(single, tmp_path)


def test_a_killed_two_process_run_resumes_without_loss_or_duplicates(tmp_path):
    write_shapes_mme(tmp_path / "d", seed=3000, per_category=10)  # 50 images, 100 questions
    data, out = tmp_path / "d" / "mme.parquet", tmp_path / "run"
    p = subprocess.Popen(_cmd(data, out, 2, batch=1), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if sum(len(f.read_text().splitlines()) for f in out.glob("predictions*.jsonl")) >= 6:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # every process, mid-run
    p.wait()
    partial = sum(len(f.read_text().splitlines()) for f in out.glob("predictions*.jsonl"))
    assert 6 <= partial < 100
    _run(data, out, 2, batch=1)
    _run(data, tmp_path / "one", 1, batch=1)
    _same_run(tmp_path / "one", out)
    keys = [json.loads(line)["key"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 100


def _launch(args, processes):
    base = [sys.executable, "-m", "vtc"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vtc"]
    run = subprocess.run(base + args, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def test_two_process_sweep_and_videomme_equal_one(data, tmp_path):
    """The sweep (several runs, the main process writes the table) and Video-MME (frame-count sub-batches)."""
    import json as _json

    from vtc.eval.videomme_data import write_shapes_video

    sweep = ["eval", "sweep", "--data", str(data), "--methods", "uniform", "--ratios", "1.0,0.5", "--quiet"]
    for n in (1, 2):
        _launch(sweep + ["--out", str(tmp_path / f"sweep{n}")], n)
    assert (_json.loads((tmp_path / "sweep1" / "sweep.json").read_text())
            == _json.loads((tmp_path / "sweep2" / "sweep.json").read_text()))
    assert (tmp_path / "sweep2" / "table.md").read_text() == (tmp_path / "sweep1" / "table.md").read_text()
    videos = write_shapes_video(tmp_path / "sv", 3000, per_cell=1)
    vm = ["eval", "videomme", "--data", str(videos), "--frames", "8", "--batch-size", "2", "--quiet",
          "--method", "uniform", "--ratio", "0.5"]
    for n in (1, 2):
        _launch(vm + ["--out", str(tmp_path / f"vm{n}")], n)
    _same_run(tmp_path / "vm1", tmp_path / "vm2")
