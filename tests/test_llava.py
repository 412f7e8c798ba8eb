"""The correctness matrix for every method on tiny random-weight LLaVA models."""
import pytest
import torch

import vtc
from vtc.core.batch import gather_rows, left_repad_index
from vtc.zoo.tiny import left_pad, llava_prompt

from conftest import N_TOKENS, greedy, single_row

METHODS = ["cls", "random", "uniform", "pool"]


@pytest.mark.parametrize("method", METHODS)
def test_ratio_one_is_exact_identity(make_llava, llava_batch, method):
    m = make_llava()
    b = llava_batch
    ref_logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]).logits
    ref = greedy(m, b)
    with vtc.patched(m, method, ratio=1.0) as p:
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]).logits
        out = greedy(m, b)
        assert p.stats[-1].tokens_after == [N_TOKENS, N_TOKENS]
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_equals_uncached_and_exact_counts(make_llava, llava_batch, method, attn):
    m = make_llava(attn=attn)
    p = vtc.patch(m, method, ratio=0.25)
    cached = greedy(m, llava_batch, n=8)
    assert p.stats[-1].tokens_before == [N_TOKENS, N_TOKENS]
    assert p.stats[-1].tokens_after == [16, 16]
    uncached = greedy(m, llava_batch, n=8, use_cache=False)
    assert torch.equal(cached, uncached)
    p = vtc.unpatch(m)


@pytest.mark.parametrize("method", METHODS)
def test_tokens_budget_exact(make_llava, llava_batch, method):
    m = make_llava()
    p = vtc.patch(m, method, tokens=12)
    greedy(m, llava_batch, n=2)
    assert p.stats[0].tokens_after == [12, 12]


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_equals_single_runs(make_llava, llava_batch, method):
    m = make_llava()
    vtc.patch(m, method, ratio=0.25)
    out = greedy(m, llava_batch, n=8)
    width = llava_batch["input_ids"].shape[1]
    for i, row in enumerate(llava_batch["rows"]):
        s = greedy(m, single_row(llava_batch, i, "pixel_values"), n=8)
        assert torch.equal(s[0, len(row):], out[i, width:])


def test_rows_with_different_kept_counts_are_repadded(make_llava):
    """Row 0 has one image, row 1 two images: kept lengths differ, so rows are re-padded; still == singles."""
    m = make_llava()
    g = torch.Generator().manual_seed(5)
    pv = torch.randn(3, 3, 64, 64, generator=g)
    rows = [llava_prompt(N_TOKENS, [1, 5], [7, 8, 9, 10, 11, 12, 13, 14]),
            llava_prompt(N_TOKENS, [1], [4]) + [100] * N_TOKENS + [7, 8]]
    ids, am = left_pad(rows)
    p = vtc.patch(m, "cls", ratio=0.25)
    out = m.generate(input_ids=ids, attention_mask=am, pixel_values=pv, max_new_tokens=8, do_sample=False)
    assert p.stats[-1].tokens_after == [16, 32]
    nc = m.generate(input_ids=ids, attention_mask=am, pixel_values=pv, max_new_tokens=8, do_sample=False,
                    use_cache=False)
    assert torch.equal(out, nc)
    s0 = m.generate(input_ids=torch.tensor([rows[0]]), pixel_values=pv[:1], max_new_tokens=8, do_sample=False)
    s1 = m.generate(input_ids=torch.tensor([rows[1]]), pixel_values=pv[1:], max_new_tokens=8, do_sample=False)
    assert torch.equal(s0[0, len(rows[0]):], out[0, ids.shape[1]:])
    assert torch.equal(s1[0, len(rows[1]):], out[1, ids.shape[1]:])


def test_sdpa_equals_eager(make_llava, llava_batch):
    outs = []
    for attn in ("sdpa", "eager"):
        m = make_llava(attn=attn)
        vtc.patch(m, "cls", ratio=0.25)
        outs.append(greedy(m, llava_batch, n=8))
    assert torch.equal(outs[0], outs[1])


def test_direct_forward_matches_hand_built_reference(make_llava, llava_batch):
    """Patched forward == running the LM on hand-pruned embeddings with the original positions."""
    m = make_llava()
    b = llava_batch
    base = m.model
    with torch.no_grad():
        vt = base.vision_tower(b["pixel_values"], output_attentions=False, output_hidden_states=True)
        feats = base.multi_modal_projector(vt.hidden_states[-2][:, 1:])
    vtc.patch(m, "uniform", ratio=0.25)
    with torch.no_grad():
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    assert out.logits.shape[:2] == b["input_ids"].shape  # logits stay aligned with input_ids
    vtc.unpatch(m)
    from vtc.core.select import uniform_indices
    kept = uniform_indices(N_TOKENS, 16)
    ids, am = b["input_ids"], b["attention_mask"]
    emb = base.get_input_embeddings()(ids)
    visual = ids == 100
    keep = ~visual
    for i in range(2):
        pos_vis = visual[i].nonzero()[:, 0]
        emb[i, pos_vis] = feats[i]
        keep[i, pos_vis[kept]] = True
    index, valid = left_repad_index(keep)
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).expand(2, -1).gather(1, index)
        h = base.language_model(inputs_embeds=gather_rows(emb, index), attention_mask=am.gather(1, index) * valid,
                                position_ids=pos).last_hidden_state
        ref_last = m.lm_head(h[:, -1])
    torch.testing.assert_close(out.logits[:, -1], ref_last, atol=1e-5, rtol=1e-5)
    text = ~visual
    assert out.logits[text].abs().sum() > 0


def test_unpatch_restores_identical_outputs(make_llava, llava_batch):
    m = make_llava()
    ref = greedy(m, llava_batch)
    keys = set(m.model.__dict__)
    n_hooks = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())
    vtc.patch(m, "cls", ratio=0.25)
    assert not torch.equal(greedy(m, llava_batch), ref)
    vtc.unpatch(m)
    assert set(m.model.__dict__) == keys
    assert sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules()) == n_hooks
    assert torch.equal(greedy(m, llava_batch), ref)
    assert vtc.get_patch(m) is None


def test_two_models_do_not_interfere(make_llava, llava_batch):
    a, b = make_llava(seed=0), make_llava(seed=0)
    solo_a = greedy(vtc.patch(a, "cls", ratio=0.25).model, llava_batch)
    vtc.unpatch(a)
    solo_b = greedy(vtc.patch(b, "pool", tokens=4).model, llava_batch)
    vtc.unpatch(b)
    pa = vtc.patch(a, "cls", ratio=0.25)
    pb = vtc.patch(b, "pool", tokens=4)
    assert torch.equal(greedy(a, llava_batch), solo_a)
    assert torch.equal(greedy(b, llava_batch), solo_b)
    assert pa.stats[-1].tokens_after == [16, 16] and pb.stats[-1].tokens_after == [4, 4]


def test_beam_search_and_num_return_sequences(make_llava, llava_batch):
    m = make_llava()
    vtc.patch(m, "cls", ratio=0.25)
    kw = dict(input_ids=llava_batch["input_ids"], attention_mask=llava_batch["attention_mask"],
              pixel_values=llava_batch["pixel_values"], max_new_tokens=6)
    beam = m.generate(**kw, num_beams=3, do_sample=False)
    beam_nc = m.generate(**kw, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beam, beam_nc)
    torch.manual_seed(0)
    s1 = m.generate(**kw, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    s2 = m.generate(**kw, do_sample=True, num_return_sequences=2, use_cache=False)
    assert s1.shape[0] == 4 and torch.equal(s1, s2)
    g2 = m.generate(**kw, num_beams=2, num_return_sequences=2, do_sample=False)
    assert g2.shape[0] == 4


def test_multi_turn_second_generate(make_llava, llava_batch):
    m = make_llava()
    vtc.patch(m, "cls", ratio=0.25)
    first = greedy(m, llava_batch, n=4)
    turn2 = torch.cat([first, torch.tensor([[20, 21], [22, 23]])], dim=1)
    am = torch.cat([llava_batch["attention_mask"], torch.ones(2, first.shape[1] - llava_batch["input_ids"].shape[1] + 2,
                                                                   dtype=torch.long)], 1)
    b2 = {"input_ids": turn2, "attention_mask": am, "pixel_values": llava_batch["pixel_values"]}
    a = greedy(m, b2, n=5)
    nc = greedy(m, b2, n=5, use_cache=False)
    assert torch.equal(a, nc)
    assert torch.equal(a[:, :turn2.shape[1]], turn2)


def test_manual_decode_loop_matches_generate(make_llava, llava_batch):
    """prefill + decode steps without position_ids (a hand-written loop) == generate()."""
    m = make_llava()
    vtc.patch(m, "cls", ratio=0.25)
    row = llava_batch["rows"][1]
    single = single_row(llava_batch, 1, "pixel_values")
    ref = greedy(m, single, n=5)[0, len(row):]
    with torch.no_grad():
        out = m(**single, use_cache=True)
        toks = []
        cache = out.past_key_values
        am = single["attention_mask"]
        for _ in range(5):
            t = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(t)
            am = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
            out = m(input_ids=t, attention_mask=am, past_key_values=cache, use_cache=True)
    assert torch.equal(torch.cat(toks, 1)[0], ref)


def test_sync_timing_wraps_each_vtc_region_and_is_off_on_cpu(make_llava, llava_batch):
    """``Patch.sync_timing`` synchronizes around vtc's own code (CUDA only); the hook sees each region twice."""
    m = make_llava()
    b = llava_batch
    p = vtc.patch(m, "cls", ratio=0.25)
    p.sync_timing = True
    assert not p.sync_timing  # a CPU model has nothing to synchronize
    calls = []
    p.runtime.sync = lambda: calls.append(1)  # what a CUDA model gets, counted
    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    assert calls and len(calls) % 2 == 0 and p.stats[-1].seconds > 0
    assert p.stats[-1].tokens_after == [16, 16]
    vtc.unpatch(m)
