"""W1A8 through cuBLAS's blockwise fp8 GEMM (fp8_blockwise): the quantizer and the float64 truth on
any machine; on a GPU with fp8 tensor cores, the Triton quantizer and the cuBLAS product against them."""

import pytest
import torch

from bonsai_core.quant import fp8_blockwise, q1_0

E4M3 = torch.float8_e4m3fn


def test_block_scales_are_the_block_max_over_448_worked_by_hand():
    x = torch.zeros(2, 130)
    x[0, :3] = torch.tensor([1.0, -2.0, 4.0])  # block 0 of row 0: max 4 -> s = 4/448, q = 112, -224, 448
    x[0, 128:] = torch.tensor([0.5, -0.25])   # block 1 (2 real inputs): s = 0.5/448
    q, s = fp8_blockwise.reference_quantize(x)
    assert q.dtype == E4M3 and q.shape == (2, 130) and s.shape == (2, 2)
    assert s[0].tolist() == pytest.approx([4 / 448, 0.5 / 448])
    assert q[0, :3].float().tolist() == [112.0, -224.0, 448.0]
    assert q[0, 128:].float().tolist() == [448.0, -224.0]
    assert s[1].tolist() == [1.0, 1.0] and not q[1].float().any()  # an all-zero block: scale 1, codes 0


def test_the_reference_is_exact_where_the_activations_are_on_the_e4m3_grid():
    """Activations built as (block scale, a power of two) x (e4m3 values, each block reaching 448)
    quantize without loss, so the float64 truth must equal the plain product with the dequantized weight."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 5, 24, 384
    codes = torch.randn(m, k, generator=g).mul(100).clamp(-448, 448).to(E4M3).float()
    codes[:, ::128] = 448.0
    scales = 2.0 ** torch.randint(-6, 3, (m, k // 128), generator=g).float()
    x = codes * scales.repeat_interleave(128, dim=1)
    qs, d = q1_0.quantize(torch.randn(n, k, generator=g))
    w = q1_0.dequantize(qs, d, k, torch.float32).double()
    bias = torch.randn(n, generator=g)
    got = fp8_blockwise.reference(x, qs, d, k, bias)
    want = x.double() @ w.T + bias.double()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9)


def test_the_cpu_never_claims_the_gpu_path():
    assert "CUDA" in fp8_blockwise.available(torch.device("cpu"))
    assert fp8_blockwise.takes(65, 3072, 3072) and not fp8_blockwise.takes(64, 3072, 3072)
    assert not fp8_blockwise.takes(1536, 300, 1000)
    assert not fp8_blockwise.takes(4096, 320, 320)  # a partial last block: the Triton W1A8 kernel's


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fp8_or_skip():
    why = fp8_blockwise.available(torch.device("cuda"))
    if why is not None:
        pytest.skip(why)


@gpu
def test_the_triton_quantizer_equals_the_reference():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    x = torch.randn(77, 1000, device="cuda", dtype=torch.bfloat16) * 3
    x[3] = 0
    for m_major in (False, True):
        q, s = fp8_blockwise.quantize_blocks(x, m_major=m_major)
        rq, rs = fp8_blockwise.reference_quantize(x)
        assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@gpu
@pytest.mark.parametrize("m,n,k", [(65, 3072, 3072), (1536, 3072, 9216), (300, 320, 640), (256, 18432, 3072),
                                   (100, 320, 320)])
def test_the_blockwise_gemm_equals_the_float64_truth(m, n, k):
    _fp8_or_skip()
    g = torch.Generator().manual_seed(1)
    qs, d = q1_0.quantize(torch.randn(n, k, generator=g) * 0.02)
    qs, d = qs.cuda(), d.cuda()
    x = torch.randn(m, k, generator=g).cuda().to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    got = fp8_blockwise.linear(x, qs, d, k, bias)
    want = fp8_blockwise.reference(x, qs, d, k, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 8e-3  # one bf16 rounding
    exact = x.double() @ q1_0.dequantize(qs, d, k, torch.float32).double().T + bias.double()
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 6e-2  # the fp8 activations' error


def test_padded_rows_are_zero_codes_with_unit_scales():
    """The GEMM pads tokens to a multiple of ROW_ALIGN; the padding must add nothing to the product."""
    x = torch.randn(65, 300).to(torch.bfloat16)
    q, s = fp8_blockwise.quantize_blocks(x, rows=80)
    assert q.shape == (80, 300) and s.shape == (80, 3)
    q0, s0 = fp8_blockwise.quantize_blocks(x)
    assert torch.equal(q[:65].float(), q0.float()) and torch.equal(s[:65], s0)
    assert (q[65:].float() == 0).all() and (s[65:] == 1).all()
    with pytest.raises(ValueError, match="rows 64 < tokens 65"):
        fp8_blockwise.quantize_blocks(x, rows=64)
