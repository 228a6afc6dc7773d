"""The fused W1A16 and W1A8 kernels (triton_w1) against truths computed without them (CUDA only).

W1A16: the reference dequantizes into the input's dtype (so its weights are +-bf16(d)) and
multiplies in float32; the kernel must equal that up to float32 summation order and one rounding
of the output. W1A8: the activations are quantized per token here in plain torch (e4m3: round to
nearest even of x / (max|x| / 448); int8: round half away from zero of x / (max|x| / 127)), the
product taken in float32 with the same dequantized weight: the kernel must equal that, and sit
within the 8-bit rounding error of the 16-bit product.
"""

import pytest
import torch

from bonsai_core.quant import q1_0, triton_q1

pytestmark = pytest.mark.skipif(not triton_q1.available(), reason="needs a CUDA device and Triton")

# every packed linear shape of klein-4B, SD1.5 and SDXL (out, in), and odd ones: a partial group
# (K = 320, 1000), N not a multiple of any block
LAYER_SHAPES = [(3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288),
                (320, 320), (2560, 320), (320, 1280), (640, 640), (5120, 640), (640, 2560),
                (1280, 1280), (10240, 1280), (1280, 5120), (300, 1000), (64, 128)]


def _weights(n, k, seed=0):
    torch.manual_seed(seed)
    qs, d = q1_0.quantize(torch.randn(n, k) * 0.02)
    return qs.cuda(), d.cuda()


def _reference(x, qs, d, k, bias, wdtype):
    w = q1_0.dequantize(qs, d, k, wdtype).float()
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def _close(got, ref, tol):
    err = (got.float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("n,k", LAYER_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 40, 256, 1536])
def test_w1a16_matches_the_reference_on_every_layer_shape(n, k, m):
    from bonsai_core.quant import triton_w1

    qs, d = _weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    got = triton_w1.linear(x, qs, d, k, bias)
    # one bf16 rounding of the output (2^-8 relative) and float32 sums in another order
    _close(got, _reference(x, qs, d, k, bias, torch.bfloat16), 8e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("expand", [0, 1])
@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (5, 300, 1000), (64, 64, 128), (65, 130, 320), (300, 700, 1280)])
@pytest.mark.parametrize("bias", [True, False])
def test_w1a16_both_expansions_both_dtypes(dtype, expand, m, n, k, bias):
    from bonsai_core.quant import triton_w1

    qs, d = _weights(n, k, 1)
    x = torch.randn(2, m, k, device="cuda", dtype=dtype)[1]  # a view, batch-shaped input below
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    got = triton_w1.linear(x.reshape(1, m, k), qs, d, k, b, None, expand)
    assert got.shape == (1, m, n) and got.dtype == dtype
    _close(got.reshape(m, n), _reference(x, qs, d, k, b, dtype), 8e-3 if dtype == torch.bfloat16 else 2e-3)
    assert torch.equal(got, triton_w1.linear(x.reshape(1, m, k), qs, d, k, b, None, expand))  # deterministic


def _emulated_w1a8(x, qs, d, k, bias, act):
    xf = x.float()
    amax = xf.abs().amax(1, keepdim=True)
    if act == "fp8":
        s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        q = (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    else:
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        v = xf / s
        q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    return _reference(q * s, qs, d, k, bias, torch.float32)


@pytest.mark.parametrize("act", ["fp8", "int8"])
@pytest.mark.parametrize("m,n,k", [(1, 3072, 3072), (16, 2560, 320), (40, 640, 2560), (256, 3072, 9216),
                                   (1536, 18432, 3072), (300, 700, 1000)])
def test_w1a8_equals_its_emulation_and_stays_near_w1a16(act, m, n, k):
    from bonsai_core.quant import triton_w1

    if act == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm89+")
    qs, d = _weights(n, k, 2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[0] = 0  # a zero row must give the bias, not NaN
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    got = triton_w1.linear(x, qs, d, k, bias, act)
    assert torch.isfinite(got).all()
    _close(got, _emulated_w1a8(x, qs, d, k, bias, act), 1e-2)
    exact = _reference(x, qs, d, k, bias, torch.float32)
    _close(got, exact, 6e-2 if act == "fp8" else 2e-2)
    assert torch.equal(got[0], bias)


def test_quantize_rows_scales_and_codes():
    from bonsai_core.quant import triton_w1

    x = torch.tensor([[0.5, -2.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]], device="cuda", dtype=torch.bfloat16)
    q, s = triton_w1.quantize_rows(x, "int8")
    assert s.tolist() == pytest.approx([2.0 / 127, 1.0])
    assert q[0].tolist() == [32, -127, 16, 0] and q[1].tolist() == [0, 0, 0, 0]  # 31.75, 15.875 rounded
    q, s = triton_w1.quantize_rows(x, "fp8")
    assert s.tolist() == pytest.approx([2.0 / 448, 1.0])
    assert q[0].float().tolist() == [112.0, -448.0, 56.0, 0.0] and q[1].float().tolist() == [0.0] * 4


# Q4_AFFINE (the 4-bit text encoders): Qwen3-4B's linears (hidden 2560, q 4096, k/v 1024, MLP 9728)
# and CLIP-L / bigG's; the reference dequantizes into the input's dtype (scale * q + bias in float32,
# one rounding), then multiplies in float32
Q4_SHAPES = [(4096, 2560), (1024, 2560), (2560, 4096), (9728, 2560), (2560, 9728),
             (768, 768), (3072, 768), (1280, 5120), (70, 128)]


@pytest.mark.parametrize("n,k", Q4_SHAPES)
@pytest.mark.parametrize("m", [1, 7, 77, 512])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w4a16_matches_the_reference(n, k, m, sdtype):
    from bonsai_core.quant import q4_affine, triton_q4

    torch.manual_seed(3)
    qs, scale, offset = (t.cuda() for t in q4_affine.quantize(torch.randn(n, k) * 0.02, 64, sdtype))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ q4_affine.dequantize(qs, scale, offset, torch.bfloat16).float().T + bias.float()
    got = triton_q4.linear(x, qs, scale, offset, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    _close(got, ref, 8e-3)
    assert torch.equal(got, triton_q4.linear(x, qs, scale, offset, bias))


def test_the_w4_kernel_runs_a_q4_layer_through_the_contract():
    from bonsai_core.quant import kernels
    from bonsai_core.quant.layers import BonsaiLinear
    from bonsai_core.quant.tensor import Q4Tensor

    torch.manual_seed(4)
    lin = torch.nn.Linear(256, 96).cuda().bfloat16()
    layer = BonsaiLinear.from_linear(lin, qtype="Q4_AFFINE")
    assert isinstance(layer.weight, Q4Tensor)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    with kernels.forced("w4"):
        got = layer(x)
    with kernels.forced("reference"):
        ref = layer(x.float())
    _close(got, ref, 1e-2)
