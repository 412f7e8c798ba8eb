import pytest
import torch

import vtc

from conftest import greedy


def _eager_cls_rows(model, pv):
    """Hand-computed reference: eager attention probabilities, CLS query row, head mean, CLS key dropped."""
    model.set_attn_implementation({"vision_config": "eager"})
    with torch.no_grad():
        out = model.model.vision_tower(pv, output_attentions=True)
    return [a.mean(1)[:, 0, 1:] for a in out.attentions]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cls_scores_match_eager_attention(make_llava, attn):
    m = make_llava(attn=attn, vision_layers=4)
    pv = torch.randn(2, 3, 64, 64)
    p = vtc.patch(m, "cls", ratio=0.25, start_layer=0)
    with torch.no_grad():
        m.model.get_image_features(pixel_values=pv)
    scores = {k: v for k, v in p.adapter.scratch.scores.items()}
    vtc.unpatch(m)
    ref = _eager_cls_rows(m, pv)
    # feature layer of vision_feature_layer=-2 on a 4-layer tower is layer 2 -> layers 0..2
    assert sorted(l for _, l in scores) == [0, 1, 2]
    for (kind, layer), s in scores.items():
        assert kind == "cls_prob"
        torch.testing.assert_close(s, ref[layer], atol=1e-5, rtol=0)


def test_cls_keeps_the_hand_computed_topk(make_llava, llava_batch):
    m = make_llava(vision_layers=3)
    pv = llava_batch["pixel_values"]
    ref = _eager_cls_rows(m, pv)
    m.set_attn_implementation({"vision_config": "sdpa"})
    score = ref[0] + ref[1]  # default window on a 3-layer tower, feature layer 1: layers 0..1
    expected = [set(score[i].topk(16).indices.tolist()) for i in range(2)]
    p = vtc.patch(m, "cls", ratio=0.25)
    with torch.no_grad():
        out = m.model.get_image_features(pixel_values=pv)
    kept = [set(k.nonzero()[:, 0].tolist()) for k in p.adapter.keeps.lookup(out.pooler_output)]
    assert kept == expected


def test_error_ratio_out_of_range(make_llava):
    m = make_llava()
    for bad in (0, 0.0, -0.5, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
            vtc.patch(m, "cls", ratio=bad)
    assert vtc.get_patch(m) is None


def test_error_budget_both_or_neither(make_llava):
    m = make_llava()
    with pytest.raises(ValueError, match="either ratio= or tokens=, not both"):
        vtc.patch(m, "cls", ratio=0.5, tokens=10)
    with pytest.raises(ValueError, match="needs a budget"):
        vtc.patch(m, "uniform")
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        vtc.patch(m, "uniform", tokens=0)


def test_error_unknown_method_lists_available(make_llava):
    want = ("unknown method 'visionzip'; available methods: aim, cls, fastv, globalcom2, hack, kv_random, pool, "
            "random, snapkv, streaming, uniform, zipvl")
    with pytest.raises(ValueError, match=want):
        vtc.patch(make_llava(), "visionzip", ratio=0.5)


def test_error_unknown_hyperparameter(make_llava):
    want = r"unknown hyperparameter\(s\) \['layer'\]; allowed: \['ensemble', 'score', 'start_layer'\]"
    with pytest.raises(TypeError, match=want):
        vtc.patch(make_llava(), "cls", ratio=0.5, layer=3)


def test_error_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    want = "vtc does not support LlamaForCausalLM; supported model classes: .*LlavaForConditionalGeneration"
    with pytest.raises(TypeError, match=want):
        vtc.patch(lm, "cls", ratio=0.5)


def test_error_double_patch_names_active_method(make_llava):
    m = make_llava()
    vtc.patch(m, "uniform", ratio=0.5)
    with pytest.raises(RuntimeError, match="already patched with method 'uniform'"):
        vtc.patch(m, "cls", ratio=0.5)
    vtc.unpatch(m)
    vtc.patch(m, "cls", ratio=0.5)


def test_error_chunked_prefill(make_llava, llava_batch):
    m = make_llava()
    m.generation_config.prefill_chunk_size = 8
    with pytest.raises(ValueError, match="chunked prefill"):
        vtc.patch(m, "cls", ratio=0.5)
    assert vtc.get_patch(m) is None
    m.generation_config.prefill_chunk_size = None
    vtc.patch(m, "cls", ratio=0.5)
    with pytest.raises(RuntimeError, match="chunked prefill"):
        greedy(m, llava_batch, prefill_chunk_size=8)


def test_error_cls_without_cls_token_and_nothing_half_patched(make_llava):
    m = make_llava(vision_layers=3)
    with pytest.raises(ValueError, match="start_layer=5 is after the feature layer 1"):
        vtc.patch(m, "cls", ratio=0.5, start_layer=5)
    assert vtc.get_patch(m) is None
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())
    assert "get_image_features" not in m.model.__dict__


def test_failure_during_install_leaves_model_clean(make_llava, monkeypatch):
    m = make_llava()

    def boom(self, add):  # fail after the vision hooks are in
        raise RuntimeError("boom")

    monkeypatch.setattr("vtc.adapters.llm_input.LLMInputPruner.install", boom)
    with pytest.raises(RuntimeError, match="boom"):
        vtc.patch(m, "cls", ratio=0.5)
    assert vtc.get_patch(m) is None
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())
    assert "get_image_features" not in m.model.__dict__
