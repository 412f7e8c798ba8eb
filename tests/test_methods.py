"""Method logic on hand-computed inputs (no model involved)."""
import pytest
import torch

from vtc.methods import ClsPruning, PoolCompression, RandomPruning, UniformPruning, VisionInfo, VisualInput


def test_cls_default_window_is_layers_16_to_22_on_vit_l():
    m = ClsPruning(ratio=0.25)
    m.setup(VisionInfo(num_layers=24, feature_layer=22, has_cls=True, grid=(24, 24)))
    assert m.score_requests()[0].layers == tuple(range(16, 23))
    m = ClsPruning(ratio=0.25, start_layer=20)
    m.setup(VisionInfo(num_layers=24, feature_layer=22, has_cls=True, grid=(24, 24)))
    assert m.score_requests()[0].layers == (20, 21, 22)


def test_cls_sums_layers_then_keeps_topk_in_raster_order():
    m = ClsPruning(tokens=2, start_layer=0)
    m.setup(VisionInfo(num_layers=3, feature_layer=1, has_cls=True, grid=(2, 2)))
    scores = {("cls_prob", 0): torch.tensor([0.5, 0.1, 0.0, 0.2]), ("cls_prob", 1): torch.tensor([0.0, 0.1, 0.6, 0.1])}
    # sums: [0.5, 0.2, 0.6, 0.3] -> top-2 = {0, 2}
    sel = m.select(VisualInput(torch.zeros(4, 3), budget=2, grid=(2, 2), scores=scores))
    assert sel.index.tolist() == [0, 2] and sel.features is None
    m.ensemble = "max"  # maxes: [0.5, 0.1, 0.6, 0.2] -> {0, 2}; min: [0, .1, 0, .1] -> {1, 3}
    m.ensemble = "min"
    assert m.select(VisualInput(torch.zeros(4, 3), 2, (2, 2), scores)).index.tolist() == [1, 3]


def test_uniform_and_random():
    v = VisualInput(torch.zeros(16, 2), budget=4, grid=(4, 4))
    assert UniformPruning(ratio=0.25).select(v).index.tolist() == [2, 6, 10, 14]
    a = RandomPruning(ratio=0.25, seed=3).select(v).index
    b = RandomPruning(ratio=0.25, seed=3).select(v).index
    c = RandomPruning(ratio=0.25, seed=4).select(v).index
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.tolist() == sorted(a.tolist()) and len(set(a.tolist())) == 4


def test_pool_averages_cells_and_takes_centre_slots():
    x = torch.arange(16.0).reshape(16, 1)  # 4x4 grid, value = raster index
    sel = PoolCompression(tokens=4).select(VisualInput(x, budget=4, grid=(4, 4)))
    # 2x2 cells: means of {0,1,4,5}=2.5, {2,3,6,7}=4.5, {8,9,12,13}=10.5, {10,11,14,15}=12.5
    assert sel.features[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert sel.index.tolist() == [0, 2, 8, 10]  # centre (floor) patch of each cell


@pytest.mark.parametrize("name,kw", [("cls", {}), ("uniform", {}), ("random", {}), ("aim", {"prune": False}),
                                     ("cls", {"tokens": 40})])
def test_views_of_one_size_run_as_one_batch_with_the_same_result(name, kw):
    """Video frames / equal crops go through a batched method's select once; the result equals one call per view."""
    from vtc.registry import METHODS
    from vtc.sites import ViewLayout

    frames, rows, cols = 4, 6, 6
    view = torch.cat([torch.arange(frames).repeat_interleave(rows * cols), torch.tensor([-1])])  # + a newline
    cell = torch.arange(rows * cols)
    row = torch.cat([(cell // cols).repeat(frames), torch.tensor([-1])])
    col = torch.cat([(cell % cols).repeat(frames), torch.tensor([-1])])
    lay = ViewLayout(view, row, col, (rows, cols), (0, 0), (rows, cols), kind="frames")
    torch.manual_seed(0)
    n = view.numel()
    m = METHODS[name](**({"ratio": 0.25} | kw if "tokens" not in kw else kw))
    m.setup(VisionInfo(num_layers=4, feature_layer=2, has_cls=True, grid=(rows, cols), llm_layers=4))
    scores = {r: torch.rand(n) if r[0] != "keys" else torch.randn(n, 8)
              for r in [(q.kind, layer) for q in m.score_requests() for layer in q.layers]}
    visual = VisualInput(torch.randn(n, 16), 0, None, scores, lay)
    assert m.batched
    batched = m.select_views(visual)
    m.batched = False
    one_by_one = m.select_views(visual)
    assert torch.equal(batched.index, one_by_one.index) and (n - 1) in batched.index.tolist()  # newline kept
    assert batched.index.numel() == frames * (9 if "tokens" not in kw else 10) + 1
    if batched.features is None:
        assert one_by_one.features is None
    else:
        torch.testing.assert_close(batched.features, one_by_one.features, rtol=1e-6, atol=1e-6)
