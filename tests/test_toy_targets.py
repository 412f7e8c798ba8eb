"""Training targets of the toy trainer on hand-built scenes: per-patch labels and answer-position summaries."""
import pytest
import torch
import torch.nn.functional as F

from vtc.zoo.shapes import Obj, Scene
from vtc.zoo.summary_aux import HEADS, SummaryHeads, summary_targets, word_alignment_loss, word_target
from vtc.zoo.train_toy import PATCH_TARGETS, dense_loss, patch_labels

SCENE = Scene([Obj("square", "blue", "large", (16, 16, 40, 40)),  # patches rows/cols 2..4 of a 14x14 grid (8 px)
               Obj("circle", "red", "small", (80, 8, 88, 16))], digit="7", digit_box=(96, 96, 104, 104))


def test_patch_labels_hand_case():
    lab = patch_labels(SCENE, 112, 14)
    assert lab.shape == (len(PATCH_TARGETS), 196)
    square = [r * 14 + c for r in (2, 3, 4) for c in (2, 3, 4)]
    assert set(torch.nonzero(lab[1] == 2).flatten().tolist()) == set(square)  # shape index 1 ("square") + 1
    assert (lab[0, square] == 3).all()  # colour "blue" is the third colour
    assert (lab[3, square] == 1 + 2 * 4 + 1).all()  # conjunction: 1 + colour * 4 + shape
    assert torch.nonzero(lab[4]).flatten().tolist() == [1 * 14 + 10, 3 * 14 + 3]  # one centre patch per object
    assert lab[4, 3 * 14 + 3] == 2 and lab[4, 1 * 14 + 10] == 1  # square, circle
    assert (lab[2, 12 * 14 + 12] == 8) and (lab[2] > 0).sum() == 1  # digit 7 -> 8
    assert (lab[0] == 1).sum() >= 1 and (lab[0, 1 * 14 + 10] == 1)  # the small red circle's patch


def test_summary_targets_parse_each_category():
    t = summary_targets("Is the square on the right of the circle?", SCENE, 112)
    assert (t["q_shape"], t["q_shape2"], t["q_relation"], t["q_color"]) == (2, 1, 2, 0)
    # present: colours (red, green, blue, yellow, purple) then shapes (circle, square, triangle, cross)
    assert t["present"].nonzero().flatten().tolist() == [0, 2, 5, 6]
    assert abs(t["xpos"][1].item() - 28 / 112) < 1e-6 and abs(t["xpos"][0].item() - 84 / 112) < 1e-6
    assert t["xmask"].tolist() == [1, 1, 0, 0] and t["count"].tolist() == [1, 1, 0, 0] and t["digit"] == 8
    t = summary_targets("Are there three crosses in the image?", SCENE, 112)
    assert (t["q_number"], t["q_shape"], t["q_color"]) == (4, 4, 0)
    t = summary_targets("Is there a green object in the image?", SCENE, 112)
    assert (t["q_color"], t["q_shape"]) == (2, 0)
    t = summary_targets("Is there a triangle in the image?", SCENE, 112)
    assert (t["q_color"], t["q_shape"]) == (0, 3)
    t = summary_targets("Is the number 4 written in the image?", SCENE, 112)
    assert t["q_digit"] == 5 and t["q_shape"] == 0
    t = summary_targets("Describe the image.", SCENE, 112)  # caption rows: nothing asked
    assert all(t[k] == 0 for k in ("q_color", "q_shape", "q_number", "q_digit", "q_relation"))


def test_summary_heads_loss_is_finite_and_trains():
    torch.manual_seed(0)
    heads = SummaryHeads(16, 2)
    assert set(heads.sets[0].keys()) == set(HEADS)
    targets = [summary_targets("Is there a circle in the image?", SCENE, 112)] * 4
    h = [torch.randn(4, 16), torch.randn(4, 16)]
    opt = torch.optim.Adam(heads.parameters(), 1e-2)
    first = heads.loss(h, targets)
    for _ in range(50):
        loss = heads.loss(h, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(first) and loss < first / 4


def test_questions_are_balanced_single_attribute_lookups():
    """Every test-style image has one Yes and one No question; each names one shape, colour or digit."""
    import re

    from vtc.zoo.shapes import CATEGORIES, COLORS, SHAPES, ShapesGenerator, plural

    gen = ShapesGenerator(3000)
    words = set(SHAPES) | {plural(s) for s in SHAPES} | set(COLORS)
    for cat in CATEGORIES:
        for _ in range(10):
            _, scene = gen.sample(cat)
            assert [a for _, a in scene.qa] == ["Yes", "No"]
            for q, a in scene.qa:
                named = [w for w in re.findall(r"\w+", q) if w in words]
                assert len(named) == (2 if cat == "position" else 0 if cat == "OCR" else 1), q
                if cat == "existence":
                    assert (named[0] in {o.shape for o in scene.objects}) == (a == "Yes")
                if cat == "color":
                    assert (named[0] in {o.color for o in scene.objects}) == (a == "Yes")


def test_dense_loss_weights_object_patches_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])  # (1 image, 3 patches, 3 classes)
    target = torch.tensor([[0, 1, 2]])
    lse = lambda row: torch.logsumexp(row, 0)
    ce = [lse(logits[0, i]) - logits[0, i, t] for i, t in enumerate([0, 1, 2])]
    expected = sum(ce) / 3 + (ce[1] + ce[2]) / 2  # all patches + the two object patches
    assert torch.allclose(dense_loss(logits, target), expected)
    empty = torch.zeros(1, 3, dtype=torch.long)  # no object patch: the plain loss only
    assert torch.allclose(dense_loss(logits, empty), F.cross_entropy(logits[0], empty[0]))


def test_word_alignment_loss_by_hand():
    emb = torch.eye(4)  # 4 words, hidden 4: word i's embedding is e_i
    words = [[0, 1, 2], [0, 3]]  # attribute 0: none=word 0, classes words 1, 2; attribute 1: none=word 0, word 3
    labels = torch.tensor([[[1, 0], [1, 0]]])  # (rows, attributes, N): token 0 -> class 1 for both, token 1 none
    # token 0 shows words 1 and 3 -> e_1 + e_3; token 1 shows nothing -> 'none' twice -> 2 e_0
    assert torch.equal(word_target(labels, emb, words), torch.tensor([[[0.0, 1, 0, 1], [2.0, 0, 0, 0]]]))
    feats = torch.tensor([[[0.0, 3.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])
    # squared errors: token 0: (3-1)^2 = 4, token 1: (1-2)^2 = 1; mean over 2 tokens x 4 dims
    assert torch.allclose(word_alignment_loss(feats, labels, emb, words), torch.tensor(5 / 8))
    # the column code on a 2x2 grid (4 tokens, columns 0, 1, 0, 1)
    four = torch.zeros(1, 2, 4, dtype=torch.long)  # nothing shown: 2 e_0 everywhere, plus (1-x) e_1 + x e_2
    code = word_target(four, emb, words, x_words=(1, 2))
    assert torch.equal(code[0, :, 0], torch.full((4,), 2.0))
    assert torch.equal(code[0, :, 1], torch.tensor([1.0, 0, 1, 0]))
    assert torch.equal(code[0, :, 2], torch.tensor([0.0, 1, 0, 1]))
    emb.requires_grad_(True)  # the target is detached: only the projector is pulled, not the embeddings
    feats.requires_grad_(True)
    word_alignment_loss(feats, labels, emb, words).backward()
    assert emb.grad is None and feats.grad is not None


@pytest.mark.parametrize("flag, message", [
    ("--resume", "no qwen2-vl vision tower there"),
    ("--init", "a LlavaForConditionalGeneration, not a qwen2-vl toy model"),
])
def test_checkpoint_of_another_family_is_a_clear_error(tmp_path, monkeypatch, flag, message):
    from vtc.zoo import train_toy

    train_toy.Family("llava").new_model().save_pretrained(tmp_path / "llava")
    monkeypatch.setattr("sys.argv", ["train_toy", "--family", "qwen2-vl", "--out", str(tmp_path / "out"),
                                     flag, str(tmp_path / "llava"), "--start-stage", "3"])
    with pytest.raises(ValueError, match=message):
        train_toy.main()


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2-vl"])
def test_frozen_tower_forward_equals_the_models_own(family, tmp_path):
    import random

    from vtc.zoo import train_toy
    from vtc.zoo.shapes import ShapesGenerator

    torch.manual_seed(0)
    fam = train_toy.Family(family)
    if family in ("llava", "qwen2-vl"):
        model = fam.new_model().eval()
    else:  # AnyRes over a 224-px canvas: 14x14 thumbnail + 28 rows of (28 crop tokens + a newline)
        assert fam.n_image == 14 * 14 + 28 * 29 and fam.canvas == 224
        train_toy.Family("llava").new_model().save_pretrained(tmp_path / "llava")
        model = train_toy.next_from_llava(fam, str(tmp_path / "llava")).eval()
    gen = ShapesGenerator(5, canvas=fam.canvas)
    samples = [gen.training_sample(max_questions=3) for _ in range(3)]
    inputs, lab, scenes, image_of_row = train_toy.batch_from(samples, fam, model, 0.0, random.Random(0), True)
    assert len(image_of_row) == len(lab) == sum(len(s[1].qa) for s in samples) > 3  # rows share images
    ref = model(**inputs, labels=lab)
    out, feats = train_toy.forward_frozen_tower(model, fam, inputs, image_of_row, labels=lab)
    assert feats.shape == (len(lab), fam.n_image, model.config.text_config.hidden_size)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5) and torch.allclose(out.loss, ref.loss, atol=1e-6)


def test_llava_next_needs_a_toy_llava_to_start_from(tmp_path, monkeypatch):
    from vtc.zoo import train_toy

    monkeypatch.setattr("sys.argv", ["train_toy", "--family", "llava-next", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--from-llava PATH --start-stage 3 --aux 0"):
        train_toy.main()


def test_resume_and_init_together_is_a_clear_error(tmp_path, monkeypatch):
    from vtc.zoo import train_toy

    monkeypatch.setattr("sys.argv", ["train_toy", "--out", str(tmp_path), "--resume", "a", "--init", "b"])
    with pytest.raises(ValueError, match="not both"):
        train_toy.main()


def test_lr_schedule_follows_the_clock_not_a_step_estimate():
    from vtc.zoo.training import lr_at as _lr

    assert _lr(0, 0.0, 1.0) == pytest.approx(0.01) and _lr(99, 0.0, 1.0) == pytest.approx(1.0)  # warm-up
    assert _lr(5000, 0.0, 1.0) == pytest.approx(1.0)  # many fast steps early in the budget: still full lr
    assert _lr(500, 0.5, 1.0) == pytest.approx(0.5) and _lr(500, 1.0, 1.0) == pytest.approx(0.0)
    assert _lr(500, 1.2, 1.0) == pytest.approx(0.0)  # the last step may run a little past the budget



def test_category_weights_pick_the_scene_category_and_keep_its_questions():
    from vtc.zoo.shapes import ShapesGenerator

    gen = ShapesGenerator(9)
    only_colour = {"existence": 0, "count": 0, "position": 0, "OCR": 0, "color": 1}
    for _ in range(10):
        _, scene = gen.training_sample(max_questions=4, weights=only_colour)
        assert len(scene.qa) == 4 and [a for _, a in scene.qa[:2]] == ["Yes", "No"]
        assert all(q.endswith("object in the image?") for q, _ in scene.qa[:2])  # the colour questions first
        assert len(set(scene.qa)) == 4
    n, position = 600, 0
    for _ in range(n):
        _, scene = gen.training_sample(max_questions=4, weights={"color": 3, "position": 3})
        position += " of the " in scene.qa[0][0]  # "Is the circle on the left of the square?"
    assert abs(position / n - 3 / 9) < 0.06  # the scene's category has weight 3 of 9; uniform would give 1/5
    with pytest.raises(ValueError, match="unknown categories \\['colour'\\]"):
        gen.training_sample(weights={"colour": 2})


def test_category_weights_flag_parses_and_rejects_bad_text():
    from vtc.zoo.train_toy import parse_weights

    assert parse_weights("") is None and parse_weights("color=3, position=2") == {"color": 3.0, "position": 2.0}
    for bad in ("color", "color=x", "color=-1"):
        with pytest.raises(ValueError, match="CATEGORY=NUMBER"):
            parse_weights(bad)


def test_word_spread_loss_on_hand_computed_pairs():
    from vtc.zoo.summary_aux import word_spread_loss

    # three words: 0 and 1 at cosine 0.6, 2 orthogonal to both; 3 is not asked about
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], requires_grad=True)
    loss = word_spread_loss(emb, [0, 1, 2], max_cos=0.2)
    assert torch.allclose(loss, torch.tensor((0.6 - 0.2) ** 2 / 3))  # one pair over the margin, three pairs
    loss.backward()
    assert emb.grad[2].abs().sum() == 0 and emb.grad[3].abs().sum() == 0 and emb.grad[0].abs().sum() > 0
    assert word_spread_loss(emb, [0, 2]).item() == 0.0
