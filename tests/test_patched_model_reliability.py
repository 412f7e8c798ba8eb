"""A patched model never answers wrongly in silence: reused caches, threads, copies, pickling, nested patches,
stale handles, and a forward pass that raised (issue #20, cases 4-6)."""
import copy
import io
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vtc
from vtc.hook_owner import patched_modules
from vtc.zoo.tiny import qwen_inputs, tiny_qwen_vl

from conftest import greedy

METHODS = [("cls", dict(ratio=0.25)), ("fastv", dict(ratio=0.5, k=1))]


def _second_turn(first, batch):
    """The first answer plus two text tokens, text only (no pixels): a follow-up question on the same cache."""
    ids = torch.cat([first, torch.tensor([[20, 21]] * first.shape[0])], 1)
    am = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], ids.shape[1] - batch["input_ids"].shape[1],
                                                        dtype=torch.long)], 1)
    return ids, am


@pytest.mark.parametrize("method,kw", METHODS)
def test_reused_pruned_cache_is_refused_even_for_a_text_only_turn(make_llava, llava_batch, method, kw):
    m = make_llava(text_layers=3)
    p = vtc.patch(m, method, **kw)
    out = m.generate(input_ids=llava_batch["input_ids"], attention_mask=llava_batch["attention_mask"],
                     pixel_values=llava_batch["pixel_values"], max_new_tokens=3, do_sample=False,
                     return_dict_in_generate=True)
    cache = out.past_key_values
    ids, am = _second_turn(out.sequences, llava_batch)
    with pytest.raises(RuntimeError, match="holds a compressed prefill"):
        m.generate(input_ids=ids, attention_mask=am, past_key_values=cache, max_new_tokens=3, do_sample=False)
    # the supported way, a fresh prefill of the whole conversation with its image, still works afterwards
    again = greedy(m, {"input_ids": ids, "attention_mask": am, "pixel_values": llava_batch["pixel_values"]}, n=3)
    assert torch.equal(again[:, :ids.shape[1]], ids)
    assert p.events.get("llm_input.prefill_gather", 0) + p.events.get("llm_layer.prune", 0) >= 2


def test_an_unpruned_cache_may_still_be_reused(make_llava, llava_batch):
    """ratio=1.0 prunes nothing, so its cache is the unpatched model's and a text-only turn on it is allowed."""
    m = make_llava()
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    ref = m.generate(**{k: v for k, v in llava_batch.items() if k != "rows"}, **kw)
    ids, am = _second_turn(ref.sequences, llava_batch)
    ref2 = m.generate(input_ids=ids, attention_mask=am, past_key_values=ref.past_key_values, max_new_tokens=3,
                      do_sample=False)
    vtc.patch(m, "cls", ratio=1.0)
    out = m.generate(**{k: v for k, v in llava_batch.items() if k != "rows"}, **kw)
    out2 = m.generate(input_ids=ids, attention_mask=am, past_key_values=out.past_key_values, max_new_tokens=3,
                      do_sample=False)
    assert torch.equal(out2, ref2)


@pytest.mark.parametrize("method,kw", METHODS + [("aim", dict(l1=0, l2=1))])
def test_one_patched_model_from_several_threads_equals_sequential_calls(make_llava, method, kw):
    m = make_llava(text_layers=3)
    p = vtc.patch(m, method, **kw)
    g = torch.Generator().manual_seed(5)
    from vtc.zoo.tiny import llava_prompt
    jobs = [{"input_ids": torch.tensor([llava_prompt(64, [1, 5 + i % 3], [7, 8, 9 + i])]),
             "attention_mask": torch.ones(1, 64 + 5, dtype=torch.long),
             "pixel_values": torch.randn(1, 3, 64, 64, generator=g)} for i in range(8)]
    use_cache = [True, False] * 4  # uncached generation re-runs the prefill: its remembered decisions are per call
    ref = [greedy(m, j, n=4, use_cache=u) for j, u in zip(jobs, use_cache)]
    n_stats = len(p.stats)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda ju: greedy(m, ju[0], n=4, use_cache=ju[1]), zip(jobs, use_cache)))
    for r, o in zip(ref, got):
        assert torch.equal(r, o)
    assert len(p.stats) == 2 * n_stats  # every threaded prefill was compressed and recorded once


def test_a_forward_that_raised_leaves_no_state_and_no_lock(make_llava, llava_batch):
    m = make_llava()
    vtc.patch(m, "cls", ratio=0.25)
    ref = greedy(m, llava_batch)
    bad = dict(llava_batch, pixel_values=llava_batch["pixel_values"][:1])  # 2 image placeholders, 1 image
    with pytest.raises(Exception):
        greedy(m, bad)
    done = []
    t = threading.Thread(target=lambda: done.append(greedy(m, llava_batch)))
    t.start()
    t.join(timeout=60)
    assert done and torch.equal(done[0], ref)  # another thread gets the model, and the same answer


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_deepcopy_gives_an_independently_patched_copy(make_llava, llava_batch, family):
    if family == "llava":
        m = make_llava()
        batch = {k: v for k, v in llava_batch.items() if k != "rows"}
    else:
        m = tiny_qwen_vl("2")
        batch = qwen_inputs([(1, 8, 8), (1, 8, 12)], [[1, 2], [1]], [[5, 6], [7, 8, 9]])
    run = lambda model: model.generate(**batch, max_new_tokens=4, do_sample=False)  # noqa: E731
    plain = run(m)
    p = vtc.patch(m, "uniform", ratio=0.25)
    patched = run(m)
    assert not torch.equal(plain, patched)
    c = copy.deepcopy(m)
    pc = vtc.get_patch(c)
    assert pc is not None and pc is not p and pc.model is c and pc.active
    events = dict(p.events)
    assert torch.equal(run(c), patched)
    assert p.events == events  # the copy's hooks use the copy's state, not the original's
    vtc.unpatch(c)
    assert torch.equal(run(c), plain)
    assert patched_modules(c) == []  # (transformers' own output-capturing hooks stay; they are not vtc's)
    assert "get_image_features" not in c.model.__dict__
    assert torch.equal(run(m), patched) and p.active  # the original keeps its patch


def test_pickling_a_patched_model_is_refused_clearly(make_llava):
    m = make_llava()
    vtc.patch(m, "cls", ratio=0.25)
    with pytest.raises(TypeError, match="cannot be pickled.*vtc.unpatch"):
        pickle.dumps(m)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(m, io.BytesIO())
    vtc.unpatch(m)
    assert isinstance(pickle.loads(pickle.dumps(m)), type(m))


def test_nested_patches_are_refused_both_ways(make_llava):
    m = make_llava()
    vtc.patch(m.model, "cls", ratio=0.25)
    with pytest.raises(RuntimeError, match="already installed on model.model"):
        vtc.patch(m, "cls", ratio=0.5)
    vtc.unpatch(m.model)
    vtc.patch(m, "cls", ratio=0.25)
    with pytest.raises(RuntimeError, match="already installed on the model itself"):
        vtc.patch(m.model, "uniform", ratio=0.5)
    vtc.unpatch(m)
    vtc.patch(m.model, "uniform", ratio=0.5)  # nothing is left behind by the refusals


def test_a_stale_handle_never_removes_a_newer_patch(make_llava, llava_batch):
    m = make_llava()
    old = vtc.patch(m, "cls", ratio=0.25)
    vtc.unpatch(m)
    new = vtc.patch(m, "uniform", ratio=0.5)
    assert not old.active and new.active
    old.remove()
    assert vtc.get_patch(m) is new
    greedy(m, llava_batch)
    assert new.events.get("llm_input.prefill_gather") == 1
    new.remove()
    assert vtc.get_patch(m) is None


def test_hooks_are_bound_methods_of_vtc_objects_not_closures(make_llava):
    """What makes deepcopy correct: a closure would be shared by the copy and keep acting on the original."""
    from vtc.hook_owner import vtc_owner

    m = make_llava()
    vtc.patch(m, "aim", l1=0, l2=1)
    hooks = [h for mod in m.modules() for h in [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]]
    assert hooks and all(vtc_owner(h) is not None for h in hooks)
    assert vtc_owner(m.model.__dict__["get_image_features"]) is not None

