"""Video-MME: lmms-eval prompt and letter extraction on hand cases, scoring, ShapesVideo clips and records."""
import json

import numpy as np
import pytest

from vtc.eval.videomme_data import load_videomme, write_shapes_video
from vtc.eval.videomme_scoring import extract_letter, videomme_prompt, videomme_scores
from vtc.zoo.shapes import COLORS
from vtc.zoo.shapes_video import DURATIONS, TASKS, ShapesVideoGenerator


# each expected letter is what lmms-eval 0.7.3's extract_mcq_answer(reply, choices=["A", "B", "C", "D"]) returns
# (checked against its mcq_extract.py); the second column is the <= 0.7.1 rule vtc used before, where it differs
@pytest.mark.parametrize("reply,letter", [
    ("Answer: D", "D"),  # old: A (the A of "Answer")
    ("Best answer: A", "A"),  # old: B (the B of "Best")
    ("Choice: B", "B"),  # old: C
    ("ANSWER: C", "C"),  # old: A
    ("Answer:\nB", "B"),  # old: A
    ("ABCD", "D"),  # old: A (the last standalone letter wins now)
    ("the answer is C. However, D could also be right", "D"),  # old: C
    ("Answer: the red one, option C", "C"),  # old: A
    ("Option B is wrong, A is right", "A"),  # old: B
    ("(B) or (C)", "C"),  # old: B
    ("The answer is (C).", "C"),
    ("B", "B"),
    ("B. left", "B"),
    ("(D) down", "D"),
    ("The best answer is A", "A"),
    ("The best option is B", "B"),
    ("C)", "C"),
    ('"A"', "A"),
    ("答案是B", "B"),
    ("I choose D because", "D"),
    ("A and B", "A"),
    ("the object moves towards the left side of the frame and then it stops there", ""),
    ("I think it moves left", ""),
    ("a", ""),  # lower-case letters never count
    ("", ""),
])
def test_extract_letter_matches_lmms_eval_0_7_3(reply, letter):
    assert extract_letter(reply) == letter


def test_extract_letter_equals_lmms_eval_on_random_replies():
    """Against lmms-eval's own function when the [lmms] extra is installed (CI installs it)."""
    mcq = pytest.importorskip("lmms_eval.tasks._task_utils.mcq_extract")
    import random

    rng = random.Random(0)
    parts = list("ABCDEabcd .:()!,?\n") + ["answer is ", "The best answer is", "选", "I choose ", "Option "]
    for _ in range(5000):
        reply = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        assert extract_letter(reply) == mcq.extract_mcq_answer(reply, choices=["A", "B", "C", "D"]), reply


def test_prompt_matches_lmms_eval_layout():
    p = videomme_prompt("Which way?", ["A. left", "B. right", "C. up", "D. down"])
    assert p == ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\nWhich way?\nA. left"
                 "\nB. right\nC. up\nD. down\n\nAnswer with the option's letter from the given choices directly.")


def test_gold_answer_is_compared_exactly_as_lmms_eval_aggregates():
    rows = [{"answer": a, "prediction": "A", "duration": "short", "task_type": "T", "domain": "X"}
            for a in ("A", " A", "a")]
    assert videomme_scores(rows)["accuracy"] == pytest.approx(100 / 3)  # only the exact "A" counts


def test_scores_overall_and_breakdowns():
    rows = [
        {"answer": "A", "prediction": "A", "duration": "short", "task_type": "Counting Problem", "domain": "X"},
        {"answer": "B", "prediction": "The answer is (B).", "duration": "short", "task_type": "Temporal Reasoning",
         "domain": "X"},
        {"answer": "C", "prediction": "D", "duration": "long", "task_type": "Counting Problem", "domain": "X"},
        {"answer": "D", "prediction": "no idea at all what this could be, honestly, sorry about it", "duration": "long",
         "task_type": "Temporal Reasoning", "domain": "Y"},
    ]
    s = videomme_scores(rows)
    assert s["accuracy"] == 50.0 and s["questions"] == 4
    assert s["by_duration"] == {"long": 0.0, "short": 100.0}
    assert s["by_task_type"] == {"Counting Problem": 50.0, "Temporal Reasoning": 50.0}
    assert s["by_domain"] == {"X": pytest.approx(66.67), "Y": 0.0}
    rows[0]["sub_category"] = "S"
    assert videomme_scores(rows)["by_sub_category"] == {"S": 100.0}


def _objects(frame: np.ndarray) -> np.ndarray:
    """Mask of non-background pixels (objects are saturated colours; the background is near white)."""
    return frame.astype(int).min(-1) < 200


def _centroid(frame):
    ys, xs = np.nonzero(_objects(frame))
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("duration", list(DURATIONS))
def test_clips_answer_matches_what_is_drawn(duration):
    gen = ShapesVideoGenerator(5)
    for _ in range(6):
        c = gen.clip("motion", duration)
        assert len(c.frames) == DURATIONS[duration] and c.frames[0].shape == (112, 112, 3)
        (x0, y0), (x1, y1) = _centroid(c.frames[0]), _centroid(c.frames[-1])
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        truth = max(moved, key=moved.get)
        assert dict(o.split(". ") for o in c.options)[c.answer] == truth
        c = gen.clip("change", duration)
        last = c.frames[-1][_objects(c.frames[-1])].mean(0)
        nearest = min(COLORS, key=lambda k: np.abs(np.array(COLORS[k]) - last).sum())
        assert dict(o.split(". ") for o in c.options)[c.answer] == nearest
        c = gen.clip("order", duration)
        first = next(f for f in c.frames if _objects(f).any())
        assert all(_objects(f).sum() >= _objects(first).sum() for f in c.frames if _objects(f).any())
        c = gen.clip("count", duration)
        assert len(c.options) == 4 and c.answer in "ABCD" and sorted(o[0] for o in c.options) == list("ABCD")


def test_count_objects_are_seen_in_eight_uniform_frames():
    """Every flashed object is visible in some frame of an 8-frame uniform sample (the clip's design promise)."""
    from vtc.video import sample_indices

    gen = ShapesVideoGenerator(7)
    for _ in range(10):
        c = gen.clip("count", "long")
        segments = []  # runs of identical frames = one object each
        for t, f in enumerate(c.frames):
            if t == 0 or not np.array_equal(f, c.frames[t - 1]):
                segments.append([t])
            else:
                segments[-1].append(t)
        idx = set(sample_indices(len(c.frames), 8))
        assert all(idx & set(s) for s in segments)


def test_generator_is_deterministic_and_validates():
    a, b = ShapesVideoGenerator(3).clip("order", "short"), ShapesVideoGenerator(3).clip("order", "short")
    assert a.question == b.question and a.options == b.options
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    with pytest.raises(ValueError, match="unknown task"):
        ShapesVideoGenerator(0).clip("nope", "short")
    with pytest.raises(ValueError, match="unknown duration"):
        ShapesVideoGenerator(0).clip("order", "forever")


def test_write_and_load_both_record_formats(tmp_path):
    out = write_shapes_video(tmp_path / "sv", seed=11, per_cell=1)
    recs = load_videomme(out)
    assert len(recs) == len(DURATIONS) * len(TASKS)
    assert {r.task_type for r in recs} == set(TASKS.values()) and {r.duration for r in recs} == set(DURATIONS)
    r = recs[0]
    assert r.video_path.endswith(f"data/{r.videoID}.mp4") and r.answer in "ABCD" and len(r.options) == 4
    (out / "videomme.parquet").unlink()  # the JSON copy alone loads the same records
    again = load_videomme(out)
    assert [(x.question_id, x.options, x.answer) for x in again] == [(x.question_id, x.options, x.answer) for x in recs]
    rows = json.loads((out / "videomme.json").read_text())
    del rows[0]["task_type"]
    (out / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="lacks \\['task_type'\\]"):
        load_videomme(out / "bad.json")


def test_evaluate_videomme_resumes_and_scores(tmp_path):
    """End to end on the bundled toy OneVision: predictions are written, a rerun reuses them, scores are consistent;
    8 frames are 8 x 49 pooled tokens + 1 newline, uniform 0.5 keeps 24 a frame and the newline."""
    from vtc.eval.videomme_runner import evaluate_videomme
    from vtc.zoo.models import default_video_model

    model, proc, _ = default_video_model()
    recs = load_videomme(write_shapes_video(tmp_path / "sv", seed=12, per_cell=1))[:3]
    res = evaluate_videomme(model, proc, recs, tmp_path / "run", frames=8, method="uniform", ratio=0.5,
                            batch_size=2, max_new_tokens=3, progress=False)
    assert res["compression"]["visual_tokens_before"] == 393 and res["compression"]["visual_tokens_after"] == 193
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3
    again = evaluate_videomme(model, proc, recs, tmp_path / "run", frames=8, method="uniform", ratio=0.5,
                              batch_size=2, max_new_tokens=3, progress=False)
    assert again["predictions"] == res["predictions"] and again["scores"] == res["scores"]
    # nothing was generated the second time, yet the token counts come back from the saved predictions
    assert again["compression"]["visual_tokens_after"] == 193 and again["compression"]["compress_seconds_this_run"] == 0
    assert all(p["visual_tokens"] == [393, 193] for p in res["predictions"])
    assert res["scores"] == videomme_scores(res["predictions"])


def test_cli_writes_data_and_evaluates(tmp_path, capsys):
    from vtc.cli import main

    assert main(["data", "shapes-video", "--out", str(tmp_path / "sv"), "--per-cell", "1"]) == 0
    assert main(["eval", "videomme", "--data", str(tmp_path / "sv"), "--limit", "2", "--frames", "8",
                 "--method", "cls", "--ratio", "0.25", "--quiet", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{"):])
    assert res["questions"] == 2 and res["visual_tokens"] == [393.0, 97.0]  # 8 x 12 + newline and res["frames"] == 8
    assert main(["eval", "videomme", "--data", str(tmp_path / "sv"), "--ratio", "0.5"]) == 2  # --ratio needs --method


def test_sweep_on_both_benchmarks_writes_table_and_plots(tmp_path):
    """Methods x ratios: ratio 1.0 is the unpatched run, token fractions are exact, table and plots are written."""
    from vtc.eval.mme_data import load_mme, write_shapes_mme
    from vtc.eval.runner import sweep
    from vtc.zoo.models import default_model, default_video_model

    model, proc, _ = default_model()
    write_shapes_mme(tmp_path / "mme", seed=5, per_category=1)
    recs = load_mme(tmp_path / "mme" / "mme.parquet")[:4]
    rows = sweep(model, proc, recs, tmp_path / "s", methods=["cls", "uniform", "zipvl:tau=0.9"], ratios=[1.0, 0.5],
                 batch_size=4, progress=False, max_new_tokens=2)
    by = {(r["method"], r["ratio"]): r for r in rows}
    # an own-budget method runs once, next to the unpatched reference; its stats are measured, not assumed
    assert by[("none", None)]["score"] == by[("cls", 1.0)]["score"]
    zip_row = by[("zipvl:tau=0.9", None)]
    assert 0 < zip_row["important_fraction"] < 1 and 2 < zip_row["kv_bits"] < 16
    assert (tmp_path / "s" / "zipvl_tau=0.9" / "results.json").exists()
    assert "| zipvl:tau=0.9 |" in (tmp_path / "s" / "table.md").read_text()
    assert by[("cls", 1.0)]["score"] == by[("uniform", 1.0)]["score"] and by[("cls", 1.0)]["llm_fraction"] == 1.0
    assert by[("cls", 0.5)]["tokens"] == 98 and by[("uniform", 0.5)]["llm_fraction"] == 0.5
    assert all((tmp_path / "s" / f).exists() for f in ("table.md", "sweep.json", "sweep.png", "sweep_flops.png"))
    assert "| cls |" in (tmp_path / "s" / "table.md").read_text()

    vmodel, vproc, _ = default_video_model()
    vrecs = load_videomme(write_shapes_video(tmp_path / "sv", seed=6, per_cell=1))[:2]
    vrows = sweep(vmodel, vproc, vrecs, tmp_path / "sv_sweep", methods=["uniform", "zipvl:kv=evict"], ratios=[0.25],
                  batch_size=2, progress=False, bench="videomme", frames=8, max_new_tokens=2)
    assert vrows[-1]["method"] == "zipvl:kv=evict" and vrows[-1]["kv_bits"] < 4  # evicted tokens cost nothing
    vrows = [r for r in vrows if r["method"] == "uniform"]
    assert vrows[0]["tokens"] == 97 and vrows[0]["llm_fraction"] == pytest.approx(97 / 393)
    assert set(vrows[0]["categories"]) <= set(TASKS.values())


def test_lmms_eval_split_layout_and_repeated_shards(tmp_path):
    """Records in the dataset snapshot, videos under $HF_HOME/videomme/data (lmms-eval's layout), via --videos."""
    import shutil

    from vtc.cli import _records
    from vtc.eval.mme_data import load_mme, write_shapes_mme

    write_shapes_video(tmp_path / "hf" / "videomme", 3000, per_cell=1)
    snap = tmp_path / "snapshot" / "videomme"
    snap.mkdir(parents=True)
    shutil.move(str(tmp_path / "hf" / "videomme" / "videomme.parquet"), snap / "test-00000-of-00001.parquet")
    with pytest.raises(FileNotFoundError, match="no video for"):
        load_videomme(tmp_path / "snapshot")
    recs = load_videomme(tmp_path / "snapshot", video_dir=tmp_path / "hf" / "videomme")
    assert len(recs) == 12 and all(r.video_path.startswith(str(tmp_path / "hf")) for r in recs)

    class Args:
        bench, on, data, videos, limit, per_category = "videomme", "mme", str(tmp_path / "snapshot"), None, 0, 1
    Args.videos = str(tmp_path / "hf" / "videomme")
    assert [r.question_id for r in _records(Args)] == [r.question_id for r in recs]

    write_shapes_mme(tmp_path / "mme", 3000, per_category=1)
    (tmp_path / "mme" / "data").mkdir()
    shutil.copy(tmp_path / "mme" / "mme.parquet", tmp_path / "mme" / "data" / "test-00000.parquet")
    with pytest.warns(RuntimeWarning, match="10 repeated MME records"):
        assert len(load_mme(tmp_path / "mme")) == 10
