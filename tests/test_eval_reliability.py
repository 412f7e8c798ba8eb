"""An evaluation never reports a wrong number: run identity, one run per folder, torn lines (issue #20, 1-3)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vtc.eval.mme_data import MMERecord, load_mme, write_shapes_mme
from vtc.eval.run_store import RunError
from vtc.eval.runner import evaluate_mme
from vtc.zoo.models import default_model


@pytest.fixture(scope="module")
def toy():
    model, proc, _ = default_model()
    return model, proc


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes_mme(d, seed=3000, per_category=1)  # 5 images, 10 questions
    return load_mme(d / "mme.parquet")


def _flipped(recs):
    return [MMERecord(r.question_id, r.question, "No" if r.answer == "Yes" else "Yes", r.category,
                      image_bytes=r.image_bytes) for r in recs]


def test_resume_with_other_settings_is_refused_naming_what_differs(toy, recs, tmp_path):
    model, proc = toy
    first = evaluate_mme(model, proc, recs, tmp_path, method="cls", ratio=0.11, progress=False)
    with pytest.raises(RunError, match=r"method: \{.*'name': 'cls'.*\} there, None here"):
        evaluate_mme(model, proc, recs, tmp_path, progress=False)  # no method: was answered by cls predictions
    with pytest.raises(RunError, match=r"method.ratio: 0.11 there, 0.25 here"):
        evaluate_mme(model, proc, recs, tmp_path, method="cls", ratio=0.25, progress=False)
    with pytest.raises(RunError, match=r"data: '10:[0-9a-f]+' there, '10:[0-9a-f]+' here"):
        evaluate_mme(model, proc, _flipped(recs), tmp_path, method="cls", ratio=0.11, progress=False)
    with pytest.raises(RunError, match=r"max_new_tokens: 16 there, 4 here"):
        evaluate_mme(model, proc, recs, tmp_path, method="cls", ratio=0.11, max_new_tokens=4, progress=False)
    with pytest.raises(RunError, match=r"model.weights: '[0-9a-f]+' there, '[0-9a-f]+' here"):
        import copy
        other = copy.deepcopy(model)
        other.lm_head.weight.data[0, 0] += 1.0
        evaluate_mme(other, proc, recs, tmp_path, method="cls", ratio=0.11, progress=False)
    # the same settings resume (nothing generated again), and --overwrite starts over with the new ones
    again = evaluate_mme(model, proc, recs, tmp_path, method="cls", ratio=0.11, progress=False)
    assert again["scores"] == first["scores"]
    flipped = evaluate_mme(model, proc, _flipped(recs), tmp_path, method="cls", ratio=0.11, progress=False,
                           overwrite=True)
    fresh = evaluate_mme(model, proc, _flipped(recs), tmp_path / "fresh", method="cls", ratio=0.11, progress=False)
    assert flipped["scores"] == fresh["scores"] != first["scores"]
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["method"]["ratio"] == 0.11


def test_a_folder_from_an_older_vtc_without_identity_is_refused(toy, recs, tmp_path):
    model, proc = toy
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"key": "x", "prediction": "Yes"}) + "\n")
    with pytest.raises(RunError, match="no run.json"):
        evaluate_mme(model, proc, recs, tmp_path, progress=False)


def _hold_lock(folder):
    code = ("import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_into_the_same_folder_is_refused_and_a_dead_runs_lock_recovered(toy, recs, tmp_path):
    model, proc = toy
    tmp_path.mkdir(exist_ok=True)
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunError, match="another vtc run is writing to"):
            evaluate_mme(model, proc, recs, tmp_path, progress=False)
        assert not (tmp_path / "predictions.jsonl").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a run killed while holding the lock
        holder.wait()
    res = evaluate_mme(model, proc, recs, tmp_path, progress=False)
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == len(recs) == len(res["predictions"])


def test_the_lock_also_refuses_a_second_run_in_the_same_process(recs, tmp_path):
    from vtc.eval.run_store import RunStore

    with RunStore(tmp_path, {"a": 1}):
        with pytest.raises(RunError, match="another vtc run"):
            with RunStore(tmp_path, {"a": 1}):
                pass
    with RunStore(tmp_path, {"a": 1}):  # released on exit
        pass


def test_a_torn_last_line_is_regenerated_and_results_equal_a_one_go_run(toy, recs, tmp_path):
    model, proc = toy
    one_go = evaluate_mme(model, proc, recs, tmp_path / "one", method="uniform", ratio=0.5, progress=False)
    run = tmp_path / "torn"
    evaluate_mme(model, proc, recs, run, method="uniform", ratio=0.5, progress=False)
    raw = (run / "predictions.jsonl").read_bytes()
    lines = raw.splitlines(keepends=True)
    (run / "predictions.jsonl").write_bytes(b"".join(lines[:6]) + lines[6][:25])  # killed while writing line 7
    with pytest.warns(RuntimeWarning, match=r"predictions.jsonl:7: dropped a cut last line"):
        again = evaluate_mme(model, proc, recs, run, method="uniform", ratio=0.5, progress=False)
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in one_go["predictions"]]
    assert again["scores"] == one_go["scores"]
    assert len((run / "predictions.jsonl").read_text().splitlines()) == len(recs)


def test_a_corrupt_line_elsewhere_is_an_error_naming_file_and_line(toy, recs, tmp_path):
    model, proc = toy
    evaluate_mme(model, proc, recs, tmp_path, progress=False)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"predictions.jsonl:2: corrupt prediction line"):
        evaluate_mme(model, proc, recs, tmp_path, progress=False)


def test_a_bad_method_fails_before_anything_is_written(toy, recs, tmp_path):
    model, proc = toy
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_mme(model, proc, recs, tmp_path, method="nope", ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="without a method"):
        evaluate_mme(model, proc, recs, tmp_path, ratio=0.5, progress=False)
    assert time.perf_counter() - t0 < 5 and not tmp_path.joinpath("run.json").exists()
