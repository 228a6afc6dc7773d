"""The CUDA Triton paths equal the reference Q1_0 path (runs only where CUDA and Triton exist)."""

import pytest
import torch

from bonsai_core.quant import kernels, q1_0, triton_q1
from bonsai_core.quant.tensor import Q1Tensor


pytestmark = pytest.mark.skipif(not triton_q1.available(), reason="needs a CUDA device and Triton")


@pytest.mark.parametrize("rows,cols", [(256, 3072), (300, 384), (33, 1000), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_dequantize_is_bit_exact(rows, cols, dtype):
    torch.manual_seed(0)
    qs, d = q1_0.quantize(torch.randn(rows, cols))
    qs, d = qs.cuda(), d.cuda()
    assert torch.equal(triton_q1.dequantize_triton(qs, d, cols, dtype), q1_0.dequantize(qs, d, cols, dtype))


@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (77, 300, 1000), (1536, 3072, 3072), (5, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["fused", "dequant", "auto", "overlap"])
def test_triton_linear_matches_reference(m, n, k, dtype, path):
    torch.manual_seed(1)
    qs, d = q1_0.quantize(torch.randn(n, k) * 0.02)
    qs, d = qs.cuda(), d.cuda()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = kernels.REFERENCE.linear(x.float(), Q1Tensor(qs, d, (n, k)), bias.float())
    fn = {"fused": triton_q1.linear_fused, "dequant": triton_q1.linear_dequant, "auto": triton_q1.linear_auto,
          "overlap": triton_q1.linear_overlap}[path]
    got = fn(x, qs, d, k, bias).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("n,x_shape,with_bias", [(1000, (2, 800), True), (129, (1,), False), (3072, (1536,), True)])
def test_overlap_path_eager_and_in_a_cuda_graph(n, x_shape, with_bias):
    # eager, each slice's GEMM must wait for its own dequantize (a missing wait is a race, checked on the
    # result); captured, the side stream's fork and join must be capturable, and the replay on new
    # inputs computes them. 1000 rows: slices of 256, 256, 256, 232; 129: 128 and a 1-row tail
    torch.manual_seed(3)
    k = 384
    qs, d = q1_0.quantize(torch.randn(n, k) * 0.02)
    qs, d = qs.cuda(), d.cuda()
    w = Q1Tensor(qs, d, (n, k))
    x = torch.randn(*x_shape, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None

    def ref():
        return kernels.REFERENCE.linear(x.float(), w, None if bias is None else bias.float())

    y0 = triton_q1.linear_overlap(x, qs, d, k, bias)
    torch.cuda.synchronize()
    assert (y0.float() - ref()).abs().max().item() <= 2e-2 * ref().abs().max().item()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        triton_q1.linear_overlap(x, qs, d, k, bias)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        y = triton_q1.linear_overlap(x, qs, d, k, bias)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert y.shape == (*x_shape, n)
    assert (y.float() - ref()).abs().max().item() <= 2e-2 * ref().abs().max().item()


@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (5, 300, 1000), (16, 3072, 3072), (3, 64, 128), (16, 27648, 3072)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_gemv_matches_the_reference_and_is_deterministic(m, n, k, dtype, bias):
    torch.manual_seed(2)
    qs, d = q1_0.quantize(torch.randn(n, k) * 0.02)
    qs, d = qs.cuda(), d.cuda()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = kernels.REFERENCE.linear(x.float(), Q1Tensor(qs, d, (n, k)), None if b is None else b.float())
    got = triton_q1.linear_gemv(x, qs, d, k, b)
    # float32 accumulation of exact +-1 products, one rounding to the output dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert (got.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert torch.equal(got, triton_q1.linear_gemv(x, qs, d, k, b))


def test_auto_kernel_takes_the_gemv_for_few_tokens_and_dequant_for_many(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_q1, "linear_gemv", lambda *a: calls.append("gemv") or a[0][..., :4])
    monkeypatch.setattr(triton_q1, "linear_dequant", lambda *a: calls.append("dequant") or a[0][..., :4])
    qs, d = q1_0.quantize(torch.randn(4, 128))
    for m in (1, 16, 17):
        triton_q1.linear_auto(torch.randn(m, 128, device="cuda"), qs.cuda(), d.cuda(), 128, None)
    assert calls == ["gemv", "gemv", "dequant"]
