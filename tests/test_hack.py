"""HACK on VAR: head calibration, asymmetric budgets, structural/contextual selection, CFG independence, memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtc
from vtc.core.kv_scores import column_variance, observation_scores
from vtc.core.merge import merge_into_kept
from vtc.hack import HackCalibration, calibrate
from vtc.methods.hack import HACK, layer_budgets, split_heads
from vtc.sites import GenerationKVInput

from test_var import PN, tiny_var

PN5 = PN  # (1, 2, 3, 4): L = 30, final scale 16


@pytest.fixture(scope="module")
def var_and_cal():
    var = tiny_var(depth=3)
    return var, calibrate(var, n=4, batch=2)


def test_planted_stripes_are_contextual_and_diagonals_structural():
    """Heads 0, 2: every query attends the same key (vertical stripe); heads 1, 3: query i attends key i."""
    l, d = 16, 16
    eye = torch.eye(d)
    q = torch.zeros(1, 4, l, d)
    k = torch.zeros(1, 4, l, d)
    for h in (0, 2):
        q[0, h] = 8 * eye[3]  # all queries alike
        k[0, h] = eye[torch.arange(l) % d]  # key 3 matches
    for h in (1, 3):
        q[0, h] = 8 * eye
        k[0, h] = eye
    var = column_variance(q, k, 1.0)[0]
    assert var[0] < 1e-9 and var[2] < 1e-9 and var[1] > 0.1 and var[3] > 0.1
    ctx = split_heads(torch.stack([var, var]), alpha=0.5)
    assert ctx.tolist() == [[True, False, True, False]] * 2


def test_calibration_records_final_scale_column_variance(var_and_cal):
    """The calibration equals column_variance of the q/k a capturing method sees at the final scale."""
    var, _ = var_and_cal
    from vtc.methods.generation_kv import GenerationKVMethod

    @dataclass
    class Capture(GenerationKVMethod):
        name: ClassVar[str] = "_capture"
        ratio: float | None = 1.0
        tokens: int | None = None

        def kv_select(self, inp):
            if inp.final:
                seen.append((inp.layer, column_variance(inp.q, inp.k, inp.attn_scale).double().mean(0)))
            return None

    seen: list = []
    with vtc.patched(var, Capture()):
        var.generate([0, 1], seed=0)
    cal = calibrate(var, class_labels=[0, 1], n=2, batch=2)
    assert cal.variance.shape == (3, 4) and cal.samples == 2
    for layer, v in seen:
        assert torch.allclose(cal.variance[layer], v, rtol=1e-6)


def test_calibration_file_round_trip_and_shape_check(tmp_path, var_and_cal):
    var, cal = var_and_cal
    path = cal.save(tmp_path / "heads.json")
    back = HackCalibration.load(path)
    assert back.model_id == cal.model_id and torch.allclose(back.variance, cal.variance)
    with vtc.patched(var, "hack", ratio=0.5, calibration=str(path)):
        var.generate([1], seed=0)
    other = tiny_var(depth=2)
    with pytest.raises(ValueError, match="calibrate it"):
        vtc.patch(other, "hack", ratio=0.5, calibration=str(path))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a HACK calibration"):
        vtc.patch(var, "hack", ratio=0.5, calibration=str(tmp_path / "junk.json"))


def test_ratio_one_reproduces_the_unpatched_generation(var_and_cal):
    var, cal = var_and_cal
    ref = var.generate([1, 4, 7], seed=5)
    with vtc.patched(var, "hack", ratio=1.0, calibration=cal):
        assert torch.equal(var.generate([1, 4, 7], seed=5), ref)
    assert torch.equal(var.generate([1, 4, 7], seed=5), ref)


def test_layer_budgets_by_hand():
    # T = 100 present, full 100, ratio 0.3, 2 contextual + 2 structural heads, mandatory 20, alpha 0.5, bc 0.25:
    # B = 30, B_S = round(30 / 0.625) = 48, B_C = round((120 - 96) / 2) = 12 -> 2 * 48 + 2 * 12 = 120 = 4 * 30
    assert layer_budgets(100, 100, 100, 0.3, 2, 2, 20, 0.5, 0.25) == (48, 12)
    # structural caches holding less than their share keep all; contextual heads get the rest
    assert layer_budgets(40, 100, 100, 0.3, 2, 2, 20, 0.5, 0.25) == (40, 20)
    # mandatory keys win over a budget too small for them
    assert layer_budgets(100, 100, 100, 0.1, 2, 2, 40, 0.5, 0.25) == (40, 1)
    # a layer of one type keeps the plain budget
    assert layer_budgets(100, 100, 100, 0.3, 0, 4, 20, 0.5, 0.25) == (30, 0)
    assert layer_budgets(100, 100, 100, 0.3, 4, 0, 20, 0.5, 0.25) == (0, 30)


class Recording(HACK):
    """HACK that records every decision it makes."""

    def kv_select(self, inp: GenerationKVInput):
        sel = super().kv_select(inp)
        self.log.append((inp, self.budgets(inp), sel))
        return sel


@pytest.mark.parametrize("ratio", [0.7, 0.5])
def test_budgets_structural_scales_and_cfg_independence(var_and_cal, ratio):
    var, cal = var_and_cal
    m = Recording(ratio=ratio, calibration=cal, alpha=0.5)
    m.log = []
    with vtc.patched(var, m) as p:
        var.generate([2, 9], seed=1)
        assert p.events["generation_kv.select"] > 0
    ctx = split_heads(cal.variance, 0.5)
    per_layer_scale: dict = {}
    for inp, (b_s, b_c), sel in m.log:
        contextual = bool(ctx[inp.layer, inp.heads[0]])
        assert bool(ctx[inp.layer, inp.heads].all()) == contextual  # one type per group
        expected = b_c if contextual else b_s
        held = inp.k.shape[2] if sel is None else sel.index.shape[2]
        assert held == min(expected, inp.k.shape[2])
        per_layer_scale.setdefault((inp.layer, inp.scale_index), []).append((inp.heads.numel(), held, inp))
        if sel is not None and not contextual:  # first two scales and the current one always stay
            kept_scale = inp.key_scale.gather(2, sel.index)
            for s in {0, 1, inp.scale_index}:
                assert int((kept_scale == s).sum(-1).min()) == inp.scale_sizes[s]
        if sel is not None:  # every row (both CFG halves) selects for itself: equal to selecting row by row
            for r in range(inp.q.shape[0]):
                one = GenerationKVInput(**{**inp.__dict__, "q": inp.q[r:r + 1], "k": inp.k[r:r + 1],
                                           "v": inp.v[r:r + 1], "pos": inp.pos[r:r + 1],
                                           "key_scale": inp.key_scale[r:r + 1]})
                assert torch.equal(HACK.kv_select(m, one).index, sel.index[r:r + 1])
    checked = []
    for (layer, si), groups in per_layer_scale.items():
        inp = groups[0][2]
        n_c = int(ctx[layer].sum())
        total = sum(n * held for n, held, _ in groups)
        mandatory = sum(inp.scale_sizes[:min(2, si)]) + inp.scale_sizes[si]
        held = dict((bool(ctx[layer, h[0]]), t) for h, t in inp.layer_groups)
        t_s, t_c = held.get(False, 0), held.get(True, 0)
        b_s, b_c = layer_budgets(t_s, t_c, inp.full_length, ratio, n_c, 4 - n_c, mandatory, 0.5, 0.25)
        assert total == (4 - n_c) * min(b_s, t_s or b_s) + n_c * min(b_c, t_c or b_c)  # each head holds its budget
        if b_s > mandatory and 1 < b_c < t_c:
            assert abs(total - 4 * ratio * inp.full_length) <= n_c / 2 + 1e-9  # exact up to B_C's rounding
            checked.append((layer, si))
    assert checked  # the exact-total case did occur


def test_cfg_halves_choose_different_keys():
    """A planted cache whose conditional and unconditional rows favour different keys."""
    torch.manual_seed(0)
    R, H, l, T, d = 2, 2, 4, 10, 8
    k = torch.randn(R, H, T, d)
    q = torch.zeros(R, H, l, d)
    q[0] = 10 * k[0, :, 2:3]  # row 0 looks at key 2, row 1 at key 7
    q[1] = 10 * k[1, :, 7:8]
    inp = GenerationKVInput(layer=0, num_layers=1, heads=torch.arange(H), q=q, k=k, v=torch.randn(R, H, T, d),
                            pos=torch.arange(T).expand(R, H, T), key_scale=torch.zeros(R, H, T, dtype=torch.long),
                            scale_index=0, scale_sizes=(T,), attn_scale=1.0, cfg_rows=1,
                            layer_groups=((torch.arange(H), T),))
    top = observation_scores(q, k, 1.0).argmax(-1)
    assert top[0].tolist() == [2, 2] and top[1].tolist() == [7, 7]
    m = HACK(ratio=0.1, merge=False)  # one key per head; both heads contextual
    m.contextual = torch.ones(1, H, dtype=torch.bool)
    assert m.kv_select(inp).index[:, :, 0].tolist() == [[2, 2], [7, 7]]


def test_merge_into_kept_by_hand():
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05]]])
    v = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])
    mk, mv = merge_into_kept(k, v, torch.tensor([[0, 1]]))
    # keys 2 and 4 join key 0, key 3 joins key 1
    assert torch.allclose(mv, torch.tensor([[[(1 + 3 + 5) / 3], [(2 + 4) / 2]]]))
    assert torch.allclose(mk[0, 0], (k[0, 0] + k[0, 2] + k[0, 4]) / 3)


def test_cache_really_shrinks_and_bytes_match_the_formula(var_and_cal):
    var, cal = var_and_cal
    var.generate([3, 3], seed=2)
    dense = var.last_cache.peak_bytes
    last = None
    for ratio in (0.7, 0.5, 0.3):
        with vtc.patched(var, "hack", ratio=ratio, calibration=cal) as p:
            var.generate([3, 3], seed=2)
        c = var.last_cache
        d, elem = 64 // 4, 4
        formula = sum(2 * g.k.shape[0] * g.heads.numel() * g.k.shape[2] * d * elem for layer in c.layers
                      for g in layer.groups)
        assert c.nbytes() == formula
        tensors = sum(t.numel() * t.element_size() for layer in c.layers for g in layer.groups for t in (g.k, g.v))
        assert tensors == formula  # nothing else is held in full
        assert p.stats[-1].kv_bytes[1] == dense
        assert c.peak_bytes < dense and (last is None or c.peak_bytes <= last)
        last = c.peak_bytes


def test_bad_input_is_refused(var_and_cal):
    var, cal = var_and_cal
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            vtc.patch(var, "hack", ratio=bad, calibration=cal)
    for alpha in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="alpha"):
            vtc.patch(var, "hack", ratio=0.5, calibration=cal, alpha=alpha)
    with pytest.raises(ValueError, match="needs a head calibration"):
        vtc.patch(var, "hack", ratio=0.5)
    from vtc.zoo.tiny import tiny_llava

    with pytest.raises(ValueError, match="does not support site"):
        vtc.patch(tiny_llava(), "hack", ratio=0.5, calibration=cal)
    assert vtc.get_patch(var) is None
