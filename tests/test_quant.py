"""vtc.core.quant: bit packing, key / value quantizers of ZipCache / ZipVL (issue #23, first part)."""
import pytest
import torch

from vtc.core.quant import max_error, pack_bits, quantize_keys, quantize_values, unpack_bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 64])
def test_pack_unpack_round_trips_exactly(bits, n):
    q = torch.randint(0, 2 ** bits, (2, 3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), q)


def test_pack_layout_matches_zipcache_halves_and_quarters():
    q4 = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # halves [1, 2] low nibble, [3, 4] high nibble
    assert pack_bits(q4, 4).tolist() == [1 | 3 << 4, 2 | 4 << 4]
    q2 = torch.tensor([1, 2, 3, 0, 2, 1, 3, 3], dtype=torch.uint8)  # quarters [1,2] [3,0] [2,1] [3,3]
    assert pack_bits(q2, 2).tolist() == [1 | 3 << 2 | 2 << 4 | 3 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantization_error_is_within_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(2, 4, 37, 16, generator=g) * torch.linspace(0.1, 5, 16)  # channels of different ranges
    v = torch.randn(2, 4, 37, 16, generator=g) * 3
    for qt, x in ((quantize_keys(k, bits), k), (quantize_values(v, bits), v)):
        err = (qt.dequantize().float() - x).abs()
        assert bool((err <= max_error(qt) * (1 + 1e-5) + 1e-6).all())
    assert quantize_keys(k, 8).dequantize().sub(k).abs().max() < quantize_keys(k, 2).dequantize().sub(k).abs().max()


def test_keys_are_channel_wise_and_values_token_wise_by_hand():
    # one row, one head, two tokens, two channels
    k = torch.tensor([[[[0.0, 10.0], [3.0, 20.0]]]])
    qk = quantize_keys(k, 2)  # per channel: ch0 in [0, 3] step 1, ch1 in [10, 20] step 10/3
    assert qk.minimum.flatten().tolist() == [0.0, 10.0]
    assert qk.step.flatten().tolist() == pytest.approx([1.0, 10 / 3])
    assert unpack_bits(qk.packed, 2, 2).flatten().tolist() == [0, 0, 3, 3]
    assert torch.allclose(qk.dequantize(), k)
    v = torch.tensor([[[[4.0, -1.0], [1.0, 9.0]]]])
    qv = quantize_values(v, 2)  # c = sqrt(max|V|) per channel = [2, 3]; V / c = [[2, -1/3], [0.5, 3]]
    assert qv.channel.flatten().tolist() == pytest.approx([2.0, 3.0])
    assert qv.minimum.flatten().tolist() == pytest.approx([-1 / 3, 0.5])  # per token, over the channels
    assert qv.step.flatten().tolist() == pytest.approx([(2 + 1 / 3) / 3, 2.5 / 3])
    assert torch.allclose(qv.dequantize(), v)  # two values per token at 2 bits: both ends are exact


def test_byte_count_is_what_the_tensors_hold():
    k = torch.randn(1, 8, 100, 64, dtype=torch.float16)
    qt = quantize_keys(k, 2)
    packed = 1 * 8 * 100 * 64 * 2 // 8
    stats = 2 * (1 * 8 * 1 * 64) * 2  # step and minimum per (row, head, channel), in the keys' fp16
    assert qt.nbytes == packed + stats
    assert qt.nbytes < k.numel() * k.element_size() / 6  # 2 bits + statistics against fp16


def test_rows_are_quantized_independently():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g) * 100
    both = quantize_values(torch.cat([a, b]), 4).dequantize()
    assert torch.equal(both[:1], quantize_values(a, 4).dequantize())


def test_bad_bit_width_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported bit width 3; allowed: 2, 4, 8"):
        quantize_keys(torch.randn(1, 1, 2, 2), 3)
