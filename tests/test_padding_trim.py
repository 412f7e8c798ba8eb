"""After dropping visual rows, a batch prefills as many positions as its longest kept row: a short row's old left
padding is dropped too (issue #24), and the batch still equals the single runs."""
import pytest
import torch

import vtc
from vtc.zoo.tiny import left_pad, llava_next_tokens, llava_prompt, qwen_inputs, tiny_llava_next, tiny_qwen_vl


def _prefill_length(model) -> list[int]:
    """Sequence length entering decoder layer 0 at each forward pass (records into the returned list)."""
    seen: list[int] = []
    layer = model.model.language_model.layers[0]

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.shape[1])
    layer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("family", ["llava-next", "qwen2-vl"])
def test_prefill_is_as_long_as_the_longest_kept_row(family):
    if family == "llava-next":
        m = tiny_llava_next()
        sizes = [(32, 32), (64, 64)]  # 36 and 88 visual tokens
        n = llava_next_tokens(m, sizes)
        rows = [llava_prompt(k, [1, 5], [7, 8, 9]) for k in n]
        ids, am = left_pad(rows)
        b = {"input_ids": ids, "attention_mask": am, "image_sizes": torch.tensor(sizes),
             "pixel_values": torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
        singles = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long),
                    "image_sizes": b["image_sizes"][i:i + 1], "pixel_values": b["pixel_values"][i:i + 1]}
                   for i, r in enumerate(rows)]
    else:
        m = tiny_qwen_vl("2")
        b = qwen_inputs([(1, 8, 8), (1, 8, 16)], [[1, 5], [1]], [[7, 8, 9], [7, 8]])
        singles = [qwen_inputs([g], [p], [s]) for g, p, s in [((1, 8, 8), [1, 5], [7, 8, 9]), ((1, 8, 16), [1], [7, 8])]]
        b["pixel_values"], singles[0]["pixel_values"], singles[1]["pixel_values"] = (
            b["pixel_values"], b["pixel_values"][:64], b["pixel_values"][64:])
    seen = _prefill_length(m)
    p = vtc.patch(m, "uniform", ratio=0.25)
    kw = dict(max_new_tokens=4, do_sample=False)
    if family == "qwen2-vl":
        kw["suppress_tokens"] = [100, 101, 102, 103]
    out = m.generate(**b, **kw)
    st = p.stats[0]
    real = b["attention_mask"].sum(-1).tolist()
    kept_rows = [r - (before - after) for r, before, after in zip(real, st.tokens_before, st.tokens_after)]
    pads = [b["input_ids"].shape[1] - r for r in real]
    assert seen[0] == max(kept_rows)
    assert seen[0] < max(k + pad for k, pad in zip(kept_rows, pads))  # keeping the old padding would be longer
    width = b["input_ids"].shape[1]
    for i, s in enumerate(singles):
        one = m.generate(**s, **kw)
        assert torch.equal(one[0, s["input_ids"].shape[1]:], out[i, width:])
    assert torch.equal(out, m.generate(**b, use_cache=False, **kw))
