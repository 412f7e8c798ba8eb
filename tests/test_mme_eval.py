"""MME parsing/scoring on hand-computed cases, both data layouts, generator determinism."""
import hashlib

import pytest

from vtc.eval.mme_data import load_mme, write_shapes_mme
from vtc.eval.mme_scoring import mme_prompt, mme_scores, parse_yes_no
from vtc.zoo.shapes import CATEGORIES, ShapesGenerator


@pytest.mark.parametrize("pred,label", [
    ("Yes", "yes"), ("Yes.", "yes"), ("y", "yes"), ("n", "no"), ("NO", "no"), ("no, there is not", "no"),
    ("yes, it is", "yes"), ("x", "other"), ("The answer is yes", "other"), ("  no.  ", "no"), ("nope", "no"),
    ("", "other"), ("maybe", "other"),
])
def test_parse_yes_no(pred, label):
    assert parse_yes_no(pred) == label


def test_prompt_replaces_mme_suffix():
    assert mme_prompt("Is there a dog? Please answer yes or no.") == \
        "Is there a dog?\nAnswer the question using a single word or phrase."


def _r(qid, cat, ans, pred):
    return {"question_id": qid, "category": cat, "answer": ans, "prediction": pred}


def test_scores_hand_computed():
    res = mme_scores([
        # existence: img a both right (200), img b one right (50) -> mean 125
        _r("existence/a.png", "existence", "Yes", "Yes"), _r("existence/a.png", "existence", "No", "no."),
        _r("existence/b.png", "existence", "Yes", "No"), _r("existence/b.png", "existence", "No", "No"),
        # count: one image, both wrong -> 0
        _r("count/c.png", "count", "Yes", "other text"), _r("count/c.png", "count", "No", "yes"),
        # cognition category: both right -> 200
        _r("code_reasoning/d.png", "code_reasoning", "Yes", "y"),
        _r("code_reasoning/d.png", "code_reasoning", "No", "n"),
    ])
    assert res["categories"]["existence"]["score"] == 125.0
    assert res["categories"]["existence"]["acc"] == 75.0 and res["categories"]["existence"]["acc_plus"] == 50.0
    assert res["categories"]["count"]["score"] == 0.0
    assert res["perception"] == 125.0 and res["cognition"] == 200.0 and res["total"] == 325.0
    assert res["question_accuracy"] == 5 / 8


def test_scores_require_two_questions_per_image():
    with pytest.raises(ValueError, match="exactly 2 questions per image"):
        mme_scores([_r("existence/a.png", "existence", "Yes", "Yes")])


def test_generator_is_deterministic_and_seeds_differ():
    def digest(seed):
        g = ShapesGenerator(seed)
        h = hashlib.sha256()
        for c in CATEGORIES:
            img, scene = g.sample(c)
            h.update(img.tobytes())
            h.update(repr(scene.qa).encode())
        return h.hexdigest()

    assert digest(7) == digest(7)
    assert digest(7) != digest(8)


def test_each_test_image_has_one_yes_one_no():
    g = ShapesGenerator(3)
    for c in CATEGORIES:
        for _ in range(5):
            _, scene = g.sample(c)
            assert sorted(a for _, a in scene.qa) == ["No", "Yes"]


def test_both_layouts_load_the_same_records(tmp_path):
    write_shapes_mme(tmp_path, seed=11, per_category=3)
    folder = load_mme(tmp_path / "MME_Benchmark_release_version")
    parquet = load_mme(tmp_path / "mme.parquet")
    key = lambda r: (r.question_id, r.question, r.answer, r.category)
    assert sorted(map(key, folder)) == sorted(map(key, parquet))
    assert len(parquet) == 2 * 3 * len(CATEGORIES)
    same = next(p for p in parquet if p.question_id == folder[0].question_id)
    assert folder[0].image().tobytes() == same.image().tobytes()
    assert all(r.question.endswith(" Please answer yes or no.") for r in parquet)


def test_folder_layout_with_images_and_qa_subfolders(tmp_path):
    from PIL import Image
    cat = tmp_path / "artwork"
    (cat / "images").mkdir(parents=True)
    (cat / "questions_answers_YN").mkdir()
    Image.new("RGB", (8, 8)).save(cat / "images" / "10.jpg")
    (cat / "questions_answers_YN" / "10.txt").write_text(
        "Is it red? Please answer yes or no.\tNo\nIs it black? Please answer yes or no.\tYes\n")
    recs = load_mme(tmp_path)
    assert [(r.question_id, r.answer) for r in recs] == [("artwork/10.jpg", "No"), ("artwork/10.jpg", "Yes")]


def test_cli_writes_the_high_resolution_split_at_the_asked_canvas(tmp_path):
    from vtc.cli import main

    assert main(["data", "shapes-mme", "--out", str(tmp_path / "hi"), "--per-category", "1", "--canvas", "224"]) == 0
    assert main(["data", "shapes-mme", "--out", str(tmp_path / "lo"), "--per-category", "1"]) == 0
    assert {r.image().size for r in load_mme(tmp_path / "hi" / "mme.parquet")} == {(224, 224)}
    assert {r.image().size for r in load_mme(tmp_path / "lo" / "mme.parquet")} == {(112, 112)}
