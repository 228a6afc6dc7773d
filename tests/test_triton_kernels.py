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
@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_triton_linear_matches_reference(m, n, k, dtype, path):
    torch.manual_seed(1)
    qs, d = q1_0.quantize(torch.randn(n, k) * 0.02)
    qs, d = qs.cuda(), d.cuda()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = kernels.REFERENCE.linear(x.float(), Q1Tensor(qs, d, (n, k)), bias.float())
    fn = triton_q1.linear_fused if path == "fused" else triton_q1.linear_dequant
    got = fn(x, qs, d, k, bias).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()
