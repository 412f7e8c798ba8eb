import math

import pytest
import torch

from vtc.core.batch import gather_rows, left_repad_index, scatter_rows
from vtc.core.scores import attention_rows, combine_layers
from vtc.core.select import budget, grid_for_count, topk_sorted, uniform_indices


def test_budget_rounding_and_bounds():
    assert budget(576, ratio=0.25) == 144
    assert budget(576, ratio=0.11) == 63
    assert budget(576, ratio=1.0) == 576
    assert budget(10, ratio=0.01) == 1
    assert budget(576, tokens=64) == 64
    assert budget(16, tokens=64) == 16


def test_topk_sorted_raster_order_and_ties():
    s = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.7])
    assert topk_sorted(s, 3).tolist() == [1, 3, 5]
    # ties broken towards the lower index
    assert topk_sorted(torch.ones(5), 2).tolist() == [0, 1]
    assert topk_sorted(s, 10).tolist() == list(range(6))


def test_uniform_indices_hand_computed():
    assert uniform_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert uniform_indices(10, 3).tolist() == [1, 5, 8]
    assert uniform_indices(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_grid_for_count():
    assert grid_for_count(144, 24, 24) == (12, 12)
    assert grid_for_count(288, 24, 24) in {(16, 18), (18, 16)}
    assert grid_for_count(63, 24, 24) in {(7, 9), (9, 7)}
    gh, gw = grid_for_count(7, 8, 8)
    assert gh * gw == 7


def test_left_repad_index():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    index, valid = left_repad_index(keep)
    assert index.tolist() == [[0, 2, 3], [0, 2, 4]]
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    x = torch.arange(10.0).reshape(2, 5, 1)
    g = gather_rows(x, index)
    assert g[..., 0].tolist() == [[0, 2, 3], [5, 7, 9]]
    back = scatter_rows(g, index, valid, 5)
    assert back[..., 0].tolist() == [[0, 0, 2, 3, 0], [0, 0, 7, 0, 9]]


def test_attention_rows_matches_full_softmax_with_gqa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 2, 6, 8)
    full = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8), -1)
    rows = attention_rows(q[:, :, -2:], k, 8 ** -0.5)
    torch.testing.assert_close(rows, full[:, :, -2:])
    logits = attention_rows(q[:, :, :1], k, 8 ** -0.5, softmax=False)
    torch.testing.assert_close(logits.softmax(-1), full[:, :, :1])


def test_combine_layers():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    assert combine_layers([a, b], "sum").tolist() == [4.0, 6.0]
    assert combine_layers([a, b], "max").tolist() == [3.0, 4.0]
    assert combine_layers([a, b], "min").tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="sum, mean, max, min"):
        combine_layers([a], "median")
