"""Q1_0 is GGUF's block_q1_0, bit for bit."""

import pytest
import torch

from bonsai_core.quant import q1_0
from bonsai_core.quant.tensor import Q1Tensor


def test_hand_worked_block_decodes_to_plus_and_minus_d():
    # d = 1.0 (fp16 0x3C00, little-endian bytes 00 3C); qs[0] = 0b101 -> weights 0 and 2 are +1
    block = torch.zeros(1, 18, dtype=torch.uint8)
    block[0, 0], block[0, 1], block[0, 2] = 0x00, 0x3C, 0x05
    qs, d = q1_0.from_blocks(block)
    assert d.item() == 1.0
    w = q1_0.dequantize(qs, d, 128)
    expected = -torch.ones(1, 128)
    expected[0, 0] = expected[0, 2] = 1.0
    assert torch.equal(w, expected)
    assert torch.equal(q1_0.to_blocks(qs, d), block)


def test_quantize_hand_worked_group_scale_is_mean_abs_and_bit_is_sign():
    w = torch.tensor([[0.5, -1.5] * 64])
    qs, d = q1_0.quantize(w)
    assert d.item() == 1.0                    # mean(|0.5|, |-1.5|)
    assert qs[0, 0].item() == 0b01010101      # +,-,+,- ... LSB first
    assert torch.equal(q1_0.to_blocks(qs, d)[0, :2], torch.tensor([0x00, 0x3C], dtype=torch.uint8))


def test_bit_order_matches_ggml_formula():
    torch.manual_seed(0)
    w = torch.randn(3, 256)
    qs, d = q1_0.quantize(w)
    blocks = q1_0.to_blocks(qs, d).view(3, 2, 18)
    for r in range(3):
        for b in range(2):
            for j in range(128):
                bit = (int(blocks[r, b, 2 + (j >> 3)]) >> (j & 7)) & 1
                assert bit == int(w[r, b * 128 + j] >= 0)


def test_zero_counts_as_positive_like_ggml():
    qs, d = q1_0.quantize(torch.zeros(1, 128))
    assert qs.eq(255).all() and d.item() == 0.0


@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (5, 129), (2, 1), (33, 1000), (4, 3, 3, 3), (16, 320, 3, 3)])
def test_round_trip_over_odd_shapes(shape):
    torch.manual_seed(1)
    w = torch.randn(*shape)
    p = Q1Tensor.from_float(w)
    deq = p.dequantize()
    assert deq.shape == w.shape
    assert torch.equal(deq.sign(), torch.where(w >= 0, 1.0, -1.0))
    # every value is +-d of its group, and d is the mean |w| over the real (unpadded) weights
    flat = w.reshape(shape[0], -1)
    cols = flat.shape[1]
    for g in range(q1_0.n_blocks(cols)):
        real = flat[:, g * 128:(g + 1) * 128]
        torch.testing.assert_close(p.d[:, g].float(), real.abs().mean(1).half().float())
    again = Q1Tensor.from_blocks(p.to_blocks(), p.shape)
    assert torch.equal(again.qs, p.qs) and torch.equal(again.d, p.d)
    assert p.nbytes == q1_0.packed_nbytes(shape[0], cols)


def test_dequantize_in_half_precision_equals_fp32_path():
    w = torch.randn(8, 384)
    p = Q1Tensor.from_float(w)
    assert torch.equal(p.dequantize(torch.float16).float(), p.dequantize(torch.float32))


def test_from_signs_is_lossless_for_sign_times_scale_weights():
    torch.manual_seed(2)
    scales = torch.rand(4, 3).half() + 0.1
    positive = torch.rand(4, 300) > 0.5
    p = Q1Tensor.from_signs(positive, scales, (4, 300))
    assert torch.equal(p.d, scales)
    dense = torch.where(positive, 1.0, -1.0) * scales.float().repeat_interleave(128, 1)[:, :300]
    assert torch.equal(p.dequantize(), dense)
    assert torch.equal(Q1Tensor.from_float(dense).qs, p.qs)


def test_packed_weight_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="do not fit"):
        Q1Tensor(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.float16), (2, 128))


def test_transposed_single_group_scales_are_stored_row_major():
    # a [rows, 1] view of a transposed tensor counts as contiguous but has a last stride != 1
    scales = torch.rand(1, 6).half().t()
    assert scales.is_contiguous() and scales.stride(-1) != 1
    p = Q1Tensor(torch.zeros(6, 16, dtype=torch.uint8), scales, (6, 128))
    assert p.d.stride() == (1, 1) and torch.equal(p.d, scales)
    assert torch.equal(Q1Tensor.from_blocks(p.to_blocks(), p.shape).d, scales)
