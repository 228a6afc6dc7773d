"""The overlapped dequantize + GEMM path's slicing, on the CPU (the same arithmetic runs slice by slice
there; its CUDA streams and graph capture are tested in test_triton_kernels.py)."""

import pytest
import torch

from bonsai_core.quant import kernels, overlap, q1_0
from bonsai_core.quant.tensor import Q1Tensor


def test_slices_cover_the_rows_once_in_aligned_pieces():
    assert overlap.slices(27648, 4) == [(0, 6912), (6912, 13824), (13824, 20736), (20736, 27648)]
    assert overlap.slices(1000, 4) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert overlap.slices(300, 4) == [(0, 128), (128, 256), (256, 300)]  # too few rows for four
    assert overlap.slices(64, 4) == [(0, 64)]
    for n in (1, 127, 128, 129, 3072, 9999):
        parts = overlap.slices(n, 4)
        assert parts[0][0] == 0 and parts[-1][1] == n and len(parts) <= 4
        assert all(a2 == b1 for (_, b1), (a2, _) in zip(parts, parts[1:]))
        assert all((b - a) % 128 == 0 for a, b in parts[:-1])


@pytest.mark.parametrize("shape,n,k", [((7, 384), 1000, 384), ((2, 5, 1000), 300, 1000), ((3, 128), 64, 128)])
def test_sliced_product_equals_the_reference(shape, n, k):
    torch.manual_seed(0)
    qs, d = q1_0.quantize(torch.randn(n, k) * 0.02)
    x, bias = torch.randn(*shape), torch.randn(n)
    calls = []

    def dequant(q, s, cols, out):
        calls.append(out.shape[0])
        out.copy_(q1_0.dequantize(q, s, cols, out.dtype))
        return out

    got = overlap.linear(x, qs, d, k, bias, dequant)
    want = kernels.REFERENCE.linear(x, Q1Tensor(qs, d, (n, k)), bias)  # one dense weight, one product
    assert got.shape == (*shape[:-1], n)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [b - a for a, b in overlap.slices(n, 4)]  # each slice dequantized once, in order


def test_refusals_and_empty_weights():
    qs, d = q1_0.quantize(torch.randn(256, 128))
    with pytest.raises(ValueError, match="129 features for a weight of 128"):
        overlap.linear(torch.randn(2, 129), qs, d, 128, None, lambda *a: None)
    with pytest.raises(RuntimeError, match="without gradients"):
        overlap.linear(torch.randn(2, 128, requires_grad=True), qs, d, 128, None, lambda *a: None)
    q0, d0 = qs[:0], d[:0]  # no output rows: an empty product, no dequantize
    assert overlap.linear(torch.randn(3, 128), q0, d0, 128, None, lambda *a: pytest.fail("called")).shape == (3, 0)
