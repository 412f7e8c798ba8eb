"""ZipVL: adaptive sparse prefill and the mixed-precision KV cache, on every family vtc supports."""
import pytest
import torch

import vtc
from vtc.adapters.llm_attention import HANDLER_ATTR, IMPLEMENTATION, _Call
from vtc.cache import MixedPrecisionCache, MixedPrecisionLayer
from vtc.methods import ClsPruning, Compose, ZipVL
from vtc.sites import KVPolicy
from vtc.zoo.tiny import QWEN_VIDEO, left_pad, qwen_inputs, tiny_llava_onevision, tiny_qwen_vl

from conftest import N_TOKENS, greedy, single_row

KV = ["mixed", "evict", "full"]


def held_tensors(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from ``obj``'s attributes (lists, dicts, dataclasses)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel())
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(held_tensors(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(held_tensors(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, KVPolicy)):
        return sum(held_tensors(x, seen) for x in vars(obj).values())
    return 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tau_one_at_sixteen_bits_is_the_unpatched_model(make_llava, llava_batch, attn):
    m = make_llava(text_layers=3, attn=attn)
    ref, beams = greedy(m, llava_batch, n=8), greedy(m, llava_batch, n=5, num_beams=3)
    attn0 = m.model.language_model.layers[0].self_attn
    config = attn0.config
    p = vtc.patch(m, "zipvl", tau=1.0, bits_high=16, bits_low=16)
    assert attn0.config is not config and attn0.config._attn_implementation == IMPLEMENTATION
    assert torch.equal(greedy(m, llava_batch, n=8), ref)
    assert torch.equal(greedy(m, llava_batch, n=5, num_beams=3), beams)  # reorder_cache of the packed layers
    assert p.events["attention.decide"] >= 3 and p.events["attention.decode"] > 0
    assert p.events["attention.cache_installed"] >= 2 and "attention.sparse_prefill" not in p.events
    vtc.unpatch(m)
    assert HANDLER_ATTR not in attn0.__dict__ and attn0.config is config and config._attn_implementation == attn
    assert torch.equal(greedy(m, llava_batch, n=8), ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_equals_uncached_full_kv(make_llava, llava_batch, attn):
    m = make_llava(text_layers=4, attn=attn)
    p = vtc.patch(m, "zipvl", kv="full", tau=0.9)
    out = greedy(m, llava_batch, n=8)
    assert p.events["attention.sparse_prefill"] == 4  # every layer attended among its important tokens only
    assert torch.equal(out, greedy(m, llava_batch, n=8, use_cache=False))
    imp = p.stats[0].important_tokens
    lengths = [int(x) for x in llava_batch["attention_mask"].sum(1)]
    assert sorted(imp) == [0, 1, 2, 3] and all(all(c < n for c, n in zip(imp[i], lengths)) for i in imp)


@pytest.mark.parametrize("kv", KV)
def test_left_padded_batch_equals_single_runs(make_llava, llava_batch, kv):
    m = make_llava(text_layers=3)
    vtc.patch(m, "zipvl", kv=kv, tau=0.9, stream_gap=3)
    out = greedy(m, llava_batch, n=8)
    width = llava_batch["input_ids"].shape[1]
    for i, row in enumerate(llava_batch["rows"]):
        assert torch.equal(greedy(m, single_row(llava_batch, i, "pixel_values"), n=8)[0, len(row):], out[i, width:])


@pytest.mark.parametrize("kv", ["mixed", "evict"])
def test_beam_search_and_sampling_run(make_llava, llava_batch, kv):
    m = make_llava(text_layers=2)
    p = vtc.patch(m, "zipvl", kv=kv, stream_gap=2)
    beams = greedy(m, llava_batch, n=5, num_beams=3)
    torch.manual_seed(0)
    sampled = m.generate(**{k: llava_batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                         max_new_tokens=5, do_sample=True, top_k=10)
    assert beams.shape == sampled.shape == (2, llava_batch["input_ids"].shape[1] + 5)
    assert p.events["attention.commit"] > 2 * 2  # prefills plus buffers stored during decoding


def test_decode_stores_the_buffer_every_stream_gap(make_llava, llava_batch):
    m = make_llava(text_layers=2)
    vtc.patch(m, "zipvl", stream_gap=4)
    inputs = {k: llava_batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    out = m.generate(**inputs, max_new_tokens=11, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if "cache" in out else out.past_key_values
    assert isinstance(cache, MixedPrecisionCache)
    width = llava_batch["input_ids"].shape[1]
    for layer in cache.layers:  # 10 decode forwards: two gaps of 4 stored, 2 tokens still at full precision
        assert layer.get_seq_length() == width + 10
        assert layer.committed == width + 8 and layer.buffered == 2
        assert [len(segs) for segs in layer.rows] == [3, 3]
        # padding is never held; every real token is, at 4 or 2 bits
        pad = int((llava_batch["attention_mask"] == 0).sum(1)[1])
        assert int(sum((s.code > 0).sum() for s in layer.rows[1])) == width + 8 - pad


def test_cache_bytes_follow_the_formula_and_are_what_it_holds():
    layer = MixedPrecisionLayer(KVPolicy("mixed", 4, 2, 100))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float32), torch.randn(1, 2, 10, 8, generator=g)
    keys, values = layer.update(k, v)
    assert keys is k and values is v  # the prefill attends to its own full-precision keys
    important = torch.zeros(1, 10, dtype=torch.bool)
    important[0, [0, 3, 4, 9]] = True
    layer.commit(important, torch.ones(1, 10, dtype=torch.bool))
    f32 = 4
    hi_k = 2 * 4 * (8 * 4 // 8) + 2 * (2 * 8) * f32  # packed + step, min per (head, channel)
    hi_v = 2 * 4 * (8 * 4 // 8) + 2 * 4 * f32 + 2 * 8 * f32  # packed + step, min per token + channel scale
    lo_k = 2 * 6 * (8 * 2 // 8) + 2 * (2 * 8) * f32
    lo_v = 2 * 6 * (8 * 2 // 8) + 2 * 6 * f32 + 2 * 8 * f32
    codes = 10
    assert layer.nbytes == hi_k + hi_v + lo_k + lo_v + codes == held_tensors(layer)
    assert layer.dense_nbytes() == 2 * 2 * 10 * 8 * 2
    # the important tokens come back at 4 bits, the others at 2: the error follows
    keys, _ = layer.update(torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g))
    err = (keys[0, :, :10] - k[0]).abs().amax(dim=(0, 2))
    assert float(err[important[0]].max()) < float(err[~important[0]].min())
    assert layer.take_positions().tolist() == [list(range(11))] and layer.positions is None
    assert layer.nbytes == held_tensors(layer)  # buffer included, nothing else


def test_evict_holds_only_the_important_tokens():
    layer = MixedPrecisionLayer(KVPolicy("evict", 16, 16, 100))
    k = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).view(2, 1, 5, 2)
    layer.update(k, -k)
    important = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)  # row 1 left-padded
    layer.commit(important, valid)
    keys, values = layer.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    assert layer.take_positions().tolist() == [[-1, 0, 2, 4, 5], [1, 2, 3, 4, 5]]
    assert torch.equal(keys[0, 0, 1:4], k[0, 0, [0, 2, 4]]) and torch.equal(values[1, 0, :4], -k[1, 0, 1:])
    assert layer.get_seq_length() == 6 and layer.get_mask_sizes(1) == (7, 0)
    layer.reorder_cache(torch.tensor([1, 1]))
    keys, _ = layer.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    assert torch.equal(keys[0], keys[1])
    with pytest.raises(NotImplementedError, match="only the 2 newest"):
        layer.crop(-3)


def test_sparse_attention_is_attention_among_the_important_tokens(make_llava):
    m = make_llava(text_layers=2, attn="eager")
    p = vtc.patch(m, "zipvl", kv="full")
    handler = p.adapter.attention
    attn = m.model.language_model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    b, h, length, d = 2, 4, 7, 8
    groups = attn.num_key_value_groups  # grouped-query attention: keys / values have h / groups heads
    q = torch.randn(b, h, length, d, generator=g)
    k, v = (torch.randn(b, h // groups, length, d, generator=g) for _ in range(2))
    important = torch.rand(b, length, generator=g) > 0.4
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :2] = False
    important &= valid
    out = handler._sparse_attention(attn, q, k, v, important, _Call("prefill", valid=valid), {"scaling": 0.3})
    for r in range(b):
        for i in range(length):
            if not important[r, i]:
                assert torch.equal(out[r, i], torch.zeros(h, d))
                continue
            keys = important[r] & (torch.arange(length) <= i)
            kr, vr = (t[r].repeat_interleave(groups, 0)[:, keys] for t in (k, v))  # (h, n, d)
            w = torch.softmax((q[r, :, i, None, :] * kr).sum(-1) * 0.3, dim=-1)  # (h, n)
            assert torch.allclose(out[r, i], (w[..., None] * vr).sum(1), atol=1e-5)


def test_compose_with_a_vision_pruner(make_llava, llava_batch):
    m = make_llava(text_layers=2)
    p = vtc.patch(m, Compose(ClsPruning(ratio=0.25), ZipVL(tau=0.9, kv="full")))
    out = greedy(m, llava_batch, n=6)
    st = p.stats[0]
    assert st.tokens_after == [N_TOKENS // 4] * 2  # the vision site ran
    kept_lengths = [int(x) - N_TOKENS * 3 // 4 for x in llava_batch["attention_mask"].sum(1)]
    assert all(0 < c <= n for c, n in zip(st.important_tokens[1], kept_lengths))  # zipvl saw the kept sequence
    assert p.events["attention.decide"] == 2 and p.events["llm_input.prefill_gather"] == 1
    assert torch.equal(out, greedy(m, llava_batch, n=6, use_cache=False))
    vtc.unpatch(m)
    p = vtc.patch(m, Compose(ClsPruning(ratio=0.25), ZipVL(stream_gap=2)))
    greedy(m, llava_batch, n=6)
    assert p.events["attention.commit"] == 2 + 2 * 2  # prefill, then two stream gaps in 5 decode steps


@pytest.mark.parametrize("version", ["2", "2.5", "3"])
def test_qwen_vl(version):
    m = tiny_qwen_vl(version, text_layers=3)
    b = qwen_inputs([(1, 8, 8), (1, 8, 16)], [[1, 5], [1]], [[7, 8, 9], [7, 8]])
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[100, 101, 102, 103])
    ref = m.generate(**b, **kw)
    with vtc.patched(m, "zipvl", tau=1.0, bits_high=16, bits_low=16):
        assert torch.equal(m.generate(**b, **kw), ref)
    p = vtc.patch(m, "zipvl", kv="full", tau=0.9)
    out = m.generate(**b, **kw)
    assert p.events["attention.sparse_prefill"] >= 1
    assert torch.equal(out, m.generate(**b, use_cache=False, **kw))
    vtc.unpatch(m)
    p = vtc.patch(m, "zipvl", stream_gap=2)
    m.generate(**b, **kw)
    assert p.events["attention.commit"] > 3


def test_onevision_video():
    m = tiny_llava_onevision()
    frames, n_video = 4, 4 * 4 + 1
    rows = [[1, 5] + [QWEN_VIDEO] * n_video + [7, 8], [1] + [QWEN_VIDEO] * n_video + [7, 8, 9]]
    ids, am = left_pad(rows)
    g = torch.Generator().manual_seed(4)
    batch = {"input_ids": ids, "attention_mask": am,
             "pixel_values_videos": torch.randn(2, frames, 3, 32, 32, generator=g)}
    kw = dict(max_new_tokens=6, do_sample=False)
    ref = m.generate(**batch, **kw)
    with vtc.patched(m, "zipvl", tau=1.0, bits_high=16, bits_low=16):
        assert torch.equal(m.generate(**batch, **kw), ref)
    p = vtc.patch(m, "zipvl", kv="evict", tau=0.9)
    out = m.generate(**batch, **kw)
    for i, row in enumerate(rows):
        single = {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long),
                  "pixel_values_videos": batch["pixel_values_videos"][i:i + 1]}
        assert torch.equal(m.generate(**single, **kw)[0, len(row):], out[i, ids.shape[1]:])
    assert p.events["attention.sparse_prefill"] >= 1


@pytest.mark.parametrize("kw,match", [
    (dict(tau=0.0), r"tau must be a number in \(0, 1\]"), (dict(tau=1.5), r"tau must be"),
    (dict(bits_high=3), "unsupported bit width bits_high=3; allowed: 2, 4, 8, 16"),
    (dict(bits_high=2, bits_low=4), "bits_low=4 exceeds bits_high=2"),
    (dict(kv="drop"), "kv must be one of mixed, evict, full"), (dict(stream_gap=0), "stream_gap"),
    (dict(ratio=0.5), "sets its own budget; do not pass ratio="),
    (dict(kv="full", sparse_prefill=False), "changes nothing")])
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        vtc.build_method("zipvl", **kw)


def test_flash_attention_is_refused(make_llava):
    m = make_llava(text_layers=2)
    m.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supports sdpa and eager attention"):
        vtc.patch(m, "zipvl")
    assert vtc.get_patch(m) is None


def test_registered_name_is_inert_for_unpatched_models(make_llava, llava_batch):
    a, b = make_llava(text_layers=2), make_llava(text_layers=2)
    ref = greedy(b, llava_batch)
    vtc.patch(a, "zipvl")
    assert b.model.language_model.layers[0].self_attn.config._attn_implementation != IMPLEMENTATION
    assert torch.equal(greedy(b, llava_batch), ref)


def test_multi_turn_reuses_the_compressed_cache(make_llava, llava_batch):
    """A second turn brings several tokens to the returned cache: at tau 1 / 16 bits it equals the unpatched
    model's two turns; with the defaults it runs on the 4/2-bit cache and keeps counting logical positions."""
    def two_turns(m):
        inputs = {k: llava_batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        first = m.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = first.cache if "cache" in first else first.past_key_values
        ids = torch.cat([first.sequences, torch.tensor([[7, 8, 9]] * 2)], 1)
        am = torch.cat([llava_batch["attention_mask"], torch.ones(2, ids.shape[1] - inputs["input_ids"].shape[1],
                                                                  dtype=torch.long)], 1)
        second = m.generate(input_ids=ids, attention_mask=am, past_key_values=cache, max_new_tokens=3, do_sample=False)
        return second, cache

    m = make_llava(text_layers=2)
    ref, _ = two_turns(m)
    with vtc.patched(m, "zipvl", tau=1.0, bits_high=16, bits_low=16):
        assert torch.equal(two_turns(m)[0], ref)
    with vtc.patched(m, "zipvl", stream_gap=2):
        out, cache = two_turns(m)
    assert isinstance(cache, MixedPrecisionCache) and cache.get_seq_length() == out.shape[1] - 1


def test_stats_seconds_include_the_attention_site_and_decode_time_is_kept_apart(make_llava, llava_batch):
    """vtc's own time inside the LLM (after the prefill's stats exist) counts toward that prefill; decode steps'
    time goes to Runtime.decode_seconds instead of leaking into the next prefill."""
    import time as _time

    m = make_llava(text_layers=2)
    p = vtc.patch(m, "zipvl", kv="evict")
    att = p.adapter.attention
    spent = []
    original = att._prefill

    def timed_prefill(*a, **kw):
        t0 = _time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent.append(_time.perf_counter() - t0)

    att._prefill = timed_prefill
    greedy(m, llava_batch, n=4)
    greedy(m, llava_batch, n=4)
    assert len(p.stats) == 2 and len(spent) == 4
    assert p.stats[0].seconds >= sum(spent[:2]) and p.stats[1].seconds >= sum(spent[2:])
    assert p.runtime.decode_seconds > 0


@pytest.mark.parametrize("family", ["llava-next", "onevision-image"])
def test_anyres_families(family):
    """AnyRes images (LLaVA-NeXT, OneVision): identity at tau 1 / 16 bits, and a padded batch of two image sizes
    equals its single runs with the 4/2-bit cache."""
    from vtc.zoo.tiny import llava_next_tokens, llava_prompt, tiny_llava_next

    make = tiny_llava_next if family == "llava-next" else tiny_llava_onevision
    m = make()
    sizes = [(32, 32), (40, 64)]
    n = llava_next_tokens(m, sizes)
    rows = [llava_prompt(k, [1, 5], [7, 8, 9]) for k in n]
    ids, am = left_pad(rows)
    pv = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, do_sample=False)
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=torch.tensor(sizes))
    ref = m.generate(**batch, **kw)
    with vtc.patched(m, "zipvl", tau=1.0, bits_high=16, bits_low=16):
        assert torch.equal(m.generate(**batch, **kw), ref)
    p = vtc.patch(m, "zipvl", tau=0.9, stream_gap=2)
    out = m.generate(**batch, **kw)
    for i, row in enumerate(rows):
        single = dict(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                      pixel_values=pv[i:i + 1], image_sizes=torch.tensor([sizes[i]]))
        assert torch.equal(m.generate(**single, **kw)[0, len(row):], out[i, ids.shape[1]:])
    assert p.events["attention.sparse_prefill"] >= 1 and p.events["attention.commit"] > 2
