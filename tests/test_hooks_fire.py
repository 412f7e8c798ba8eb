"""vtc's hooks actually run, whichever transformers release is installed (the cache keyword, hand-written loops,
kernelized models, untested versions). Each test asserts ``Patch.events``, the count of work each hook did."""
import copy
import warnings

import pytest
import torch

import vtc
from vtc.adapters import hf
from vtc.adapters.llm_input import check_mask_length
from vtc.zoo.tiny import qwen_inputs, tiny_qwen_vl

from conftest import greedy


@pytest.fixture
def llava4(make_llava):
    return make_llava(text_layers=4)


def test_generate_runs_the_llm_input_decode_path(make_llava, llava_batch):
    """A left-padded batch keeps a 2-D mask through generate(): every decode step must be re-mapped to the pruned
    cache (on 5.24 vtc once missed the renamed keyword and every step looked like a prefill)."""
    m = make_llava()
    p = vtc.patch(m, "cls", ratio=0.25)
    greedy(m, llava_batch, n=6)
    ev = p.events
    assert ev["llm_input.prefill_gather"] == 1
    assert ev["llm_input.cache_registered"] == 1
    assert ev["llm_input.decode"] == 5  # max_new_tokens - 1 decode forwards


def test_generate_runs_the_in_llm_decode_path(llava4, llava_batch):
    p = vtc.patch(llava4, "fastv", ratio=0.5, k=1)
    greedy(llava4, llava_batch, n=4)
    ev = p.events
    assert ev["llm_layer.prune"] == 1 and ev["llm_layer.cache_registered"] == 1
    assert ev["llm_layer.decode"] == 3 * 3  # 3 decode forwards x the 3 layers after the pruning layer (k - 1 = 0)


@pytest.mark.parametrize("version", ["2", "3"])
def test_qwen_generate_runs_the_decode_path(version):
    m = tiny_qwen_vl(version)
    b = qwen_inputs([(1, 8, 8), (1, 8, 16)], [[1, 5], [1]], [[7, 8, 9], [7, 8]])
    p = vtc.patch(m, "uniform", ratio=0.25)
    m.generate(**b, max_new_tokens=4, do_sample=False, suppress_tokens=[100, 101, 102, 103])
    assert p.events["llm_input.prefill_gather"] == 1 and p.events["llm_input.decode"] == 3


def test_hand_written_decode_loop_of_a_padded_batch(make_llava, llava_batch):
    """The model creates the cache itself (after vtc's pre-hook): vtc registers it from the output, so a
    hand-written loop with the full-length mask is re-mapped and equals generate() for rows keeping different
    numbers of tokens."""
    m = make_llava()
    b = llava_batch
    p = vtc.patch(m, "cls", tokens=9)
    ref = greedy(m, b, n=5)[:, b["input_ids"].shape[1]:]
    before = p.events["llm_input.decode"]
    with torch.no_grad():
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                use_cache=True)
        cache, am, toks = hf.output_cache(out), b["attention_mask"], []
        for _ in range(5):
            t = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(t)
            am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
            out = m(input_ids=t, attention_mask=am, past_key_values=cache, use_cache=True)
    assert p.events["llm_input.decode"] - before == 5
    assert torch.equal(torch.cat(toks, 1), ref)


def test_qwen_hand_written_loop_shifts_rope_deltas():
    """No positions at decode: the model derives them from cache length + rope_deltas, which vtc shifts by the
    pruned columns; the tokens equal generate()'s (which passes positions itself)."""
    m = tiny_qwen_vl("2")
    b = qwen_inputs([(1, 8, 16)], [[1, 5]], [[7, 8, 9]])
    p = vtc.patch(m, "cls", ratio=0.25)
    ref = m.generate(**b, max_new_tokens=5, do_sample=False, suppress_tokens=[100, 101, 102, 103])
    with torch.no_grad():
        out = m(**b, use_cache=True)
        assert p.events["qwen.rope_deltas"] == 2  # generate()'s prefill, then this one
        deltas = m.model.rope_deltas.clone()
        cache, toks = hf.output_cache(out), []
        for _ in range(5):
            logits = out.logits[:, -1].clone()
            logits[:, [100, 101, 102, 103]] = float("-inf")
            toks.append(logits.argmax(-1, keepdim=True))
            out = m(input_ids=toks[-1], past_key_values=cache, use_cache=True)
    assert torch.equal(torch.cat(toks, 1)[0], ref[0, b["input_ids"].shape[1]:])
    vtc.unpatch(m)
    with torch.no_grad():
        m(**b, use_cache=True)  # a new prompt recomputes the deltas: unpatched, by the pruned 24 fewer
    assert torch.equal(m.model.rope_deltas, deltas - 24)


@pytest.mark.parametrize("key", ["cache", "past_key_values"])
def test_llm_input_reads_the_cache_under_either_keyword(make_llava, llava_batch, key):
    """The LM pre-hook gets the cache as ``cache=`` (generate() and the models from 5.24) or ``past_key_values=``
    (5.23, and callers on any release); both must reach the decode re-map, whatever is installed."""
    m = make_llava()
    b = llava_batch
    p = vtc.patch(m, "cls", tokens=9)
    out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
            use_cache=True)
    cache = hf.output_cache(out)
    pruner = p.adapter.pruner
    st = pruner.decode_state(cache)
    full = torch.cat([b["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    kwargs = {"inputs_embeds": torch.zeros(2, 1, m.config.text_config.hidden_size), "attention_mask": full,
              key: cache}
    res = pruner._pre(m.model.language_model, (), kwargs)
    assert res is not None
    mask = res[1]["attention_mask"]
    assert mask.shape[1] == st.kept_len + 1 == cache.get_seq_length() + 1
    assert torch.equal(mask[:, :-1], st.mask_kept)


def test_an_over_long_mask_is_never_handed_over_silently(make_llava, llava_batch):
    """A cache vtc cannot match to its compressed prefill (here a copy; in the 5.24 break, a renamed keyword) with
    the full-length mask: transformers would read its first columns only. vtc refuses instead."""
    m = make_llava()
    b = llava_batch
    vtc.patch(m, "cls", tokens=9)
    with torch.no_grad():
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                use_cache=True)
    stranger = copy.deepcopy(hf.output_cache(out))
    am = torch.cat([b["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    t = out.logits[:, -1].argmax(-1, keepdim=True)
    with pytest.raises(RuntimeError, match="silently truncate"):
        m(input_ids=t, attention_mask=am, past_key_values=stranger, use_cache=True)


def test_mask_length_check_hand_cases():
    e = torch.zeros(2, 3, 8)
    check_mask_length({"inputs_embeds": e, "attention_mask": torch.ones(2, 10)}, past=7)  # exactly right
    check_mask_length({"inputs_embeds": e, "attention_mask": None}, past=7)
    with pytest.raises(RuntimeError, match="11-column attention mask for 10 keys"):
        check_mask_length({"inputs_embeds": e, "attention_mask": torch.ones(2, 11)}, past=7)


def test_kernelized_model_is_refused(make_llava):
    """transformers 5.25 kernelizes in from_pretrained by default when `kernels` is installed."""
    m = make_llava()
    m._use_kernels = True  # what set_use_kernels(True) leaves behind (use_kernels reads it)
    assert m.use_kernels
    with pytest.raises(ValueError, match="use_kernels=False"):
        vtc.patch(m, "cls", ratio=0.5)
    assert vtc.get_patch(m) is None


def test_untested_transformers_warns_once(make_llava, monkeypatch):
    import transformers

    hf._warned.clear()
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    m = make_llava()
    with pytest.warns(RuntimeWarning, match=r"tested with transformers >=5\.23,<5\.26; this is 5\.99\.0"):
        vtc.patch(m, "cls", ratio=0.5)
    vtc.unpatch(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vtc.patch(m, "cls", ratio=0.5)  # once per process and version
    vtc.unpatch(m)
    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    assert not hf.warn_if_untested()


def test_installed_transformers_is_in_the_tested_range():
    """CI runs the suite on the oldest and newest release pyproject allows: both must be inside the range."""
    assert not hf.warn_if_untested()


def test_pyproject_declares_the_tested_range():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    spec = re.search(r'"transformers(>=[^"]+)"', text).group(1)
    assert spec == hf.tested_range()
