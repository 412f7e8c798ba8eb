"""The toy video model (LLaVA-OneVision from the toy LLaVA): conversion, training inputs == evaluation inputs,
letter tokens, and Video-MME batches whose videos have different frame counts."""
import pytest
import torch

from vtc.eval.videomme_scoring import extract_letter, videomme_prompt
from vtc.zoo.models import TOY_LLAVA
from vtc.zoo.shapes_video import ShapesVideoGenerator

pytestmark = pytest.mark.skipif(not (TOY_LLAVA / "config.json").exists(), reason="needs the bundled toy LLaVA")


@pytest.fixture(scope="module")
def converted():
    from vtc.zoo.processor import build_llava_onevision_processor
    from vtc.zoo.train_toy import IMAGE_SIZE, NEXT_PINPOINTS, PATCH
    from vtc.zoo.train_video import onevision_from_llava

    proc = build_llava_onevision_processor(IMAGE_SIZE, PATCH, NEXT_PINPOINTS)
    return onevision_from_llava(TOY_LLAVA, proc).eval(), proc


def test_conversion_keeps_the_llava_weights(converted):
    from vtc.zoo.models import load_model

    model, proc = converted
    src = load_model(TOY_LLAVA)[0]
    s = src.state_dict()
    for k, v in model.state_dict().items():
        if k == "model.image_newline":
            continue
        if "embed_tokens" in k or k == "lm_head.weight":  # grown by the new tokens, old rows kept
            assert v.shape[0] == len(proc.tokenizer) > s[k].shape[0]
            assert torch.equal(v[: s[k].shape[0]], s[k])
        else:
            assert torch.equal(v, s[k]), k


def test_letters_are_tokens_and_replies_parse(converted):
    _, proc = converted
    tok = proc.tokenizer
    ids = tok("A. red\nB. blue", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["A", ".", "red", "B", ".", "blue"]  # upper-case letters survive
    assert extract_letter(tok.decode(tok.convert_tokens_to_ids(["C"]), skip_special_tokens=True)) == "C"
    assert len({tok.convert_tokens_to_ids(x) for x in "ABCD"}) == 4


def test_training_inputs_equal_the_models_own_forward(converted):
    """What the trainer feeds (features scattered into expanded placeholders) == processor + model forward."""
    from vtc.zoo.train_video import Sample, batch_forward, encode, project, tower_features

    model, proc = converted
    clip = ShapesVideoGenerator(3).clip("order", "short")
    conv = [{"role": "user", "content": [{"type": "video"},
                                         {"type": "text", "text": videomme_prompt(clip.question, clip.options)}]}]
    enc = proc(text=[proc.apply_chat_template(conv, add_generation_prompt=True)], videos=[list(clip.frames)],
               return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    s = Sample.__new__(Sample)
    with torch.no_grad():  # the trainer's split path: frozen tower once, then projector + pooling + newline
        s.clip, s.feats = clip, project(model, tower_features(model, proc, clip.frames))
    s.evidence = torch.zeros(len(s.feats), dtype=torch.bool)
    assert len(s.feats) == 16 * 49 + 1  # 16 frames pooled 2x2 to 7x7, one newline
    s.ids, s.labels = encode(proc, clip, len(s.feats), answer=True)
    n = enc["input_ids"].shape[1]
    assert s.ids[:n] == enc["input_ids"][0].tolist()
    assert proc.tokenizer.convert_ids_to_tokens(s.ids[n:]) == [clip.answer, "</s>"]
    assert [x for x in s.labels if x != -100] == s.ids[n:]
    with torch.no_grad():
        out = batch_forward(model, proc, [s], -1)[0]
    torch.testing.assert_close(out.logits[0, :n], ref, rtol=1e-4, atol=1e-4)


def test_mixed_frame_counts_batch_like_single_rows(converted, tmp_path):
    """A Video-MME batch holding 16- and 32-frame videos (OneVision takes one frame count per call) gives the
    same replies as one video at a time."""
    from vtc.eval.videomme_data import load_videomme, write_shapes_video
    from vtc.eval.videomme_runner import evaluate_videomme

    model, proc = converted
    recs = load_videomme(write_shapes_video(tmp_path / "sv", seed=7, per_cell=1))
    recs = [r for r in recs if r.duration == "short"][:2] + [r for r in recs if r.duration == "medium"][:2]
    kw = dict(frames=32, max_new_tokens=2, progress=False)
    batched = evaluate_videomme(model, proc, recs, batch_size=4, **kw)["predictions"]
    single = evaluate_videomme(model, proc, recs, batch_size=1, **kw)["predictions"]
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in single]
    assert [p["question_id"] for p in batched] == [r.question_id for r in recs]


def test_answer_attention_rows_equal_eager_attention(converted):
    """The evidence loss's attention rows, computed from captured q/k under sdpa, equal eager attention's."""
    from vtc.zoo.shapes_video import ShapesVideoGenerator as Gen
    from vtc.zoo.train_video import (AnswerAttention, Sample, batch_forward, encode, evidence_mask, project,
                                     tower_features)

    model, proc = converted
    gen, rows = Gen(4), []
    for task, n in (("change", 8), ("count", 5)):  # two rows of different lengths: right padding
        clip = gen.clip(task, "short")
        s = Sample.__new__(Sample)
        idx = list(range(n))
        with torch.no_grad():
            s.clip, s.feats = clip, project(model, tower_features(model, proc, [clip.frames[t] for t in idx]))
        s.evidence = evidence_mask(clip, idx)
        s.ids, s.labels = encode(proc, clip, len(s.feats), answer=True, content_first=True)
        rows.append(s)
    lm = model.model.language_model
    cap = AnswerAttention(lm, (1, 2))
    with torch.no_grad():
        out, lab, evidence, am = batch_forward(model, proc, rows, -1)
        pos = (lab != -100).float().argmax(1) - 1
        got = cap.rows(pos, am)
        cap.remove()
        model.set_attn_implementation("eager")
        try:
            ref = batch_forward(model, proc, rows, -1, output_attentions=True)[0]
        finally:
            model.set_attn_implementation("sdpa")
    b = torch.arange(len(rows))
    want = torch.stack([ref.attentions[j][b, :, pos] for j in (1, 2)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert evidence.sum() == sum(int(s.evidence.sum()) for s in rows) > 0
    with torch.no_grad():
        batch_forward(model, proc, rows, -1)
    assert cap.grab == {}  # removed: nothing captured any more



def test_cell_targets_hand_computed(converted):
    """One red circle with box (16, 16, 40, 40) on a 112-px frame, 7x7 cells of 16 px: it covers cells (1, 1)
    fully and (1, 2), (2, 1), (2, 2) by half or a quarter (> 20 %), its centre (28, 28) is in (1, 1)."""
    import numpy as np

    from vtc.zoo.shapes import Obj
    from vtc.zoo.shapes_video import Clip
    from vtc.zoo.train_video import cell_targets

    model, proc = converted
    tok, emb = proc.tokenizer, model.get_input_embeddings().weight
    words = ("empty", "object", "red", "circle", "left", "right", "up", "down")
    w = {x: emb[tok.convert_tokens_to_ids(x)] for x in words}
    for x in ("left", "right", "up", "down"):
        w[x] = w[x] * 0.75 / w[x].norm()
    clip = Clip([np.zeros((112, 112, 3), np.uint8)], "change", "short", "", [], "A",
                layouts=[[Obj("circle", "red", "large", (16, 16, 40, 40))]])
    got = cell_targets(clip, [0], emb, tok)
    assert got.shape == (49 + 1, emb.shape[1])

    def code(r, c):
        return (1 - c / 6) * w["left"] + c / 6 * w["right"] + (1 - r / 6) * w["up"] + r / 6 * w["down"]

    obj = w["red"] + w["circle"] + w["empty"]
    for r in range(7):
        for c in range(7):
            if (r, c) == (1, 1):
                want = obj + w["object"]
            elif (r, c) in ((1, 2), (2, 1), (2, 2)):
                want = obj + w["empty"]
            else:
                want = 3 * w["empty"]
            torch.testing.assert_close(got[r * 7 + c], (want + code(r, c)).detach())
    torch.testing.assert_close(got[-1], (4 * w["empty"]).detach())


def test_option_positions_and_layouts(converted):
    from vtc.zoo.train_video import encode, option_positions

    _, proc = converted
    clip = ShapesVideoGenerator(3).clip("order", "short")
    assert len(clip.layouts) == len(clip.frames) == 16
    assert [len(objs) for objs in clip.layouts] == [sum(t >= (k + 1) * 16 // 5 for k in range(4)) for t in range(16)]
    ids, _ = encode(proc, clip, 3, answer=True)
    toks = proc.tokenizer.convert_ids_to_tokens(ids)
    assert toks.index("<video>") < toks.index("which")  # the video comes first, then the question
    pos = option_positions(ids, proc.tokenizer)
    assert [toks[p] for p in pos] == [o.split()[-1] for o in clip.options]
    assert [toks[p - 3] for p in pos] == list("ABCD")  # "A . yellow triangle": two words after "A ."
    with pytest.raises(ValueError, match="expected 4 options"):
        option_positions(ids[: pos[1]], proc.tokenizer)  # cut after option B: only two options


def test_pixel_values_equal_the_video_processor(converted):
    """The trainer's device-side normalisation == the video processor's pixel values; other sizes go through it."""
    import numpy as np

    from vtc.zoo.train_video import pixel_values

    _, proc = converted
    frames = np.stack(ShapesVideoGenerator(5).clip("motion", "short").frames[:4])
    want = proc.video_processor([list(frames)], return_tensors="pt")["pixel_values_videos"][0]
    torch.testing.assert_close(pixel_values(proc, frames), want, rtol=0, atol=1e-6)
    big = np.repeat(np.repeat(frames, 2, 1), 2, 2)  # 224 px: resized by the processor
    assert pixel_values(proc, big).shape == want.shape


def test_letter_loss_reads_the_token_before_eos():
    import torch.nn.functional as F

    from vtc.zoo.train_video import letter_loss

    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, 5, 7, 9, -100], [-100, 3, 4, 8, -100, -100]])  # replies "5 7 </s>", "3 4 </s>"
    logits = torch.randn(2, 6, 12)
    want = F.cross_entropy(logits[0, 2][None], torch.tensor([7]))  # row 0: letter 7 at 3, predicted from 2
    want = want + F.cross_entropy(logits[1, 1][None], torch.tensor([4]))  # row 1: letter 4 at 2, from 1
    torch.testing.assert_close(letter_loss(logits, labels), want / 2)


def test_rows_drawn_by_workers_equal_rows_drawn_in_process(converted):
    """RowStream with worker processes gives the same rows, in order, as drawing them in the trainer; the batched
    tower in make_samples equals one clip at a time."""
    import numpy as np

    from vtc.zoo.train_video import RowStream, cell_targets, make_samples, tower_features

    model, proc = converted
    serial, parallel = RowStream(11, 4, raw=True), RowStream(11, 4, raw=True, workers=2)
    try:
        for text_only in (False, True):
            a, b = serial.take(3, text_only), parallel.take(3, text_only)
            if not text_only:
                video_rows = a
            assert [r.ids for r in a] == [r.ids for r in b] and [r.options for r in a] == [r.options for r in b]
            for x, y in zip(a, b):
                assert (x.frames is None) == text_only == (y.frames is None)
                if not text_only:
                    assert np.array_equal(x.frames, y.frames) and np.array_equal(x.coef, y.coef)
    finally:
        parallel.close()
    # the evidence mask is drawn only when asked (the evidence loss): the same rows, all-False masks otherwise
    with_evidence = RowStream(11, 4, raw=True, evidence=True).take(3)
    assert [r.ids for r in with_evidence] == [r.ids for r in video_rows]
    assert all(r.evidence.shape == (len(r.coef),) and not r.evidence.any() for r in video_rows)
    assert all(r.evidence.shape == (len(r.coef),) for r in with_evidence)
    assert any(r.evidence.any() for r in with_evidence) and not any(r.evidence[-1] for r in with_evidence)
    rows = serial.take(3)
    with torch.no_grad():
        samples = make_samples(model, proc, rows)
        for r, s in zip(rows, samples):
            torch.testing.assert_close(s.tower, tower_features(model, proc, r.frames), rtol=1e-4, atol=1e-5)
            assert s.feats.shape == (len(r.frames) * 49 + 1, model.config.text_config.hidden_size)
            last_word = s.clip.options[s.correct].split()[-1]
            assert s.ids[s.options[s.correct]] == proc.tokenizer.convert_tokens_to_ids(last_word)
    assert s.target.shape == s.feats.shape and cell_targets is not None
