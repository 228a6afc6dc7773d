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


def test_flat_buffer_is_every_rows_bits_then_every_scale_read_back_as_views():
    # two rows of one block each, hand-made as GGUF blocks: d = 1.0 (00 3C) and d = 2.0 (00 40)
    blocks = torch.zeros(2, 18, dtype=torch.uint8)
    blocks[0, :3] = torch.tensor([0x00, 0x3C, 0x05])
    blocks[1, :3] = torch.tensor([0x00, 0x40, 0xFF])
    p = Q1Tensor.from_blocks(blocks, (2, 128))
    flat = p.to_flat()
    assert flat.dtype == torch.uint8 and flat.numel() == p.nbytes == 36
    assert torch.equal(flat[:32], torch.cat([blocks[0, 2:], blocks[1, 2:]]))       # bits of row 0, row 1
    assert flat[32:].tolist() == [0x00, 0x3C, 0x00, 0x40]                          # then both scales
    back = Q1Tensor.from_flat(flat, (2, 128), torch.float32)
    assert back.qs.data_ptr() == flat.data_ptr() and back.d.data_ptr() == flat.data_ptr() + 32  # no copy
    assert torch.equal(back.dequantize(), p.dequantize(torch.float32))
    with pytest.raises(ValueError, match="uint8 \\[36\\]"):
        Q1Tensor.from_flat(flat[:-2], (2, 128))


def test_flat_buffer_round_trips_a_conv_weight_with_a_partial_group():
    p = Q1Tensor.from_float(torch.randn(5, 3, 3, 3))  # rows of 27 weights: one padded group each
    back = Q1Tensor.from_flat(p.to_flat(), p.shape)
    assert back.shape == p.shape and torch.equal(back.dequantize(), p.dequantize())
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8), p.to_flat()])[1:]  # no fp16 view at an odd offset
    assert torch.equal(Q1Tensor.from_flat(odd, p.shape).dequantize(), p.dequantize())
