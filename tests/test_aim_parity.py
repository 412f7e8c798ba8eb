"""AIM's defaults reproduce the authors' code (LaVi-Lab/AIM), each deviation is an option (issue #22).

The references below are small re-implementations of the published code: ``bipartite_soft_matching_merge`` from
``llava/model/token_merge.py`` and the masking + ``get_importance`` keep rule of their LLaMA fork."""
import warnings

import pytest
import torch

import vtc
from vtc.core.merge import merge_to
from vtc.core.scores import pagerank_importance
from vtc.methods.aim import AIM
from vtc.sites import ViewLayout, VisionInfo, VisualInput
from vtc.zoo.tiny import IMAGE_TOKEN_ID, llava_prompt, qwen_inputs, tiny_llava, tiny_qwen_vl


# ----------------------------------------------------------------------------------------- merging (1, 2)
def authors_merge(metric, x, r):
    """LaVi-Lab/AIM token_merge.py: plain-mean scatter_reduce, output [unmerged (by similarity), destinations]."""
    t = metric.shape[1]
    r = min(r, t // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
    return torch.cat([unm, dst], dim=1)


def authors_rounds(metric, x, rounds):
    """The authors' LLaVA-1.5 pattern: merge the features and the keys with the same metric, round by round."""
    for r in rounds:
        x, metric = authors_merge(metric, x, r), authors_merge(metric, metric, r)
    return x[0]


def groups(rows: torch.Tensor) -> set:
    """Which original tokens each merged row averages (x was the identity matrix)."""
    return {tuple(torch.nonzero(row > 0).flatten().tolist()) for row in rows}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


@pytest.mark.parametrize("t,rounds", [(729, [364, 182, 45]), (196, [98, 49]), (576, [288, 36]), (35, [17, 9, 3])])
def test_default_merge_equals_the_authors_code(t, rounds):
    """Odd SigLIP grids (27 x 27), OneVision frames (196 -> 49), LLaVA-1.5 (576 -> 252), an odd Qwen frame with a
    top-up round: the same groups and the same mean features, round for round."""
    torch.manual_seed(t)
    metric = torch.randn(1, t, 16, dtype=torch.float64)
    ident = torch.eye(t, dtype=torch.float64)[None]
    ref = authors_rounds(metric, ident, rounds)
    ours, _, slots = merge_to(metric[0], ident[0], t - sum(rounds), schedule=rounds)  # defaults: mean, reference
    assert groups(ours) == groups(ref)
    order = lambda rows: rows[torch.argsort(torch.stack([r.nonzero()[0, 0] for r in rows]))]  # noqa: E731
    torch.testing.assert_close(order(ours), order(ref))
    assert torch.equal(slots, slots.sort().values)  # survivors placed at their destinations' slots, ascending


def test_raster_order_between_rounds_gives_other_partitions_on_odd_counts():
    torch.manual_seed(0)
    metric = torch.randn(1, 729, 16, dtype=torch.float64)
    ident = torch.eye(729, dtype=torch.float64)
    ref = groups(authors_rounds(metric, ident[None], [364, 182]))
    raster, _, _ = merge_to(metric[0], ident, 183, order="raster")
    assert jaccard(groups(raster), ref) < 0.5  # the deviation matters: most groups differ


def old_vtc_merge(metric, x, k):
    """vtc's merge before issue #22: ToMe size-weighted means, survivors re-sorted to raster order each round."""
    size, slot = torch.ones(x.shape[0], dtype=x.dtype), torch.arange(x.shape[0])
    while x.shape[0] > k:
        t = x.shape[0]
        r = min(t // 2, t - k)
        m = metric / metric.norm(dim=-1, keepdim=True)
        best, dst = (m[0::2] @ m[1::2].T).max(-1)
        order = best.argsort(descending=True, stable=True)
        src, unm = order[:r], order[r:]
        tot_x, tot_m = x[1::2] * size[1::2, None], metric[1::2] * size[1::2, None]
        tot_s = size[1::2, None].clone()
        for s_, d_ in zip(src.tolist(), dst[src].tolist()):
            w = size[0::2][s_]
            tot_x[d_] += x[0::2][s_] * w
            tot_m[d_] += metric[0::2][s_] * w
            tot_s[d_] += w
        new_size = torch.cat([size[0::2][unm], tot_s[:, 0]])
        x = torch.cat([x[0::2][unm], tot_x / tot_s])
        metric = torch.cat([metric[0::2][unm], tot_m / tot_s])
        slot = torch.cat([slot[0::2][unm], slot[1::2]])
        o = slot.argsort()
        x, metric, size, slot = x[o], metric[o], new_size[o], slot[o]
    return x, slot


def test_weighted_raster_options_reproduce_the_previous_behaviour():
    torch.manual_seed(3)
    metric, x = torch.randn(729, 16, dtype=torch.float64), torch.randn(729, 8, dtype=torch.float64)
    ours, _, slots = merge_to(metric, x, 91, mode="weighted", order="raster")
    ref, ref_slots = old_vtc_merge(metric, x, 91)
    assert torch.equal(slots, ref_slots)
    torch.testing.assert_close(ours, ref)


# ----------------------------------------------------------------------------------------- in-LLM PageRank (3)
def authors_decisions(model, ids, pixel_values, l1, l2, tau=0.1, iters=5):
    """The authors' masking: a dropped token stops being a key for every later layer but keeps its query row;
    after layer i in [l1, l2) PageRank over all rows (uniform start over every token), already-dropped tokens
    scored -1, text protected, keep int(V * (1 - (i - l1 + 1) / (l2 - l1))) visual tokens."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = model.model.language_model
    length = ids.shape[1]
    visual = ids[0] == IMAGE_TOKEN_ID
    v = int(visual.sum())
    key_ok = torch.ones(length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    decisions, captured, handles = {}, {}, []

    def allowed_now():
        allowed = causal & key_ok[None, :]
        return allowed | (torch.eye(length, dtype=torch.bool) & ~allowed.any(-1, keepdim=True))

    def pre(j):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[j] = (hidden, kwargs["position_embeddings"])
            kw = dict(kwargs)
            kw["attention_mask"] = allowed_now()[None, None]
            return args, kw
        return hook

    def post(i):
        def hook(module, args, output):
            if not l1 <= i < l2:
                return None
            hidden, (cos, sin) = captured[i]
            attn = module.self_attn
            h = module.input_layernorm(hidden)
            q = attn.q_proj(h).view(1, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, length, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = repeat_kv(k, q.shape[1] // k.shape[1])
            score = pagerank_importance(q @ k.transpose(-1, -2) * attn.scaling, allowed_now()[None], tau, iters)[0]
            score = score.masked_fill(~key_ok, -1.0)
            keep_n = int(v * max(0.0, 1 - (i - l1 + 1) / (l2 - l1)))
            vis = torch.nonzero(visual).flatten()
            top = vis[score[vis].argsort(descending=True, stable=True)[:keep_n]]
            key_ok[vis] = False
            key_ok[top] = True
            decisions[i] = key_ok.clone()
            return None
        return hook

    for j, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(pre(j), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(j)))
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixel_values)
    finally:
        for h in handles:
            h.remove()
    return decisions


def vtc_decisions(model, ids, pixel_values, **kw):
    p = vtc.patch(model, "aim", **kw)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixel_values)
    out = {i: d[0] for i, d in p.adapter.layer_pruner.memory.entries[-1].decisions.items()}
    vtc.unpatch(model)
    return out


def test_reference_pagerank_equals_the_authors_masking():
    """Three pruning layers (l1=1, l2=4), the decisions of every layer equal the authors' masking."""
    for seed in range(4):
        m = tiny_llava(seed=seed, image_size=64, text_layers=6, attn="eager")
        ids = torch.tensor([llava_prompt(64, [1, 5, 6], [7, 8, 9, 10])])
        pv = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        ref = authors_decisions(m, ids, pv, l1=1, l2=4)
        ours = vtc_decisions(m, ids, pv, l1=1, l2=4)  # no ratio: prune only, so the LM input is the full prompt
        assert ours.keys() == ref.keys() == {1, 2, 3}
        for i in ref:
            assert torch.equal(ours[i], ref[i]), (seed, i)


def _layer_input(logits, allowed, visual, visual_input, dropped=None):
    """An LLMLayerInput whose q @ k^T is ``logits`` (k = identity, one head, scale 1)."""
    from vtc.sites import LLMLayerInput

    n = logits.shape[-1]
    return LLMLayerInput(layer=2, num_layers=8, q=logits[None, None], k=torch.eye(n)[None, None], scale=1.0,
                         allowed=allowed[None], visual=visual[None], valid=torch.ones(1, n, dtype=torch.bool),
                         visual_input=torch.tensor([visual_input]),
                         dropped=None if dropped is None else dropped[None])


def test_survivors_pagerank_is_a_real_deviation():
    """A dropped token's query row (and its 1/N start) moves mass onto the survivors it attends to: with it the
    ranking after the second pruning layer can differ from PageRank over the survivors alone."""
    aim = AIM(l1=1, l2=5, tau=1.0, iters=1)  # one step: the dropped row's share lands on its keys directly
    aim.setup(VisionInfo(num_layers=2, feature_layer=1, has_cls=False, grid=None, llm_layers=8))
    n, drop = 8, 3  # tokens 1..6 visual, 0 and 7 text; token 3 was dropped after layer 1
    visual = torch.zeros(n, dtype=torch.bool)
    visual[1:7] = True
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    found = 0
    for seed in range(50):
        logits = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * 3
        keep_cols = torch.ones(n, dtype=torch.bool)
        keep_cols[drop] = False
        dropped = ~keep_cols
        allowed = causal & keep_cols[None, :]
        allowed = allowed | (torch.eye(n, dtype=torch.bool) & ~allowed.any(-1, keepdim=True))
        parity = aim.llm_keep(_layer_input(logits, allowed, visual, 6, dropped))[0]
        # the authors' rule by hand: PageRank over every row with the dropped column masked, dropped scored -1
        score = pagerank_importance(logits[None, None], allowed[None], tau=1.0, iters=1)[0]
        score[drop] = -1
        vis = torch.nonzero(visual).flatten()
        want = ~visual.clone()
        want[vis[score[vis].argsort(descending=True, stable=True)[:aim.visual_kept_after(2, 6)]]] = True
        assert torch.equal(parity, want)
        rest = torch.tensor([i for i in range(n) if i != drop])
        sub = logits[rest][:, rest]
        surv = aim.llm_keep(_layer_input(sub, causal[rest][:, rest], visual[rest], 6))[0]
        found += not torch.equal(parity[rest], surv)
    assert 1 <= found < 50, found  # both keep 3 of the 5 survivors; the sets differ for some graphs


def test_reference_pagerank_keeps_cached_equal_uncached_and_batch_equal_singles():
    m = tiny_llava(image_size=64, text_layers=6)
    rows = [llava_prompt(64, [1, 5, 6], [7, 8, 9]), llava_prompt(64, [1, 5], [7, 8, 9, 10, 11, 12])]
    from vtc.zoo.tiny import left_pad

    ids, am = left_pad(rows)
    pv = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    p = vtc.patch(m, "aim", ratio=0.5, l1=1, l2=4)
    kw = dict(max_new_tokens=6, do_sample=False)
    out = m.generate(input_ids=ids, attention_mask=am, pixel_values=pv, **kw)
    assert torch.equal(out, m.generate(input_ids=ids, attention_mask=am, pixel_values=pv, use_cache=False, **kw))
    for i, row in enumerate(rows):
        one = m.generate(input_ids=torch.tensor([row]), pixel_values=pv[i:i + 1], **kw)
        assert torch.equal(one[0, len(row):], out[i, ids.shape[1]:])
    assert p.events["llm_layer.mask"] >= 2 and p.events["llm_layer.decode"] > 0


# ----------------------------------------------------------------------------------------- OneVision (4)
def _frames_layout(frames: int, h: int, w: int) -> ViewLayout:
    per = h * w
    r = torch.arange(per)
    view = torch.cat([torch.arange(frames).repeat_interleave(per), torch.tensor([-1])])
    row = torch.cat([(r // w).repeat(frames), torch.tensor([-1])])
    col = torch.cat([(r % w).repeat(frames), torch.tensor([-1])])
    return ViewLayout(view, row, col, base_grid=(h, w), crop_grid=(0, 0), crop_tokens=(h, w), kind="frames")


def test_video_frames_merge_on_their_features_not_the_tower_keys():
    torch.manual_seed(0)
    frames, h, w = 3, 14, 14
    lay = _frames_layout(frames, h, w)
    feats = torch.randn(frames * h * w + 1, 8)
    keys = torch.randn(frames * h * w + 1, 16)
    aim = AIM(ratio=0.25)
    aim.setup(VisionInfo(num_layers=2, feature_layer=1, has_cls=False, grid=(h, w)))
    sel = aim.select_views(VisualInput(feats, 0, scores={("keys", 1): keys}, layout=lay))
    want = [merge_to(feats[f * 196:(f + 1) * 196], feats[f * 196:(f + 1) * 196], 49) for f in range(frames)]
    want_slots = torch.cat([s + f * 196 for f, (_, _, s) in enumerate(want)] + [torch.tensor([frames * 196])])
    assert torch.equal(sel.index, want_slots)
    torch.testing.assert_close(sel.features[:-1], torch.cat([x for x, _, _ in want]))


def test_anyres_images_are_not_merged_by_default_with_a_warning():
    lay = ViewLayout(torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)]),
                     torch.arange(32) % 4, torch.arange(32) % 4, base_grid=(4, 4), crop_grid=(1, 1),
                     crop_tokens=(4, 4))
    feats = torch.randn(32, 8)
    aim = AIM(ratio=0.25)
    aim.setup(VisionInfo(num_layers=2, feature_layer=1, has_cls=False, grid=(4, 4), multi_view=True))
    with pytest.warns(RuntimeWarning, match="AnyRes images are not merged"):
        sel = aim.select_views(VisualInput(feats, 8, layout=lay))
    assert torch.equal(sel.index, torch.arange(32)) and sel.features is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aim.select_views(VisualInput(feats, 8, layout=lay))  # warned once per patch
    merged = AIM(ratio=0.25, anyres_merge=True)
    merged.setup(VisionInfo(num_layers=2, feature_layer=1, has_cls=False, grid=(4, 4), multi_view=True))
    assert merged.select_views(VisualInput(feats, 8, layout=lay)).index.numel() == 8


# ----------------------------------------------------------------------------------------- Qwen budget (5)
def test_qwen_frames_keep_the_authors_halved_grid():
    aim = AIM(ratio=0.25)
    aim.setup(VisionInfo(num_layers=2, feature_layer=1, has_cls=False, grid=None, mrope=True))
    assert aim.vision_budget(35, (5, 7)) == 2 * 3  # floor(5/2) * floor(7/2), where round(35 / 4) = 9
    assert aim.vision_budget(196, (14, 14)) == 49
    assert AIM(ratio=0.5).vision_budget(35, (5, 7)) == 18  # other ratios: round(r n)
    m = tiny_qwen_vl("2", text_layers=4)
    b = qwen_inputs([(1, 6, 10), (1, 8, 8)], [[1, 2], [1]], [[5, 6], [7, 8, 9]])  # 3 x 5 and 4 x 4 merged grids
    p = vtc.patch(m, "aim", ratio=0.25, l1=1, l2=3)
    m.generate(**b, max_new_tokens=2, do_sample=False)
    assert p.stats[0].tokens_before == [15, 16] and p.stats[0].tokens_after == [2, 4]
