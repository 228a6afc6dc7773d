"""Triton kernels for Q1_0 on CUDA (optional: used only where Triton and a CUDA device exist).

Two paths, both tested against the reference ``q1_0.dequantize`` + dense matmul:

* ``dequantize_triton``: one pass from bits + scales to a dense weight in the input dtype (the
  reference path needs several passes: a table gather, a scale multiply, a slice), then cuBLAS.
* ``linear_fused``: a matmul that reads the packed weight directly. Each program computes a
  ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T``; along K it walks one 128-weight group at a time,
  unpacks the 16 bytes of sign bits of every output row into +-1, multiplies by the row's group
  scale, and feeds the tensor cores. The dense weight never exists in memory.

Bit order is GGUF's Q1_0 (see q1_0.py): weight j of a group is bit (j & 7) of byte j >> 3.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

GROUP = 128


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _dequant_kernel(qs_ptr, d_ptr, out_ptr, N, K, NB,
                        stride_qs, stride_d, stride_out,
                        BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        # one program: BLOCK_N rows x GROUPS groups of 128 weights; bytes are loaded once,
        # contiguously, and each byte is expanded to its 8 bits in registers.
        pid_n = tl.program_id(0)
        pid_g = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c = tl.arange(0, GROUPS * 16)                       # byte index inside this tile
        gi = pid_g * GROUPS + tl.arange(0, GROUPS)          # group index
        rmask = rows < N
        byte = tl.load(qs_ptr + rows[:, None] * stride_qs + pid_g * GROUPS * 16 + c[None, :],
                       mask=rmask[:, None] & ((pid_g * GROUPS + c // 16) < NB)[None, :], other=0)
        bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1   # [BN, C, 8]
        signs = tl.reshape(bits.to(tl.float32) * 2.0 - 1.0, (BLOCK_N, GROUPS, 128))
        scale = tl.load(d_ptr + rows[:, None] * stride_d + gi[None, :],
                        mask=rmask[:, None] & (gi < NB)[None, :], other=0.0).to(tl.float32)
        w = tl.reshape(signs * scale[:, :, None], (BLOCK_N, GROUPS * 128))
        cols = pid_g * GROUPS * 128 + tl.arange(0, GROUPS * 128)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < K)[None, :])

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        ],
        key=["M_BUCKET", "N", "K"],
    )
    @triton.jit
    def _fused_kernel(x_ptr, qs_ptr, d_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_qs, stride_d, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, 128)
        b = tl.arange(0, 16)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        nb = tl.cdiv(K, 128)
        for g in range(0, nb):
            cols = g * 128 + j
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                        mask=mmask[:, None] & (cols < K)[None, :], other=0.0)
            byte = tl.load(qs_ptr + rn[:, None] * stride_qs + g * 16 + b[None, :],
                           mask=nmask[:, None], other=0)                                   # [BN, 16]
            bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1   # [BN, 16, 8]
            scale = tl.load(d_ptr + rn * stride_d + g, mask=nmask, other=0.0)
            w = tl.reshape(bits.to(x.dtype) * 2 - 1, (BLOCK_N, 128)) * scale.to(x.dtype)[:, None]
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _gemv_splitk_kernel(x_ptr, qs_ptr, d_ptr, p_ptr, M, N, K, NB,
                            stride_xm, stride_qs, stride_d,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        # Few tokens (M <= 16): the product is bound by reading the weight, and one program per
        # BLOCK_N output rows would leave most of the GPU idle, so K is split too: program
        # (pid_n, pid_k) covers GROUPS groups of 128 and writes its float32 partial sums to slice
        # pid_k of p [splits, M, N] (summed in a fixed order after: the result is deterministic).
        # A group is 8 dots of K=16: dot s takes bit s of each of the group's 16 bytes, i.e. the
        # weights j = 8*b + s, against x[:, 8*b + s]. The bytes are loaded once as [16, BLOCK_N]
        # (already the dot's B operand: no reshape or transpose of the unpacked bits). Signs
        # enter the dot as exact +-1; the group's fp16 scale multiplies the float32 partial.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b = tl.arange(0, 16)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for gi in range(0, GROUPS):
            g = pid_k * GROUPS + gi
            gvalid = g < NB
            byte = tl.load(qs_ptr + rn[None, :] * stride_qs + g * 16 + b[:, None],
                           mask=nmask[None, :] & gvalid, other=0).to(tl.int32)             # [16, BN]
            scale = tl.load(d_ptr + rn * stride_d + g, mask=nmask & gvalid, other=0.0).to(tl.float32)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sbit in tl.static_range(8):
                cols = g * 128 + b * 8 + sbit
                xs = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                             mask=mmask[:, None] & (cols < K)[None, :], other=0.0)         # [BM, 16]
                w = (((byte >> sbit) & 1) * 2 - 1).to(xs.dtype)                              # [16, BN]
                part += tl.dot(xs, w)
            acc += part * scale[None, :]
        tl.store(p_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


def dequantize_triton(qs: torch.Tensor, d: torch.Tensor, cols: int, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[rows, cols]`` weight in ``dtype``, into ``out`` where given (rows of unit stride)."""
    rows, nb = d.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=qs.device)
    block_n, groups = 16, 4
    _dequant_kernel[(triton.cdiv(rows, block_n), triton.cdiv(nb, groups))](
        qs, d, out, rows, cols, nb, qs.stride(0), d.stride(0), out.stride(0), BLOCK_N=block_n, GROUPS=groups)
    return out


def linear_dequant(x, qs, d, in_features, bias):
    w = dequantize_triton(qs, d, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def linear_overlap(x, qs, d, in_features, bias):
    """Dequantize + cuBLAS in four row slices, each slice's dequantize on a side stream behind the
    previous slice's GEMM (``overlap.py``)."""
    from . import overlap

    return overlap.linear(x, qs, d, in_features, bias,
                          lambda q, s, cols, out: dequantize_triton(q, s, cols, out.dtype, out))


def _m_bucket(m: int) -> int:
    return 1 << max(m - 1, 1).bit_length()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D ``[tokens, features]`` matrix whose rows have unit stride (what the kernels read)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear_fused(x, qs, d, in_features, bias):
    shape = x.shape
    x2 = _rows(x)
    m, n = x2.shape[0], d.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    b = bias.to(x.dtype) if bias is not None else y  # dummy pointer when there is no bias

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _fused_kernel[grid](x2, qs, d, b, y, m, n, in_features, _m_bucket(m),
                        x2.stride(0), qs.stride(0), d.stride(0), y.stride(0), HAS_BIAS=bias is not None)
    return y.reshape(*shape[:-1], n)


GEMV_MAX_M = 16
_PROPS: dict = {}


def device_props(device) -> tuple[tuple[int, int], int]:
    """``(compute capability, multiprocessor count)`` of a CUDA device, read once: the kernels ask in
    every layer's forward. A device without an index is the current one."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    props = _PROPS.get(device)
    if props is None:
        p = torch.cuda.get_device_properties(device)
        props = _PROPS[device] = ((p.major, p.minor), p.multi_processor_count)
    return props


def _split_k(n: int, nb: int, block_n: int, device) -> tuple[int, int]:
    """(splits, groups per split): about four programs per multiprocessor over (N / block_n) x splits."""
    sms = device_props(device)[1] if device.type == "cuda" else 4  # 4: Triton's interpreter, on a CPU
    splits = max(1, min(nb, (4 * sms) // max(1, triton.cdiv(n, block_n))))
    groups = triton.cdiv(nb, splits)
    return triton.cdiv(nb, groups), groups


def linear_gemv(x, qs, d, in_features, bias):
    """``x @ W.T + bias`` for up to ``GEMV_MAX_M`` tokens: split-K over the packed weight on tensor cores."""
    shape = x.shape
    x2 = _rows(x)
    m, n = x2.shape[0], d.shape[0]
    nb = d.shape[1]
    block_n = 64
    splits, groups = _split_k(n, nb, block_n, x.device)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), splits)
    _gemv_splitk_kernel[grid](x2, qs, d, partial, m, n, in_features, nb, x2.stride(0), qs.stride(0), d.stride(0),
                              BLOCK_M=16, BLOCK_N=block_n, GROUPS=groups, num_warps=4)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    from .triton_w1 import reduce_splits  # sums the splits in a fixed order, adds the bias

    reduce_splits(partial, None, bias, y)
    return y.reshape(*shape[:-1], n)


def linear_auto(x, qs, d, in_features, bias):
    """The split-K GEMV for a few tokens, dequantize + cuBLAS for more.

    Measured on an H200 (benchmarks/bench_gemm.py, results/h200/gemm.json), as CUDA graphs (how
    the engine runs steps): at M = 1 the GEMV runs 0.55-1.01x cuBLAS bf16 where dequantize +
    cuBLAS runs 0.41-0.74x; at M = 16 0.35-0.65x against 0.43-0.70x. Eager, its three launches
    cost more than dequantize + cuBLAS's two (0.21-0.48x against 0.25-0.60x).
    """
    if x.numel() // x.shape[-1] <= GEMV_MAX_M:
        return linear_gemv(x, qs, d, in_features, bias)
    return linear_dequant(x, qs, d, in_features, bias)


class TritonKernel:
    """A CUDA kernel of the contract in ``kernels.py``; convs dequantize in one Triton pass, then cuDNN.

    ``BONSAI_ACT=fp8|int8`` (``kernels.act``) sends every linear of a kernel that takes 8-bit
    activations (``w1a8=True``) through the W1A8 kernel instead; with fp8, layers of more than 64
    tokens go to cuBLAS's blockwise fp8 GEMM where this torch and card run it (``fp8_blockwise``).
    Convs stay 16-bit.
    """

    def __init__(self, name: str, linear_fn, w1a8: bool = False):
        self.name = name
        self._linear = linear_fn
        self._w1a8 = w1a8

    def supports(self, x: torch.Tensor, w) -> bool:
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and w.qs.is_cuda

    def linear(self, x, w, bias):
        from . import kernels

        act = kernels.act() if self._w1a8 else "16"
        if act != "16":
            from . import fp8_blockwise, triton_w1

            act = _checked_act(act, x.device)
            if act == "fp8" and fp8_blockwise.takes(x.numel() // w.cols, w.rows, w.cols) and \
                    fp8_blockwise.available(x.device) is None:
                try:
                    return fp8_blockwise.linear(x, w.qs, w.d, w.cols, bias)  # cuBLAS, 1x128 block scales
                except RuntimeError as e:  # a shape the probe did not meet: never again on this device
                    fp8_blockwise.refuse(x.device, f"{list(w.shape)}: {str(e).splitlines()[0][:200]}")
            return triton_w1.linear(x, w.qs, w.d, w.cols, bias, act=act)
        return self._linear(x, w.qs, w.d, w.cols, bias)

    def conv2d(self, x, w, bias, stride, padding, dilation):
        dense = dequantize_triton(w.qs, w.d, w.cols, x.dtype).view(w._shape)
        return torch.nn.functional.conv2d(x, dense, None if bias is None else bias.to(x.dtype),
                                          stride, padding, dilation)


def _checked_act(act: str, device) -> str:
    """``act``, refused where this GPU has no fp8 tensor cores."""
    cap = device_props(device)[0]
    if act == "fp8" and cap < (8, 9):
        from ..errors import BonsaiDeviceError

        major, minor = cap
        raise BonsaiDeviceError(f"BONSAI_ACT=fp8 needs fp8 tensor cores (compute capability 8.9+); "
                                f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use BONSAI_ACT=int8 "
                                "or leave BONSAI_ACT unset for exact 16-bit activations")
    return act


class TritonQ4Kernel:
    """The fused W4A16 kernel (``triton_q4.py``) for Q4_AFFINE weights on CUDA; no convs (they are
    never Q4_AFFINE: the policy keeps 4 bits for linears)."""

    name = "w4"
    qtypes = ("Q4_AFFINE",)
    conv2d = None

    def supports(self, x: torch.Tensor, w) -> bool:
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and w.qs.is_cuda

    def linear(self, x, w, bias):
        from . import triton_q4

        return triton_q4.linear(x, w.qs, w.scale, w.bias, None if bias is None else bias.to(x.dtype))


Q4_AUTO = False  # the fused W4A16 kernel joins the auto choice once measured faster than the reference


def linear_w1(x, qs, d, in_features, bias):
    from . import triton_w1

    return triton_w1.linear(x, qs, d, in_features, bias)


def register() -> None:
    """Register the CUDA kernels with the contract (``kernels.register``).

    ``triton`` takes part in the auto choice: the split-K GEMV for up to ``GEMV_MAX_M`` tokens,
    dequantize + cuBLAS above. ``dequant``, ``gemv`` and ``fused`` (the tiled fused kernel) run only
    when named: on an H200 dequantize + cuBLAS measured 1.40x / 1.16x dense bf16
    over klein-4B's linears at 512^2 / 1024^2, the fused kernel 3.75x / 3.27x
    (benchmarks/bench_kernels.py), so the fused kernel stays opt-in until it is faster.
    """
    from . import kernels

    if not available():
        return
    kernels.register(TritonQ4Kernel(), auto=Q4_AUTO)
    kernels.register(TritonKernel("w1", linear_w1, w1a8=True), auto=False)
    from .cuda_w1 import CudaW1Kernel

    kernels.register(CudaW1Kernel(), auto=False)
    kernels.register(TritonKernel("triton", linear_auto, w1a8=True), auto=True)
    kernels.register(TritonKernel("dequant", linear_dequant), auto=False)
    kernels.register(TritonKernel("overlap", linear_overlap), auto=False)
    kernels.register(TritonKernel("gemv", linear_gemv), auto=False)
    kernels.register(TritonKernel("fused", linear_fused), auto=False)
