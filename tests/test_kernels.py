"""vtc.kernels: each Triton kernel equals its torch reference (run on CPU under TRITON_INTERPRET=1, in a fresh
process because the interpreter is chosen when Triton is imported), and the backend switch (issue #24)."""
import os
import subprocess
import sys

import pytest
import torch

from vtc import kernels
from vtc.kernels import reference

pytest.importorskip("triton")

CHECK = r"""
import torch
from vtc import kernels
from vtc.kernels import reference
g = torch.Generator().manual_seed(0)
cases = 0
for b, l, k, trailing, dtype in [(2, 7, 5, (3,), torch.float32), (3, 11, 1, (), torch.int64), (1, 5, 0, (4,), torch.float32),
                                 (2, 9, 9, (2, 3), torch.float16), (2, 6, 4, (5,), torch.bool), (4, 33, 17, (129,), torch.float32),
                                 (2, 8, 3, (1,), torch.bfloat16)]:
    x = (torch.randn(b, l, *trailing, generator=g) * 10).to(dtype)
    idx = torch.randint(0, l, (b, k), generator=g)
    got, want = kernels.gather_rows(x, idx), reference.gather_rows(x, idx)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (b, l, k, trailing, dtype)
    cases += 1
table = torch.randn(1, 10, 6, generator=g)  # one rotary table for every row
idx = torch.randint(0, 10, (3, 4), generator=g)
assert torch.equal(kernels.gather_rows(table, idx), reference.gather_rows(table, idx))
assert kernels.calls["triton.gather_rows"] == cases + 1 and kernels.calls["torch.gather_rows"] == 0
merges = 0
for b, t, r, trailing, dtype in [(2, 9, 4, (5,), torch.float32), (3, 6, 6, (), torch.float32), (1, 4, 0, (3,), torch.float32),
                                 (2, 7, 5, (130,), torch.float16), (4, 98, 49, (16,), torch.float32)]:
    base = torch.randn(b, t, *trailing, generator=g).to(dtype)
    idx = torch.randint(0, t, (b, r), generator=g)  # repeated destinations accumulate
    src = torch.randn(b, r, *trailing, generator=g).to(dtype)
    got, want = kernels.add_rows_at(base, idx, src), reference.add_rows_at(base.float(), idx, src.float()).to(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)
    merges += 1
from vtc.core.merge import merge_to
kernels.set_backend("torch")
want = merge_to(torch.randn(2, 196, 8, generator=torch.Generator().manual_seed(1)),
                torch.randn(2, 196, 4, generator=torch.Generator().manual_seed(2)), 49, mode="weighted")
kernels.set_backend(None)
got = merge_to(torch.randn(2, 196, 8, generator=torch.Generator().manual_seed(1)),
               torch.randn(2, 196, 4, generator=torch.Generator().manual_seed(2)), 49, mode="weighted")
assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1])
torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
assert kernels.calls["triton.add_rows_at"] > merges
packs = 0
for bits in (2, 4):
    for shape in [(3, 1), (2, 5, 7), (4, 64), (1, 2, 3, 13), (0, 8)]:
        q = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.uint8)
        packed = kernels.pack_bits(q, bits)
        assert torch.equal(packed, reference.pack_bits(q, bits)), (bits, shape)
        assert torch.equal(kernels.unpack_bits(packed, bits, shape[-1]), q), (bits, shape)
        packs += 1
assert kernels.calls["triton.pack_bits"] == packs == kernels.calls["triton.unpack_bits"]
from vtc.core.quant import quantize_values
v = torch.randn(2, 3, 11, 6, generator=g)
kernels.set_backend("torch")
want = quantize_values(v, 2).dequantize()
kernels.set_backend(None)
assert torch.equal(quantize_values(v, 2).dequantize(), want)
quants = 0
before = kernels.calls["triton.quantize_pack"], kernels.calls["triton.unpack_dequantize"]
from vtc.core.quant import _stats
for bits in (2, 4):
    for shape, dtype in [((2, 3, 11, 6), torch.float32), ((1, 2, 5, 13), torch.float16), ((2, 1, 0, 8), torch.float32),
                         ((1, 4, 9, 128), torch.bfloat16)]:
        x = (torch.randn(*shape, generator=g) * 3).to(dtype).float()
        for dims, scaled in (((2,), False), ((1, 3), True)):  # keys: per channel; values: per token, channel-scaled
            if x.numel() == 0:
                step = lo = torch.ones(shape[0], 1 if 1 in dims else shape[1], 1, 1)
                c = None
            else:
                c = x.abs().amax(dim=2, keepdim=True).sqrt() if scaled else None
                step, lo = _stats(x / c if scaled else x, bits, dims)
            packed = kernels.quantize_pack(x, step, lo, c, bits)
            assert torch.equal(packed, reference.quantize_pack(x, step, lo, c, bits)), (bits, shape, dims)
            got = kernels.unpack_dequantize(packed, bits, shape[-1], step, lo, c, dtype)
            want = reference.unpack_dequantize(packed, bits, shape[-1], step, lo, c, dtype)
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got, want)  # float32 math; 16-bit outputs within one ulp
            quants += 1
done = kernels.calls["triton.quantize_pack"] - before[0], kernels.calls["triton.unpack_dequantize"] - before[1]
assert done == (quants, quants)
print("ok", cases + 1, merges, packs, quants)
"""


def test_triton_kernels_equal_the_torch_reference_under_the_interpreter():
    """The gather, bit packing and fused quantize + pack (exact), the merge scatter-add and the fused unpack +
    dequantize (float32 tolerances; one ulp of a 16-bit output), a whole AIM merge and a value quantization
    through the kernels."""
    env = dict(os.environ, TRITON_INTERPRET="1", VTC_KERNELS="triton")
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok 8 5 10 16"), run.stdout + run.stderr[-3000:]


def test_backend_switch(monkeypatch):
    x, idx = torch.randn(2, 5, 3), torch.tensor([[4, 0], [1, 1]])
    monkeypatch.setenv("VTC_KERNELS", "torch")
    before = kernels.calls["torch.gather_rows"]
    assert torch.equal(kernels.gather_rows(x, idx), reference.gather_rows(x, idx))
    assert kernels.calls["torch.gather_rows"] == before + 1
    monkeypatch.setenv("VTC_KERNELS", "auto")
    kernels.gather_rows(x, idx)  # CPU tensors: auto takes the reference
    assert kernels.calls["torch.gather_rows"] == before + 2
    monkeypatch.setenv("VTC_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        kernels.gather_rows(x, idx)
    monkeypatch.setenv("VTC_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kernels.gather_rows(x, idx)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("fast")
    kernels.set_backend("torch")
    try:
        assert kernels.backend() == "torch"
        kernels.gather_rows(x, idx)  # the override wins over VTC_KERNELS=triton
    finally:
        kernels.set_backend(None)


def test_a_patched_model_runs_its_gathers_through_the_kernels(monkeypatch):
    """Every re-pack of the LM input goes through vtc.kernels (here the torch reference on CPU)."""
    from vtc.zoo.tiny import llava_prompt, tiny_llava
    import vtc

    m = tiny_llava(image_size=64)
    vtc.patch(m, "cls", ratio=0.25)
    before = kernels.calls["torch.gather_rows"]
    m(input_ids=torch.tensor([llava_prompt(64, [1, 5], [7, 8])]), pixel_values=torch.randn(1, 3, 64, 64))
    assert kernels.calls["torch.gather_rows"] > before


SOFTMAX_CHECK = r"""
import torch
from vtc import kernels
from vtc.kernels import reference
from vtc.core.scores import pagerank_importance_qk
g = torch.Generator().manual_seed(0)
cases = 0
for b, h, r, s, d, sm in [(2, 3, 37, 53, 20, 0), (2, 3, 37, 53, 20, 21), (1, 2, 33, 40, 128, 40), (3, 1, 1, 7, 8, 7),
                          (1, 1, 5, 0, 16, 0)]:
    q, k = torch.randn(b, h, r, d, generator=g) * 2, torch.randn(b, h, s, d, generator=g)
    allowed = None
    if sm:
        allowed = torch.rand(b, r, sm, generator=g) > 0.3
        if sm == s:
            allowed[0, 0] = False  # a row with nothing allowed -> zeros
    got, want = kernels.masked_softmax_qk(q, k, allowed), reference.masked_softmax_qk(q, k, allowed)
    assert got.shape == want.shape == (b, h, r, s) and not got.isnan().any()
    # logits reach ~40 here: one float32 ulp of a logit moves its probability by ~4e-6 relative
    torch.testing.assert_close(got, want, rtol=5e-5, atol=1e-6)
    if sm == s:
        assert got[0, :, 0].eq(0).all()
    buf = torch.full((b * h * r * s + 5,), 7.0)
    into = buf[5:].view(b, h, r, s)  # written in place, as the PageRank maps are
    assert kernels.masked_softmax_qk(q[:, :, :], k, allowed, out=into) is into
    torch.testing.assert_close(into, want, rtol=5e-5, atol=1e-6)
    cases += 1
assert kernels.calls["triton.masked_softmax_qk"] == 2 * cases and kernels.calls["torch.masked_softmax_qk"] == 0
q, k = torch.randn(2, 5, 40, 16, generator=g), torch.randn(2, 5, 40, 16, generator=g)
allowed = torch.ones(40, 40, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
allowed[1, :, :4] = False
allowed[1, :4] = False  # left padding
allowed[:, :, 20:30] = False  # dropped tokens, masked as keys
got = pagerank_importance_qk(q, k, 0.25, allowed, 0.1, 5, heads_per_chunk=2, block=16)
kernels.set_backend("torch")
want = pagerank_importance_qk(q, k, 0.25, allowed, 0.1, 5, heads_per_chunk=2, block=16)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
from vtc.core.scores import attention_received
q, k = torch.randn(3, 45, 24, generator=g), torch.randn(3, 45, 24, generator=g)
want = attention_received(q, k, 0.2, chunk=16)  # backend still torch
kernels.set_backend(None)
before = kernels.calls["triton.masked_softmax_qk"]
torch.testing.assert_close(attention_received(q, k, 0.2, chunk=16), want, rtol=1e-5, atol=1e-7)
assert kernels.calls["triton.masked_softmax_qk"] == before + 3  # 45 queries in chunks of 16
print("ok", cases, kernels.calls["triton.masked_softmax_qk"])
"""


def test_masked_softmax_kernel_and_pagerank_equal_the_torch_reference_under_the_interpreter():
    """The fused masked softmax (no mask, a tail mask, a full mask with an empty row, odd sizes, no keys; into a
    caller's buffer), a whole PageRank (padding, dropped keys, row blocks) and the attention-received score
    through it."""
    env = dict(os.environ, TRITON_INTERPRET="1", VTC_KERNELS="triton")
    run = subprocess.run([sys.executable, "-c", SOFTMAX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok 5 "), run.stdout + run.stderr[-3000:]
