"""TokenPacker: the projector against the authors' forward, the region partition, checkpoints in the official
layout, and the usual matrix with training-free methods on the packed tokens."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.models.tokenpacker import TokenPackerProjector, convert, from_pretrained
from vtc.zoo.tiny import left_pad, llava_prompt, tiny_tokenpacker_llava

from conftest import single_row


def authors_forward(p: TokenPackerProjector, x_single, x_multi):
    """A re-implementation of the authors' TokenPacker.forward (their divide_feature reshapes, sequence-first)."""
    def divide(x, k, token_num, n, c):
        h = w = int(token_num ** 0.5)
        x = x.reshape(h, w, n, c).reshape(h // k, k, w, n, c).permute(0, 2, 1, 3, 4)
        x = x.reshape(h // k, w // k, k, k, n, c).permute(0, 1, 3, 2, 4, 5).reshape(h // k, w // k, k * k, n, c)
        return x.permute(2, 0, 1, 3, 4).reshape(k * k, -1, c)

    key = p.ln_k_1(p.k_proj_1(x_multi)).permute(1, 0, 2)
    value = p.ln_v_1(p.v_proj_1(x_multi)).permute(1, 0, 2)
    token_num, n, c = key.shape
    g = p.grid // p.scale_factor
    q = F.interpolate(x_single.reshape(n, p.grid, p.grid, -1).float().permute(0, 3, 1, 2), size=(g, g),
                      mode="bilinear").permute(0, 2, 3, 1)
    q = q.reshape(n, -1, q.shape[-1]).to(x_single.dtype)
    query = p.ln_q_1(p.q_proj_1(q)).permute(1, 0, 2)
    out = p.clip_attn(divide(query, 1, g * g, n, c), divide(key, p.scale_factor, token_num, n, c),
                      divide(value, p.scale_factor, token_num, n, c))[0]
    return p.mlp(out.reshape(g * g, n, -1).permute(1, 0, 2))


@pytest.mark.parametrize("s", [2, 3, 4])
def test_projector_equals_the_authors_forward_and_counts(s):
    torch.manual_seed(0)
    p = TokenPackerProjector(vision_hidden=16, llm_hidden=24, scale_factor=s, grid=12, num_heads=2).eval()
    single, multi = torch.randn(3, 144, 16), torch.randn(3, 144, 64)
    out = p(torch.cat([multi, single], -1))
    assert out.shape == (3, (12 // s) ** 2, 24)  # 36, 16, 9 tokens
    torch.testing.assert_close(out, authors_forward(p, single, multi), rtol=1e-5, atol=1e-6)


def test_each_point_query_sees_exactly_its_region():
    p = TokenPackerProjector(vision_hidden=4, llm_hidden=4, scale_factor=2, grid=4, num_heads=1)
    ids = torch.arange(16.0).view(1, 16, 1)
    regions = p.regions(ids)[:, :, 0].T.tolist()  # (cells, s*s)
    assert regions == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    x = torch.randn(1, 16, 5 * 4)
    base = p(x)
    for patch in range(16):  # moving one key/value patch changes only the packed token above it
        y = x.clone()
        y[0, patch, :16] += 5.0
        changed = (p(y) - base).abs().amax(-1)[0] > 0  # other cells are bit-identical
        cell = (patch // 4 // 2) * 2 + (patch % 4) // 2
        assert changed.tolist() == [i == cell for i in range(4)]


def test_grid_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match=r"12x12 patch grid is not divisible by scale_factor=5"):
        TokenPackerProjector(16, 16, scale_factor=5, grid=12)


def _official_checkpoint(tmp_path, model, tok):
    """``model`` written the way the authors release it: a LLaVA-format folder (model.mm_projector.*, Vicuna-style
    LM names, config with scale_factor) and the CLIP tower as its own folder."""
    from transformers import CLIPVisionModel

    src, clip = tmp_path / "official", tmp_path / "clip"
    src.mkdir()
    state = {}
    for k, v in model.state_dict().items():
        for new, old in (("model.mm_projector.", "model.multi_modal_projector."),
                         ("model.", "model.language_model."), ("lm_head.", "lm_head.")):
            if k.startswith(old):
                state[new + k[len(old):]] = v.clone()
                break
    torch.save(state, src / "pytorch_model.bin")
    t = model.config.text_config
    cfg = {"architectures": ["LlavaLlamaForCausalLM"], "scale_factor": 2, "mm_vision_select_layer": -2,
           "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
           **{k: getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                          "rms_norm_eps")}}
    (src / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(src)
    from safetensors.torch import save_file

    tower = CLIPVisionModel(model.config.vision_config)
    tower.save_pretrained(clip)  # its config; the weights as the hub's CLIP files name them (vision_model.*)
    tower_state = model.model.vision_tower.state_dict()
    save_file({"vision_model." + k.removeprefix("vision_model."): v.clone().contiguous()
               for k, v in tower_state.items()}, str(clip / "model.safetensors"))
    return src, clip


def test_official_layout_converts_and_loads_with_every_key(tmp_path):
    from vtc.models.tokenpacker import KEY_LAYERS
    from vtc.zoo.processor import build_tokenizer

    tok = build_tokenizer()
    vocab = math.ceil(len(tok) / 64) * 64
    model = tiny_tokenpacker_llava(key_layers=(1, 2, 3, 3))
    model.resize_token_embeddings(vocab)
    src, clip = _official_checkpoint(tmp_path, model, tok)
    dst = convert(src, tmp_path / "hf", vision_tower=clip)
    loaded, proc = from_pretrained(dst)  # raises on any missing or unexpected key
    assert loaded.config.tokenpacker["key_layers"] == list(KEY_LAYERS)  # the authors' 12/16/22/23 ...
    # ... which this 4-layer tower does not have: point the tiny copy at the layers the original used
    loaded.config.vision_feature_layer = model.config.vision_feature_layer
    ids = torch.tensor([llava_prompt(16, [1, 5], [7, 8])])
    ids[ids == 100] = loaded.config.image_token_id
    ref_ids = torch.tensor([llava_prompt(16, [1, 5], [7, 8])])
    pv = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(input_ids=ref_ids, pixel_values=pv).logits
        b = loaded(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(a, b)
    assert proc.patch_size == 16  # 8-px patches packed 2x2: (64/16)^2 = 16 image tokens per image
    assert proc.image_processor.do_pad  # the authors' expand2square before CLIP's resize
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
                                    add_generation_prompt=True)
    assert text.endswith("USER: <image>\nQ? ASSISTANT:") and text.startswith("A chat between a curious human")


def test_conversion_errors_are_clear(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="not a TokenPacker checkpoint"):
        convert(tmp_path / "plain", tmp_path / "out")
    (tmp_path / "hd").mkdir()
    (tmp_path / "hd" / "config.json").write_text(json.dumps({"scale_factor": 2, "image_aspect_ratio": "slice"}))
    with pytest.raises(ValueError, match="TokenPacker-HD"):
        convert(tmp_path / "hd", tmp_path / "out")


@pytest.fixture
def packed_batch():
    g = torch.Generator().manual_seed(3)
    rows = [llava_prompt(16, [1, 5, 6], [7, 8, 9]), llava_prompt(16, [1, 5], [7, 8, 9, 10, 11, 12])]
    ids, am = left_pad(rows)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(2, 3, 64, 64, generator=g),
            "rows": rows}


def _gen(m, b, n=6, **kw):
    return m.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                      max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("method,kw", [("cls", {"ratio": 0.5}), ("uniform", {"ratio": 0.25}), ("pool", {"ratio": 0.25}),
                                       ("aim", {"ratio": 0.5, "l1": 1, "l2": 2}), ("fastv", {"ratio": 0.5, "k": 1})])
def test_methods_on_the_packed_tokens(packed_batch, method, kw):
    m = tiny_tokenpacker_llava(text_layers=3)
    ref = _gen(m, packed_batch)
    with vtc.patched(m, method, **dict(kw, ratio=1.0)):
        if method not in ("fastv", "aim"):
            assert torch.equal(_gen(m, packed_batch), ref)  # ratio 1.0 is the unpatched model
    p = vtc.patch(m, method, **kw)
    out = _gen(m, packed_batch, n=8)
    st = p.stats[0]
    assert st.tokens_before == [16, 16]  # 8x8 patches packed to 4x4
    if method in ("cls", "uniform", "pool"):
        assert st.tokens_after == [int(16 * kw["ratio"])] * 2
    assert torch.equal(out, _gen(m, packed_batch, n=8, use_cache=False))
    width = packed_batch["input_ids"].shape[1]
    for i, row in enumerate(packed_batch["rows"]):
        single = single_row(packed_batch, i, "pixel_values")
        assert torch.equal(_gen(m, single, n=8)[0, len(row):], out[i, width:])
    vtc.unpatch(m)
    assert torch.equal(_gen(m, packed_batch), ref)


def test_sdpa_equals_eager(packed_batch):
    outs = []
    for attn in ("sdpa", "eager"):
        m = tiny_tokenpacker_llava(attn=attn)
        vtc.patch(m, "cls", ratio=0.5)
        outs.append(_gen(m, packed_batch, n=8))
    assert torch.equal(outs[0], outs[1])


def test_cls_scores_are_the_region_means_of_the_tower_scores(packed_batch):
    """The packed token's score is the mean CLS attention of its 2x2 patches: the kept set follows it."""
    m = tiny_tokenpacker_llava()
    seen = {}
    p = vtc.patch(m, "cls", ratio=0.25)
    original = p.adapter._pooled_scores

    def spy():
        out = original()
        seen.update(raw={k: v.clone() for k, v in p.adapter.scratch.scores.items()}, pooled=out)
        return out

    p.adapter._pooled_scores = spy
    _gen(m, packed_batch, n=1)
    for key, raw in seen["raw"].items():
        want = raw.view(2, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(2, 16)
        torch.testing.assert_close(seen["pooled"][key], want)
    score = sum(seen["pooled"].values())
    for b, keep in enumerate(p.last_kept()):
        assert set(keep.nonzero()[:, 0].tolist()) == set(score[b].topk(4).indices.tolist())
