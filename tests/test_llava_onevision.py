"""LLaVA-OneVision: AnyRes images (SigLIP, no CLS) and videos (2x2-pooled frames + one newline per video)."""
import pytest
import torch
import torch.nn.functional as F

import vtc
from conftest import ScoreRecorder, single_row
from vtc.zoo.tiny import QWEN_VIDEO, left_pad, llava_next_tokens, llava_prompt, tiny_llava_onevision

FRAMES, PER_FRAME = 4, 4  # 4x4 tokens per frame pool to 2x2
N_VIDEO = FRAMES * PER_FRAME + 1


@pytest.fixture(scope="module")
def video_batch():
    g = torch.Generator().manual_seed(4)
    rows = [[1, 5] + [QWEN_VIDEO] * N_VIDEO + [7, 8], [1] + [QWEN_VIDEO] * N_VIDEO + [7, 8, 9]]
    ids, am = left_pad(rows)
    return {"input_ids": ids, "attention_mask": am,
            "pixel_values_videos": torch.randn(2, FRAMES, 3, 32, 32, generator=g), "rows": rows}


@pytest.fixture(scope="module")
def image_batch():
    sizes = [(32, 32), (40, 64)]
    n = llava_next_tokens(tiny_llava_onevision(), sizes)
    rows = [llava_prompt(k, [1, 5], [7, 8, 9]) for k in n]
    ids, am = left_pad(rows)
    g = torch.Generator().manual_seed(5)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(2, 5, 3, 32, 32, generator=g),
            "image_sizes": torch.tensor(sizes), "n": n}


def gen(m, b, n=6, **kw):
    return m.generate(**{k: v for k, v in b.items() if k not in ("rows", "n")}, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("method", ["cls", "uniform", "random", "aim"])
def test_video_matrix(video_batch, method):
    m = tiny_llava_onevision()
    ref = gen(m, video_batch)
    with vtc.patched(m, method, ratio=1.0):
        assert torch.equal(gen(m, video_batch), ref)
    p = vtc.patch(m, method, ratio=0.5)
    out = gen(m, video_batch, n=8)
    # two of the four pooled tokens of every frame, plus the newline
    assert p.stats[-1].tokens_after == [FRAMES * 2 + 1] * 2
    for keep in p.last_kept():
        assert keep.shape == (N_VIDEO,) and bool(keep[-1])
        assert keep[:-1].view(FRAMES, PER_FRAME).sum(1).tolist() == [2] * FRAMES
    assert torch.equal(out, gen(m, video_batch, n=8, use_cache=False))
    width = video_batch["input_ids"].shape[1]
    for i, row in enumerate(video_batch["rows"]):
        single = single_row(video_batch, i, "pixel_values_videos")
        assert torch.equal(gen(m, single, n=8)[0, len(row):], out[i, width:])
    beams = gen(m, video_batch, n=4, num_beams=2)
    assert p.stats[-1].tokens_after == [FRAMES * 2 + 1] * 4  # beam rows found their keep sets
    assert beams.shape[0] == 2
    vtc.unpatch(m)
    assert torch.equal(gen(m, video_batch), ref)


@pytest.mark.parametrize("method", ["cls", "uniform", "pool"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_image_matrix(image_batch, method, attn):
    m = tiny_llava_onevision(attn=attn)
    p = vtc.patch(m, method, ratio=0.5 if method == "pool" else 0.25)
    out = gen(m, image_batch, n=8)
    assert all(a < b for a, b in zip(p.stats[-1].tokens_after, image_batch["n"]))
    assert torch.equal(out, gen(m, image_batch, n=8, use_cache=False))


def test_video_scores_follow_the_pooling(video_batch):
    """Each pooled token's score is the model's own 2x2 bilinear pooling of the eager attention received."""
    m = tiny_llava_onevision()
    rec = ScoreRecorder(ratio=0.5, kind="received", layer=2)
    with vtc.patched(m, rec):
        gen(m, video_batch, n=1)
    m.set_attn_implementation("eager")
    frames = video_batch["pixel_values_videos"].flatten(0, 1)
    att = m.model.vision_tower(frames, output_attentions=True).attentions[2].mean(1).mean(1)  # (8, 16)
    pooled = F.interpolate(att.view(-1, 1, 4, 4), size=(2, 2), mode="bilinear").flatten(1)  # (8, 4)
    for i, (lay, score) in enumerate(rec.seen):
        assert lay.kind == "frames" and lay.view.tolist() == [t for t in range(FRAMES) for _ in range(4)] + [-1]
        torch.testing.assert_close(score[:-1].view(FRAMES, 4), pooled[i * FRAMES:(i + 1) * FRAMES],
                                   atol=1e-5, rtol=1e-5)


def test_globalcom2_refuses_onevision():
    with pytest.raises(ValueError, match="CLS"):
        vtc.patch(tiny_llava_onevision(), "globalcom2", ratio=0.25)


@pytest.mark.parametrize("method", ["cls", "uniform"])
def test_video_budget_for_the_whole_video(video_batch, method):
    """``tokens=`` is the budget of the whole video, spread evenly over its frames (``ratio=`` is per frame)."""
    m = tiny_llava_onevision()
    p = vtc.patch(m, method, tokens=FRAMES * 3)
    gen(m, video_batch, n=2)
    assert p.stats[-1].tokens_after == [FRAMES * 3 + 1] * 2  # three of each frame's four pooled tokens + newline
    for keep in p.last_kept():
        assert keep[:-1].view(FRAMES, PER_FRAME).sum(1).tolist() == [3] * FRAMES and bool(keep[-1])
    vtc.unpatch(m)
