"""In-LLM pruning (FastV, AIM) and the merge / importance utilities behind them."""
import numpy as np
import pytest
import torch

import vtc
from vtc.core.merge import bipartite_merge, merge_to
from vtc.core.scores import pagerank_importance, pagerank_importance_qk, pagerank_tiling
from vtc.methods import AIM, ClsPruning, Compose, FastV
from vtc.zoo.tiny import llava_prompt

from conftest import N_TOKENS, greedy, single_row

CASES = [("fastv", dict(ratio=0.5, k=2)), ("aim", dict(ratio=0.5, l1=1, l2=3)),
         ("aim", dict(l1=0, l2=3, merge_mode="mean"))]


@pytest.fixture
def llava4(make_llava):
    return lambda **kw: make_llava(text_layers=4, **kw)


@pytest.mark.parametrize("method,kw", CASES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_equals_uncached(llava4, llava_batch, method, kw, attn):
    m = llava4(attn=attn)
    vtc.patch(m, method, **kw)
    assert torch.equal(greedy(m, llava_batch, n=8), greedy(m, llava_batch, n=8, use_cache=False))


@pytest.mark.parametrize("method,kw", CASES)
def test_sdpa_equals_eager(llava4, llava_batch, method, kw):
    outs = []
    for attn in ("sdpa", "eager"):
        m = llava4(attn=attn)
        vtc.patch(m, method, **kw)
        outs.append(greedy(m, llava_batch, n=8))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method,kw", CASES)
def test_left_padded_batch_equals_singles(llava4, llava_batch, method, kw):
    m = llava4()
    vtc.patch(m, method, **kw)
    out = greedy(m, llava_batch, n=8)
    width = llava_batch["input_ids"].shape[1]
    for i, row in enumerate(llava_batch["rows"]):
        single = single_row(llava_batch, i, "pixel_values")
        assert torch.equal(greedy(m, single, n=8)[0, len(row):], out[i, width:])


def test_schedule_counts_per_layer(make_llava, llava_batch):
    m = make_llava(text_layers=8)
    p = vtc.patch(m, "aim", ratio=0.5, l1=2, l2=6, pagerank="survivors")  # V = 32; 4 pruning steps of 1/4
    greedy(m, llava_batch, n=2)
    st = p.stats[0]
    assert st.tokens_after == [32, 32]
    assert st.layer_tokens == {3: [24, 24], 4: [16, 16], 5: [8, 8], 6: [0, 0], 7: [0, 0]}
    vtc.unpatch(m)
    p = vtc.patch(m, "aim", ratio=0.5, l1=2, l2=6)  # reference: dropped tokens are computed as queries until 5
    greedy(m, llava_batch, n=2)
    assert p.stats[0].layer_tokens == {3: [32, 32], 4: [32, 32], 5: [32, 32], 6: [0, 0], 7: [0, 0]}
    assert p.events["llm_layer.mask"] == 3  # one prefill: layers 2, 3, 4 mask, layer 5 removes
    vtc.unpatch(m)
    p = vtc.patch(m, "fastv", tokens=10, k=3)
    greedy(m, llava_batch, n=2)
    assert p.stats[0].layer_tokens == {j: [10, 10] for j in range(3, 8)}


def test_paper_default_layers_scale_with_depth():
    from vtc.sites import VisionInfo
    a = AIM()
    a.setup(VisionInfo(24, 22, True, (24, 24), llm_layers=32, llm_type="llama"))
    assert (a.l1, a.l2) == (13, 21)
    a = AIM()
    a.setup(VisionInfo(24, 22, True, (24, 24), llm_layers=28, llm_type="qwen2"))
    assert (a.l1, a.l2) == (14, 22)
    a = AIM()
    a.setup(VisionInfo(24, 22, True, (24, 24), llm_layers=16, llm_type="llama"))
    assert (a.l1, a.l2) == (6, 10)  # round(13/2), round(21/2)
    assert a.visual_kept_after(6, 100) == 75 and a.visual_kept_after(9, 100) == 0 and a.visual_kept_after(5, 100) == 100


def _masking_reference(m, batch, decisions):
    """The AIM reference semantics: nothing is removed; after layer i the pruned tokens stop being keys."""
    lm = m.model.language_model
    handles = []
    key_keep = {}
    keep = None
    for j in range(len(lm.layers)):
        if j - 1 in decisions:
            keep = decisions[j - 1]
        if keep is not None:
            key_keep[j] = keep

    def pre(j):
        def hook(mod, args, kwargs):
            mask = kwargs["attention_mask"]
            kk = key_keep.get(j)
            if kk is None:
                return None
            b, L = kk.shape
            base = torch.ones(L, L, dtype=torch.bool).tril()[None, None] if mask is None else mask.bool()
            kw = dict(kwargs)
            allowed = base & kk[:, None, None, :]
            allowed = allowed | torch.eye(L, dtype=torch.bool)[None, None]  # pruned rows still computed
            kw["attention_mask"] = allowed
            return args, kw
        return hook

    for j, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(pre(j), with_kwargs=True))
    try:
        with torch.no_grad():
            return m(**{k: v for k, v in batch.items() if k != "rows"}).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kw", [dict(l1=1, l2=3), dict(l1=0, l2=2)])
def test_removal_equals_masking(llava4, kw):
    """Single sequence (no padding): removing pruned tokens == masking them as keys (the reference)."""
    m = llava4()
    row = llava_prompt(N_TOKENS, [1, 5, 6], [7, 8, 9])
    batch = {"input_ids": torch.tensor([row]), "pixel_values": torch.randn(1, 3, 64, 64)}
    p = vtc.patch(m, "aim", **kw)
    with torch.no_grad():
        logits = m(**batch).logits[:, -1]
    decisions = dict(p.adapter.layer_pruner.memory.entries[-1].decisions)
    vtc.unpatch(m)
    ref = _masking_reference(m, batch, decisions)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_fastv_attention_rows_equal_eager(llava4, llava_batch):
    m = llava4(attn="sdpa")
    seen = []
    method = FastV(ratio=0.5, k=2)
    orig = method.llm_keep

    def spy(inp):
        from vtc.core.scores import attention_rows
        seen.append((attention_rows(inp.q, inp.k, inp.scale, mask=inp.allowed[:, None]), inp.valid.clone()))
        return orig(inp)

    method.llm_keep = spy
    vtc.patch(m, method)
    with torch.no_grad():
        m(input_ids=llava_batch["input_ids"], attention_mask=llava_batch["attention_mask"],
          pixel_values=llava_batch["pixel_values"])
    vtc.unpatch(m)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        out = m(input_ids=llava_batch["input_ids"], attention_mask=llava_batch["attention_mask"],
                pixel_values=llava_batch["pixel_values"], output_attentions=True)
    ref = out.attentions[1][:, :, -1:, :]  # layer k-1 = 1, last query
    rows, valid = seen[0]
    torch.testing.assert_close(rows, ref.float(), atol=1e-5, rtol=1e-5)


def test_compose_cls_then_fastv(llava4, llava_batch):
    m = llava4()
    p = vtc.patch(m, Compose(ClsPruning(ratio=0.5), FastV(ratio=0.5, k=2)))
    a = greedy(m, llava_batch, n=6)
    assert p.stats[0].tokens_after == [32, 32] and p.stats[0].layer_tokens[2] == [16, 16]
    assert torch.equal(a, greedy(m, llava_batch, n=6, use_cache=False))


def test_in_llm_errors(llava4):
    m = llava4()
    with pytest.raises(ValueError, match=r"fastv: k=4 must be in 1..3"):
        vtc.patch(m, "fastv", ratio=0.5, k=4)
    with pytest.raises(ValueError, match=r"aim: need 0 <= l1 < l2 <= 4"):
        vtc.patch(m, "aim", l1=3, l2=9)
    assert vtc.get_patch(m) is None


# ----------------------------------------------------------------------------- merge + importance units
def test_bipartite_merge_hand_computed():
    # sources (even) 0,2 ; destinations (odd) 1,3. metric: 0~1, 2~3 (exact), so r=1 merges the best pair.
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0]])
    x = torch.tensor([[0.0], [2.0], [4.0], [8.0]])
    size = torch.ones(4)
    slot = torch.arange(4)
    _, xm, sm, so = bipartite_merge(metric, x, 1, size, slot)
    # best edge: source 2 -> dest 3 (cosine 1.0) merged: (4+8)/2 = 6 at slot 3; survivors sorted by slot
    assert so.tolist() == [0, 1, 3] and xm[:, 0].tolist() == [0.0, 2.0, 6.0] and sm.tolist() == [1, 1, 2]


def test_weighted_vs_mean_merge():
    metric = torch.tensor([[1.0, 0.0]] * 4)
    x = torch.tensor([[0.0], [0.0], [3.0], [9.0]])
    w, _, _ = merge_to(metric, x, 1, "weighted")
    mn, _, _ = merge_to(metric, x, 1, "mean")
    assert w.item() == pytest.approx(3.0)  # size-weighted mean of all four
    assert mn.item() != pytest.approx(3.0)  # reference plain mean of means differs


@pytest.mark.parametrize("mode", ["weighted", "mean"])
def test_batched_merge_equals_one_sequence_at_a_time(mode):
    torch.manual_seed(1)
    metric, x = torch.randn(5, 196, 16), torch.randn(5, 196, 8)
    feats, sizes, slots = merge_to(metric, x, 49, mode)
    assert feats.shape == (5, 49, 8) and slots.shape == (5, 49)
    for i in range(5):
        f, sz, sl = merge_to(metric[i], x[i], 49, mode)
        assert torch.equal(sl, slots[i]) and torch.equal(sz, sizes[i])
        torch.testing.assert_close(f, feats[i], rtol=1e-6, atol=1e-6)


def test_merge_schedule_matches_reference_576_288_252():
    torch.manual_seed(0)
    feats, sizes, slots = merge_to(torch.randn(576, 16), torch.randn(576, 8), 252)
    assert feats.shape == (252, 8) and sizes.sum().item() == 576
    assert torch.equal(slots, slots.sort().values)


@pytest.mark.parametrize("chunk,block", [(1, 256), (3, 4), (8, 3), (2, 1)])
def test_pagerank_from_qk_in_blocks_equals_the_full_maps(chunk, block):
    torch.manual_seed(0)
    q, k = torch.randn(2, 7, 10, 16), torch.randn(2, 7, 10, 16)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    allowed[1, :, :3] = False  # a left-padded row: its first three keys are padding
    allowed[1, :3] = False
    allowed[:, :, 5] = False  # a dropped token, masked as a key (AIM's reference masking): left out
    allowed[0, :, 8] = False  # masked for one row of the batch only
    full = pagerank_importance(q @ k.transpose(-1, -2) * 0.25, allowed, tau=0.1, iters=5)
    got = pagerank_importance_qk(q, k, 0.25, allowed, 0.1, 5, heads_per_chunk=chunk, block=block)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-7)
    assert got[1, :3].eq(0).all() and got[:, 5].eq(0).all() and got[0, 8] == 0  # nobody attends to them


def test_pagerank_default_tiling():
    assert pagerank_tiling("cpu", 16, 32, 6000) == (128, 4)
    assert pagerank_tiling("cuda", 16, 32, 700) == (1024, 17)  # 512 MiB / (4 B x 16 x 700 x 700)
    assert pagerank_tiling("cuda", 1, 28, 6273) == (1024, 20)
    assert pagerank_tiling("cuda", 64, 28, 20000) == (1024, 1)  # never fewer than one head


def test_pagerank_from_qk_with_a_non_causal_mask():
    torch.manual_seed(1)
    q, k = torch.randn(1, 3, 23, 8), torch.randn(1, 3, 23, 8)
    allowed = torch.rand(1, 23, 23) > 0.4
    allowed[0, 7] = False  # a row that attends nowhere
    allowed[0, :, 11] = False  # a key nobody sees: left out of the maps
    full = pagerank_importance(q @ k.transpose(-1, -2) * 0.5, allowed, tau=0.2, iters=4)
    got = pagerank_importance_qk(q, k, 0.5, allowed, 0.2, 4, heads_per_chunk=2, block=5)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-7)


def test_pagerank_hand_computed():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    got = pagerank_importance(logits, allowed, tau=0.5, iters=3)
    lg = logits[0].numpy() / 0.5
    lg = np.where(allowed[0].numpy(), lg, -np.inf)
    mt = np.exp(lg - lg.max(-1, keepdims=True))
    mt = mt / mt.sum(-1, keepdims=True)
    p = np.full((2, 1, 4), 0.25)
    for _ in range(3):
        p = p @ mt
    ref = np.sqrt((p[:, 0] ** 2).mean(0))
    np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-5)
