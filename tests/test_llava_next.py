"""LLaVA-NeXT AnyRes: the correctness matrix, score/layout alignment with packed tokens, GlobalCom² budgets."""
import math

import pytest
import torch

import vtc
from conftest import ScoreRecorder, single_row
from vtc.methods.globalcom2 import crop_retention
from vtc.zoo.tiny import left_pad, llava_next_tokens, llava_prompt, tiny_llava_next

SIZES = [(32, 32), (40, 64), (64, 40)]  # square (1 crop + thumb), wide (row-unpadded), tall (column-unpadded)
METHODS = ["cls", "random", "uniform", "globalcom2", "aim"]


@pytest.fixture(scope="module")
def next_batch():
    m = tiny_llava_next()
    n = llava_next_tokens(m, SIZES)
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(len(SIZES), 5, 3, 32, 32, generator=g)
    rows = [llava_prompt(k, [1, 5] + [6] * i, [7, 8, 9]) for i, k in enumerate(n)]
    ids, am = left_pad(rows)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_sizes": torch.tensor(SIZES),
            "rows": rows, "n": n}


def gen(m, b, n=6, **kw):
    keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    return m.generate(**{k: b[k] for k in keys}, max_new_tokens=n, do_sample=False, **kw)


def test_tiny_next_token_counts(next_batch):
    # 16 thumbnail + unpadded 4x4-token crops + one newline per canvas row
    assert next_batch["n"] == [16 + 4 * 5, 16 + 6 * 9, 16 + 8 * 7]


@pytest.mark.parametrize("method", METHODS)
def test_ratio_one_is_identity(next_batch, method):
    m = tiny_llava_next()
    b = next_batch
    fw = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    ref_logits, ref = m(**fw).logits, gen(m, b)
    with vtc.patched(m, method, ratio=1.0) as p:
        assert torch.equal(m(**fw).logits, ref_logits)
        assert torch.equal(gen(m, b), ref)
        assert p.stats[-1].tokens_after == b["n"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_equals_uncached(next_batch, method, attn):
    m = tiny_llava_next(attn=attn)
    p = vtc.patch(m, method, ratio=0.25, **({"anyres_merge": True} if method == "aim" else {}))
    cached = gen(m, next_batch, n=8)
    assert all(a < b for a, b in zip(p.stats[-1].tokens_after, next_batch["n"]))
    assert torch.equal(cached, gen(m, next_batch, n=8, use_cache=False))
    vtc.unpatch(m)
    assert torch.equal(gen(m, next_batch, n=8), tiny_llava_next(attn=attn).generate(
        **{k: next_batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")},
        max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("method", ["cls", "globalcom2"])
def test_batch_of_aspect_ratios_equals_single_runs(next_batch, method):
    m = tiny_llava_next()
    vtc.patch(m, method, ratio=0.25)
    out = gen(m, next_batch, n=8)
    width = next_batch["input_ids"].shape[1]
    for i, row in enumerate(next_batch["rows"]):
        single = single_row(next_batch, i, "pixel_values", "image_sizes")
        assert torch.equal(gen(m, single, n=8)[0, len(row):], out[i, width:])


def test_per_view_budgets_and_newlines_kept(next_batch):
    m = tiny_llava_next()
    p = vtc.patch(m, "uniform", ratio=0.25)
    gen(m, next_batch, n=1)
    seen = p.runtime.last_layouts
    for keep, lay in zip(p.last_kept(), seen):
        assert bool(keep[lay.view < 0].all())  # every newline survives
        for v in lay.views():
            n = int((lay.view == v).sum())
            assert int(keep[lay.view == v].sum()) == max(1, round(n * 0.25))


def test_scores_align_with_packed_tokens(next_batch):
    """Every packed token's score is the eager CLS attention of the crop patch it came from (a patch in crop k
    lands on the packed index of crop k, also after unpadding wide and tall images)."""
    m = tiny_llava_next()
    rec = ScoreRecorder(ratio=0.5, kind="cls_prob", layer=1)
    with vtc.patched(m, rec):
        gen(m, next_batch, n=1)
    m.set_attn_implementation("eager")
    pv = next_batch["pixel_values"]
    h = w = 4
    for i, (lay, score) in enumerate(rec.seen):
        crops = pv[i, : 1 + lay.crop_grid[0] * lay.crop_grid[1]]
        att = m.model.vision_tower(crops, output_attentions=True).attentions[1].mean(1)[:, 0, 1:]  # (crops, 16)
        for t in range(lay.view.numel()):
            v, r, c = int(lay.view[t]), int(lay.row[t]), int(lay.col[t])
            if v < 0:
                continue
            if v > 0:
                pi, pj = divmod(v - 1, lay.crop_grid[1])
                r, c = r - pi * h, c - pj * w
                assert 0 <= r < h and 0 <= c < w
            torch.testing.assert_close(score[t], att[v, r * w + c], atol=1e-5, rtol=1e-5)
        # raster order inside each view, newline after every canvas row
        crop = lay.view > 0
        key = lay.row[crop] * 1000 + lay.col[crop]
        assert torch.equal(key, key.sort().values)
    # the wide image lost canvas rows, the tall one canvas columns (unpadding)
    wide, tall = rec.seen[1][0], rec.seen[2][0]
    assert wide.row[wide.view > 0].unique().numel() == 6 and wide.col[wide.view > 0].unique().numel() == 8
    assert tall.row[tall.view > 0].unique().numel() == 8 and tall.col[tall.view > 0].unique().numel() == 6


def test_crop_retention_hand_computed():
    # 4x4 thumbnail, 2x2 crops: region sums S = [10, 0, 0, 0]
    s = torch.zeros(4, 4)
    s[0, 0] = 10.0
    r = crop_retention(s, (2, 2), 0.5, tau=10.0)
    e = [1.0, math.exp(-1), math.exp(-1), math.exp(-1)]
    sigma = [x / sum(e) for x in e]  # 0.475367, 0.174878 x3
    want = [min(0.5 * (1 + sg - 0.25), 1.0) for sg in sigma]  # 0.612684, 0.462439 x3
    torch.testing.assert_close(r, torch.tensor(want, dtype=torch.float64))
    assert abs(float(r[0]) - 0.612684) < 1e-6 and abs(float(r[1]) - 0.462439) < 1e-6
    # large R saturates at 1 with no renormalisation
    assert float(crop_retention(s, (2, 2), 0.9)[0]) == 1.0


def test_globalcom2_budgets_follow_the_formula(next_batch):
    """Crop j keeps int(N_j * r_j) with r_j from the thumbnail's last-layer CLS logits; thumb int(16 R)."""
    m = tiny_llava_next()
    p = vtc.patch(m, "globalcom2", ratio=0.5)
    gen(m, next_batch, n=1)
    keeps, lays = p.last_kept(), p.runtime.last_layouts
    vtc.unpatch(m)
    with torch.no_grad():
        for i, (keep, lay) in enumerate(zip(keeps, lays)):
            crops = next_batch["pixel_values"][i, : 1 + lay.crop_grid[0] * lay.crop_grid[1]]
            tower = m.model.vision_tower
            # the input of the last encoder layer; its CLS query row, head-mean, before softmax
            x = m.model.vision_tower(crops, output_hidden_states=True).hidden_states[-2][0:1]
            attn = tower.encoder.layers[-1].self_attn
            x = tower.encoder.layers[-1].layer_norm1(x)
            q = attn.q_proj(x).view(1, -1, 4, 8).transpose(1, 2)
            k = attn.k_proj(x).view(1, -1, 4, 8).transpose(1, 2)
            logits = (q[:, :, :1] @ k.transpose(-1, -2) * attn.scale).mean(1)[0, 0, 1:]  # thumbnail CLS row
            assert int(keep[lay.view == 0].sum()) == int(16 * 0.5)
            if lay.crop_grid == (0, 0):
                continue
            r = crop_retention(logits.view(4, 4), lay.crop_grid, 0.5)
            for v in lay.views():
                if v:
                    n = int((lay.view == v).sum())
                    assert int(keep[lay.view == v].sum()) == int(n * float(r[v - 1])), (i, v)


def test_globalcom2_errors():
    from vtc.zoo.tiny import tiny_llava

    with pytest.raises(ValueError, match="AnyRes"):
        vtc.patch(tiny_llava(), "globalcom2", ratio=0.25)
    with pytest.raises(ValueError, match="tau"):
        vtc.patch(tiny_llava_next(), "globalcom2", ratio=0.25, tau=0)


def test_count_newlines_option(next_batch):
    m = tiny_llava_next()
    p = vtc.patch(m, "globalcom2", ratio=0.5)
    gen(m, next_batch, n=1)
    default = p.stats[-1].tokens_after
    vtc.unpatch(m)
    p = vtc.patch(m, "globalcom2", ratio=0.5, count_newlines=True)
    gen(m, next_batch, n=1)
    counted = p.stats[-1].tokens_after
    assert all(c < d for c, d in zip(counted, default))
    # kept visual + newlines stays near R of all tokens (int truncation per view only lowers it)
    assert all(c <= 0.5 * n + 1 for c, n in zip(counted, next_batch["n"]))
