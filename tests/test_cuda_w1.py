"""The CUDA C++ W1A16 kernel (cuda_w1, ``BONSAI_KERNEL=mma``) against truths computed without it.

On a GPU: the reference dequantizes into the input's dtype (its weights are +-d rounded to that
dtype, as the kernel builds them) and multiplies in float32; the kernel must equal that up to
float32 summation order and one rounding of the output, on every layer shape of klein-4B, SD1.5
and SDXL, with and without split-K, bias, odd sizes, strided inputs, in a CUDA graph. On any
machine: the launch plan, the build (atomic, cached, clear when there is no compiler) and the
kernel's refusal messages.
"""

import os
import stat
import sys

import pytest
import torch

from bonsai_core.quant import cuda_w1, q1_0

_REAL_LINEAR = cuda_w1.linear

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (and nvcc to build the kernel)")

LAYER_SHAPES = [(3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288),
                (320, 320), (2560, 320), (320, 1280), (640, 640), (5120, 640), (640, 2560),
                (1280, 1280), (10240, 1280), (1280, 5120), (300, 1000), (64, 128), (8, 8)]


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs, d = q1_0.quantize(torch.randn(n, k, generator=g) * 0.02)
    return qs.cuda(), d.cuda()


def _reference(x, qs, d, k, bias, dtype):
    w = q1_0.dequantize(qs, d, k, dtype).double()  # plain torch ops, float64 on the GPU
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def _close(got, ref, dtype):
    assert torch.isfinite(got).all()
    err = (got.double() - ref).abs().max().item()
    tol = (8e-3 if dtype == torch.bfloat16 else 2e-3) * ref.abs().max().item()
    assert err <= tol, (err, ref.abs().max().item())


def _poison():
    # fill freed cache blocks with NaN so an output element the kernel never writes shows
    torch.full((1 << 24,), float("nan"), device="cuda")


@needs_gpu
@pytest.mark.parametrize("n,k", LAYER_SHAPES)
@pytest.mark.parametrize("m,wide", [(1, False), (7, False), (16, False), (17, False), (40, False), (64, False),
                                    (100, False), (256, False), (1536, False), (1, True), (7, True), (16, True),
                                    (17, True), (32, True)])
def test_mma_matches_the_reference_on_every_layer_shape(n, k, m, wide):
    qs, d = _weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    _poison()
    got = cuda_w1.linear(x, qs, d, k, bias, wide=wide)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    _close(got, _reference(x, qs, d, k, bias, torch.bfloat16), torch.bfloat16)


@needs_gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (3072, 12288), (320, 320), (1280, 5120), (300, 1000)])
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("ratio", [2, 8])
def test_mma_four_tiles_a_warp_on_narrow_layers_matches_the_reference(n, k, m, ratio):
    """``four`` (bench_gemm's mma_nt4 / mma_nt4x): narrow layers on four n8 tiles a warp, K split more."""
    qs, d = _weights(n, k, 2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    _poison()
    got = cuda_w1.linear(x, qs, d, k, bias, wide=False, four=True, partial_ratio=ratio)
    _close(got, _reference(x, qs, d, k, bias, torch.bfloat16), torch.bfloat16)
    assert torch.equal(got, cuda_w1.linear(x, qs, d, k, bias, wide=False, four=True, partial_ratio=ratio))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (5, 300, 1000), (3, 301, 136), (64, 64, 128), (65, 130, 320),
                                   (300, 700, 1280), (33, 18432, 3072)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wide", [False, True])
def test_mma_both_dtypes_odd_sizes_views_and_repeatable(dtype, m, n, k, bias, wide):
    if wide and m > cuda_w1.WIDE_MAX_M:
        pytest.skip("wide lanes are built up to WIDE_MAX_M tokens (the narrow run covers this size)")
    qs, d = _weights(n, k, 1)
    x = torch.randn(2, m, k + 8, device="cuda", dtype=dtype)[1, :, 8:]  # strided rows, offset start
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    _poison()
    got = cuda_w1.linear(x.reshape(1, m, k), qs, d, k, b, wide=wide)
    assert got.shape == (1, m, n) and got.dtype == dtype
    _close(got.reshape(m, n), _reference(x, qs, d, k, b, dtype), dtype)
    again = cuda_w1.linear(x.reshape(1, m, k), qs, d, k, b, wide=wide)
    assert torch.equal(got, again)  # split-K sums in a fixed order: bit-identical


@needs_gpu
def test_mma_takes_misaligned_and_strided_parts():
    """A contiguous input that starts off a 16-byte boundary (the kernel loads 16 bytes at a time), and
    scales that are a strided view: both are copied into shape first, never read wrongly."""
    n, k, m = 640, 1280, 5
    qs, d = _weights(n, k, 3)
    x = torch.randn(m * k + 1, device="cuda", dtype=torch.bfloat16)[1:].view(m, k)
    assert x.is_contiguous() and x.data_ptr() % 16
    d_view = torch.empty(n, 2 * d.shape[1], device="cuda", dtype=torch.float16)[:, ::2]
    d_view.copy_(d)
    assert not d_view.is_contiguous()
    _close(cuda_w1.linear(x, qs, d_view, k, None), _reference(x, qs, d, k, None, torch.bfloat16), torch.bfloat16)


@needs_gpu
def test_mma_negative_scales_and_a_graph_replay():
    """Scales of either sign (imported files may hold them) and a CUDA graph: captured once,
    replayed on new inputs, equal to the eager call."""
    n, k, m = 1280, 5120, 16
    qs, d = _weights(n, k, 2)
    d = torch.where(torch.rand_like(d, dtype=torch.float32) < 0.5, -d, d)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    _close(cuda_w1.linear(x, qs, d, k, None), _reference(x, qs, d, k, None, torch.bfloat16), torch.bfloat16)
    static = x.clone()
    cuda_w1.linear(static, qs, d, k, None)  # warm (build, plan); the capture's own stream is new to it
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_w1.linear(static, qs, d, k, None)
    for seed in range(3):
        static.copy_(torch.randn(m, k, device="cuda", dtype=torch.bfloat16,
                                 generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, cuda_w1.linear(static, qs, d, k, None))
        # an eager call that needs more split-K room than any before: the workspace grows, and the
        # graph's replay (which writes into the older buffer) must still be right
        qs2, d2 = _weights(27648, 3072, seed)
        cuda_w1.linear(torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16), qs2, d2, 3072, None)
    graph.replay()
    assert torch.equal(out, cuda_w1.linear(static, qs, d, k, None))


@needs_gpu
def test_mma_first_met_inside_a_capture():
    """A stream the kernel first meets inside a capture (``torch.cuda.graph``'s own stream, or one
    passed in): its split-K counters are zeroed by every graph captured before an eager call on it,
    so the second graph replayed first is right, and so is a later eager call on that stream."""
    n, k, m = 3072, 3072, 8  # few tiles: K is split, so the counters matter
    assert cuda_w1.plan(m, n, k // 128, torch.cuda.get_device_properties(0).multi_processor_count)[2] > 1
    qs, d = _weights(n, k, 5)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = _reference(x, qs, d, k, None, torch.bfloat16)
    cuda_w1.linear(x, qs, d, k, None)  # the library is built and loaded outside the captures
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    graphs, outs = [], []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            outs.append(cuda_w1.linear(x, qs, d, k, None))
        graphs.append(g)
    graphs[1].replay()
    torch.cuda.synchronize()
    _close(outs[1], want, torch.bfloat16)
    graphs[0].replay()
    graphs[1].replay()
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1])
    with torch.cuda.stream(s):
        eager = cuda_w1.linear(x, qs, d, k, None)
    torch.cuda.synchronize()
    assert torch.equal(eager, outs[1])


@needs_gpu
def test_mma_through_the_contract(monkeypatch):
    from bonsai_core.quant import kernels
    from bonsai_core.quant.layers import BonsaiLinear

    lin = torch.nn.Linear(640, 320).cuda().to(torch.bfloat16)
    layer = BonsaiLinear.from_linear(lin)
    calls = []
    monkeypatch.setattr(cuda_w1, "linear", lambda *a: calls.append(a[0].shape) or _REAL_LINEAR(*a))
    for tokens in (7, 77):  # 2 x 7 = 14 rows go to the CUDA kernel, 4 x 77 = 308 to dequantize + cuBLAS
        x = torch.randn(2 if tokens == 7 else 4, tokens, 640, device="cuda", dtype=torch.bfloat16)
        with kernels.forced("reference"):
            want = layer(x)
        with kernels.forced("mma"):
            assert kernels.active(x.reshape(-1, 640), layer.weight) == "mma"
            got = layer(x)
        assert (got.float() - want.float()).abs().max().item() <= 8e-3 * want.float().abs().max().item()
    assert calls == [torch.Size([2, 7, 640])]


def test_the_plan_splits_k_only_while_blocks_are_few():
    mt, nt, splits, per = cuda_w1.plan(1, 3072, 24, sms=132)
    assert mt == 1 and nt == 1 and splits > 1 and (splits - 1) * per < 24 <= splits * per
    assert cuda_w1.plan(4096, 3072, 24, sms=132) == (4, 4, 1, 24)  # 1536 blocks already: no split
    assert cuda_w1.plan(1, 27648, 24, sms=132)[:2] == (1, 4)       # 216 wide blocks fill the card
    assert cuda_w1.plan(40, 3072, 24, sms=132)[0] == 4 and cuda_w1.plan(20, 64, 1, sms=132)[:3] == (2, 1, 1)
    for m, n, groups in [(1, 3072, 96), (16, 320, 3), (7, 64, 1), (1, 27648, 24), (64, 640, 5), (64, 3072, 24)]:
        mt, nt, splits, per = cuda_w1.plan(m, n, groups, sms=132)
        assert nt in (1, 4) and 1 <= splits <= cuda_w1.MAX_SPLITS and (splits - 1) * per < groups <= splits * per
        # fp32 partials written and read: at most twice the packed bits, unless there is no split at all
        assert splits == 1 or splits * m * n * 8 <= 2 * n * groups * 128 // 8
        units = -(-groups // 4)  # wide lanes: K is split in units of four groups
        mt, nt, splits, per = cuda_w1.plan(m, n, groups, sms=132, wide=True)
        assert 1 <= splits <= cuda_w1.MAX_SPLITS and (splits - 1) * per < units <= splits * per


def test_the_plan_takes_four_tiles_and_more_partials_when_asked():
    assert cuda_w1.plan(16, 3072, 24, sms=132) == (1, 1, 6, 4)  # the engine's default: narrow blocks
    mt, nt, splits, per = cuda_w1.plan(16, 3072, 24, sms=132, four=True)
    assert (mt, nt) == (1, 4) and splits * 16 * 3072 * 8 <= 2 * 3072 * 24 * 16
    mt, nt, splits8, per = cuda_w1.plan(16, 3072, 24, sms=132, four=True, partial_ratio=8)
    assert nt == 4 and splits8 > splits and splits8 * 16 * 3072 * 8 <= 8 * 3072 * 24 * 16
    assert (splits8 - 1) * per < 24 <= splits8 * per


def _fake_nvcc(tmp_path, body):
    script = tmp_path / "nvcc"
    script.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.skipif(os.name != "posix", reason="a fake compiler script needs a POSIX shell")
def test_build_writes_the_library_whole_once_and_says_why_it_failed(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_w1.CACHE_ENV, str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    ok = _fake_nvcc(tmp_path, f"open({str(calls)!r}, 'a').write('x')\n"
                              "open(args[args.index('-o') + 1], 'wb').write(b'lib')")
    out = cuda_w1.build((9, 0), nvcc=ok)
    assert out.read_bytes() == b"lib" and out.name.endswith("-sm90.so")
    assert cuda_w1.build((9, 0), nvcc=ok) == out and calls.read_text() == "x"  # cached: built once
    bad = _fake_nvcc(tmp_path, "open(args[args.index('-o') + 1], 'wb').write(b'half')\n"
                               "sys.stderr.write('w1_mma.cu(12): error: something\\n'); sys.exit(2)")
    with pytest.raises(RuntimeError, match=r"failed \(2\):\nw1_mma.cu\(12\): error: something"):
        cuda_w1.build((8, 6), nvcc=bad)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [out.name]  # no half-written file


def test_no_compiler_is_a_clear_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_w1.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(cuda_w1.NVCC_ENV, raising=False)
    monkeypatch.setattr(cuda_w1, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="no CUDA compiler.*BONSAI_NVCC"):
        cuda_w1.build((9, 0))
    monkeypatch.setattr(cuda_w1, "_LIBS", {})
    assert "below 8.0" in cuda_w1._load((7, 5))
    assert "could not be built: no CUDA compiler" in cuda_w1._load((9, 0))


def test_mma_is_a_known_kernel_and_the_cpu_falls_back_to_the_auto_choice(monkeypatch):
    from bonsai_core.quant import kernels
    from bonsai_core.quant.tensor import Q1Tensor

    assert "mma" in kernels.known_names()
    w = Q1Tensor.from_float(torch.randn(8, 256))
    x = torch.randn(2, 256)
    auto = kernels.active(x, w)
    monkeypatch.setenv(kernels.ENV, "mma")
    kernels.reload()
    try:
        assert kernels.active(x, w) == auto != "mma"
    finally:
        monkeypatch.delenv(kernels.ENV)
        kernels.reload()
