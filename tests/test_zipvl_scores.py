"""ZipVL's scores: probes, probe rows against eager attention, Eq. 6 on hand-made matrices (issue #23, part)."""
import pytest
import torch

from vtc.core.zipvl_scores import (important_count, important_set, normalized_scores, probe_attention,
                                   probe_positions)


def test_probe_positions_are_the_last_5_percent_plus_5_percent_earlier():
    p = probe_positions(200, seed=1)
    assert p[:10].tolist() == list(range(190, 200)) and p.numel() == 20
    assert bool((p[10:] < 190).all())
    assert torch.equal(p, probe_positions(200, seed=1))  # seeded
    assert probe_positions(7).tolist() == [6]  # short prompts still probe the last token


def test_probe_rows_equal_eager_attention_rows():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)  # GQA: 2 KV heads
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :5] = False  # a left-padded row
    probes = probe_positions(30, frac=0.1, seed=3)
    rows = probe_attention(q, k, probes, 0.35, valid)
    kk = k.repeat_interleave(2, dim=1)
    full = (q @ kk.transpose(-1, -2)) * 0.35
    mask = torch.ones(30, 30, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    eager = torch.softmax(full.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(rows, eager[:, :, probes], atol=1e-5, rtol=1e-5)


def test_important_count_eq6_by_hand():
    # column masses of a 4-query causal softmax matrix (total mass 4)
    a = torch.tensor([[2.0, 1.0, 0.6, 0.4]])
    assert important_count(a, 0.5, 4.0).tolist() == [1]  # 2.0 >= 2.0
    assert important_count(a, 0.75, 4.0).tolist() == [2]  # 3.0 >= 3.0
    assert important_count(a, 0.85, 4.0).tolist() == [3]  # 3.6 >= 3.4
    assert important_count(a, 1.0, 4.0).tolist() == [4]
    unsorted = torch.tensor([[0.4, 2.0, 0.6, 1.0]])  # the count does not depend on the order
    assert important_count(unsorted, 0.75, 4.0).tolist() == [2]
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        important_count(a, 1.5, 4.0)


def test_set_uses_normalized_scores_and_keeps_the_forced_positions():
    mass = torch.tensor([[3.0, 1.0, 0.9, 0.8]])  # divisors 4, 3, 2, 1 -> 0.75, 0.33, 0.45, 0.8
    assert normalized_scores(mass).tolist()[0] == pytest.approx([0.75, 1 / 3, 0.45, 0.8])
    keep = important_set(mass, torch.tensor([2]))
    assert keep.tolist() == [[True, False, False, True]]  # top-2 normalised, not top-2 raw (0 and 1)
    always = torch.tensor([[False, True, False, False]])
    assert important_set(mass, torch.tensor([2]), always).tolist() == [[True, True, False, True]]
