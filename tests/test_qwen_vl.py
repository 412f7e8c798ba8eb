"""Qwen2-VL / Qwen2.5-VL: the same matrix as LLaVA, plus M-RoPE decode loops, video frame groups, window order."""
import pytest
import torch

import vtc
from vtc.zoo.tiny import qwen_inputs, tiny_qwen_vl

VERSIONS = ["2", "2.5", "3"]
METHODS = [("cls", dict(ratio=0.25)), ("random", dict(ratio=0.25)), ("uniform", dict(ratio=0.25)),
           ("pool", dict(ratio=0.25)), ("fastv", dict(ratio=0.5)), ("aim", dict(ratio=0.5, l1=1, l2=3))]
GRIDS = [(1, 8, 8), (1, 8, 16)]  # 16 and 32 visual tokens: rows keep different counts


def batch():
    return qwen_inputs(GRIDS, [[1, 5], [1]], [[7, 8, 9], [7, 8]])


def gen(m, b, n=6, **kw):
    # random tiny models may emit the image/video placeholder ids themselves; keep them out of the outputs
    return m.generate(**b, max_new_tokens=n, do_sample=False, suppress_tokens=[100, 101, 102, 103], **kw)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("method,kw", METHODS)
def test_identity_cached_uncached_counts(version, method, kw):
    m = tiny_qwen_vl(version, text_layers=4)
    b = batch()
    ref = gen(m, b)
    with vtc.patched(m, method, ratio=1.0, **{k: v for k, v in kw.items() if k != "ratio"}):
        if method not in ("fastv", "aim"):  # in-LLM methods still prune at ratio 1.0 by design (aim schedule)
            assert torch.equal(gen(m, b), ref)
    p = vtc.patch(m, method, **kw)
    a = gen(m, b, n=8)
    st = p.stats[0]
    assert st.tokens_before == [16, 32]
    if method in ("fastv",):
        assert st.tokens_after == [16, 32] and st.layer_tokens[2] == [8, 16]
    elif method == "aim":
        # layer 1's dropped tokens stay as queries through layer 2 (the authors' masking), then leave
        assert st.tokens_after == [8, 16] and st.layer_tokens[2] == [8, 16] and st.layer_tokens[3] == [0, 0]
    else:
        assert st.tokens_after == [4, 8]
    assert torch.equal(a, gen(m, b, n=8, use_cache=False))
    vtc.unpatch(m)
    assert torch.equal(gen(m, b), ref)


@pytest.mark.parametrize("version", VERSIONS)
def test_left_padded_batch_equals_singles(version):
    m = tiny_qwen_vl(version)
    b = batch()
    vtc.patch(m, "cls", ratio=0.25)
    out = gen(m, b, n=8)
    width = b["input_ids"].shape[1]
    patches = [t * h * w for t, h, w in GRIDS]
    start = 0
    for i in range(2):
        single = qwen_inputs([GRIDS[i]], [[[1, 5], [1]][i]], [[[7, 8, 9], [7, 8]][i]])
        single["pixel_values"] = b["pixel_values"][start:start + patches[i]]
        start += patches[i]
        s = gen(m, single, n=8)
        assert torch.equal(s[0, single["input_ids"].shape[1]:], out[i, width:])


@pytest.mark.parametrize("version", VERSIONS)
def test_sdpa_equals_eager(version):
    outs = []
    for attn in ("sdpa", "eager"):
        m = tiny_qwen_vl(version, attn=attn, text_layers=4)
        vtc.patch(m, "aim", ratio=0.5, l1=1, l2=3)
        outs.append(gen(m, batch(), n=8))
    assert torch.equal(outs[0], outs[1])


def test_manual_decode_loop_equals_generate():
    """A hand-written loop passing no mask/positions at decode (with a mask, transformers 5.23 itself fails on
    Qwen2-VL: its decode positions span the whole mask) gives generate()'s tokens after pruning."""
    m = tiny_qwen_vl("2")
    b = qwen_inputs([(1, 8, 16)], [[1, 5]], [[7, 8, 9]])
    vtc.patch(m, "cls", ratio=0.25)
    ref = gen(m, b, n=5)[0, b["input_ids"].shape[1]:]
    with torch.no_grad():
        out = m(**b, use_cache=True)
        cache, am, toks = out.past_key_values, b["attention_mask"], []
        for _ in range(5):
            logits = out.logits[:, -1].clone()
            logits[:, [100, 101, 102, 103]] = float("-inf")
            t = logits.argmax(-1, keepdim=True)
            toks.append(t)
            am = torch.cat([am, torch.ones(1, 1, dtype=am.dtype)], 1)
            out = m(input_ids=t, past_key_values=cache, use_cache=True, attention_mask=None)
    assert torch.equal(torch.cat(toks, 1)[0], ref)


def test_video_frame_groups_get_their_own_budget():
    m = tiny_qwen_vl("2")
    b = qwen_inputs([(2, 8, 8), (2, 8, 8)], [[1, 5], [1]], [[7, 8], [7]], video=True)  # 2 frame groups x 16 tokens
    p = vtc.patch(m, "cls", ratio=0.25)
    a = gen(m, b, n=6)
    assert p.stats[0].tokens_before == [32, 32] and p.stats[0].tokens_after == [8, 8]
    for keep in p.last_kept():
        assert keep[:16].sum() == 4 and keep[16:].sum() == 4
    assert torch.equal(a, gen(m, b, n=6, use_cache=False))


def test_qwen25_planted_token_is_kept_despite_window_order():
    """Make one merged unit receive all the attention in the full-attention block; it must be the one kept."""
    m = tiny_qwen_vl("2.5")
    v = m.model.visual
    attn = v.blocks[1].attn
    d = attn.qkv.in_features
    a = torch.randn(d)
    with torch.no_grad():
        attn.qkv.weight[:d] = 0
        attn.qkv.bias[:d] = a  # every query = a
        attn.qkv.weight[d:2 * d] = torch.eye(d)
        attn.qkv.bias[d:2 * d] = 0  # key = input
        v.rotary_pos_emb.inv_freq.zero_()  # no rotation, so q.k = a.x
    grid = torch.tensor([[1, 8, 16]])
    from transformers.vision_utils import get_vision_window_index
    window_index = get_vision_window_index(grid, spatial_merge_size=2, window_size=v.window_size,
                                           patch_size=v.patch_size)[0]
    assert not torch.equal(window_index, torch.arange(len(window_index)))  # the order really is permuted
    planted = 13  # merged unit in raster (token) order
    pos = (window_index == planted).nonzero()[0, 0].item()  # where it sits in window order

    def plant(module, args, kwargs):  # the block passes hidden_states positionally
        h = torch.zeros_like(args[0])
        h[pos * 4:(pos + 1) * 4] = 10 * a
        return (h,) + args[1:], kwargs

    handle = attn.register_forward_pre_hook(plant, with_kwargs=True)
    b = qwen_inputs([(1, 8, 16)], [[1]], [[7]])
    p = vtc.patch(m, "cls", tokens=1)
    with torch.no_grad():
        m(**b)
    handle.remove()
    assert p.last_kept()[0].nonzero()[:, 0].tolist() == [planted]


def test_cls_score_cls_refused_on_qwen():
    with pytest.raises(ValueError, match="needs a vision tower with a CLS token"):
        vtc.patch(tiny_qwen_vl("2"), "cls", ratio=0.5, score="cls")


def test_qwen3_in_llm_pruning_must_follow_deepstack_layers():
    m = tiny_qwen_vl("3", text_layers=4)
    with pytest.raises(ValueError, match="must start after the 1 deepstack layer"):
        vtc.patch(m, "aim", l1=0, l2=3)
    assert vtc.get_patch(m) is None and "get_image_features" not in m.model.__dict__
