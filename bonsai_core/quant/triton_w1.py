"""Fused Q1_0 matmuls in Triton: W1A16 (exact) and W1A8 (8-bit activations, opt-in).

Both read the packed weight as it is stored (``qs`` uint8 ``[N, K/8]``, ``d`` fp16 ``[N, K/128]``,
GGUF's bit order: weight j of a group is bit ``j & 7`` of byte ``j >> 3``); no dense weight is ever
written to memory. One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T``, walking K
one 128-weight group at a time; each group's ``[BLOCK_N, 128]`` weight tile is built in registers
from its bytes with integer operations only (no int-to-float conversions, no multiplies):

* W1A16: ``w = d`` with its sign bit replaced. ``d`` is cast to the input's dtype once per group
  and row (bf16 or fp16: the sign is bit 15 in both), and bit ``j`` of the row's byte moved to bit
  15 selects +d or -d: ``bits(w) = bits(-d) ^ ((byte << (15 - (j & 7))) & 0x8000)``. The products
  are those of the reference (dequantize into the input's dtype, then the dense matmul), summed in
  float32 in another order.
* W1A8: +-1 is exact in fp8 e4m3 (``0x38`` / ``0xB8``: the same sign-bit trick, on bit 7) and in
  int8, so the sign matrix goes to the 8-bit tensor cores as it is. The activations are quantized
  per token (``x = s_t * q``, ``s_t = max|x_t| / 448`` for e4m3, ``/ 127`` for int8), and each
  group's partial product is promoted into the float32 accumulator times that group's ``d`` (the
  fine-grained promotion DeepGEMM uses); ``s_t`` multiplies the finished row. The only error is the
  activations' 8-bit rounding.

Few tokens (``M <= SPLIT_MAX_M``): the product is bound by reading and expanding the weight, and the
``N / BLOCK_N`` programs alone would leave most of the GPU idle, so K is split too; each split
writes float32 partials that one more kernel sums in a fixed order (deterministic) and adds the bias.

Two ways to expand the bytes are kept, ``EXPAND=0`` (each element loads its byte: the loads are
L1 hits, no layout change) and ``EXPAND=1`` (load the ``[BLOCK_N, 16]`` bytes once, broadcast
and reshape to ``[BLOCK_N, 128]``); the benchmark (benchmarks/bench_gemm.py) measures both and
``EXPAND`` below holds the faster one measured. Both are far slower than cuBLAS on every klein-4B
shape (BENCHMARKS.md): these kernels are correct and opt-in, not yet fast.
"""

from __future__ import annotations

import torch

from .triton_q1 import _m_bucket, _rows, _split_k, tl, triton  # one Triton import for the pack

SPLIT_MAX_M = 64
# EXPAND 1 measured faster on an H100 (benchmarks/results/h100/w1_kernels/expand_quick.log, klein
# attn 3072x3072: 0.58x / 0.30x cuBLAS graphed at M = 1 / 256, against 0.15x / 0.05x for EXPAND 0)
EXPAND = 1
ACTS = {"fp8": 1, "int8": 2}
FP8_MAX = 448.0
INT8_MAX = 127.0


def _configs_large():
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


if triton is not None:

    @triton.jit
    def _byte_tile(qs_ptr, rn, nmask, g, stride_qs, j, EXPAND_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
        """int32 ``[BLOCK_N, 128]``: for weight j of group g of each row, the byte holding its bit."""
        if EXPAND_MODE == 0:
            byte = tl.load(qs_ptr + rn[:, None] * stride_qs + g * 16 + (j >> 3)[None, :],
                           mask=nmask[:, None], other=0)
            return byte.to(tl.int32)
        else:
            b = tl.arange(0, 16)
            byte = tl.load(qs_ptr + rn[:, None] * stride_qs + g * 16 + b[None, :],
                           mask=nmask[:, None], other=0).to(tl.int32)
            return tl.reshape(tl.broadcast_to(byte[:, :, None], (BLOCK_N, 16, 8)), (BLOCK_N, 128))

    @triton.jit
    def _tile(M, N, NG, GROUPS_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's rows and columns of y (tiles taken GROUP_M row-blocks at a time, so
        neighbours share weight tiles in L2) and its range of K groups ``[g0, g1)`` (split ``program_id(1)``)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        first_m = (pid // (GROUP_M * num_n)) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        g0 = tl.program_id(1) * GROUPS_PER_SPLIT
        return (pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
                g0, tl.minimum(g0 + GROUPS_PER_SPLIT, NG))

    @triton.jit
    def _store(acc, y_ptr, xs_ptr, b_ptr, rm, rn, M, N, stride_ym, stride_ys,
               ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """A split writes its float32 partial to slice ``program_id(1)``; otherwise row scale, bias, cast."""
        out = rm[:, None] * stride_ym + rn[None, :]
        omask = (rm < M)[:, None] & (rn < N)[None, :]
        if SPLIT:
            tl.store(y_ptr + tl.program_id(1) * stride_ys + out, acc, mask=omask)
        else:
            if ROW_SCALE:
                acc *= tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _w1_kernel(x_ptr, xs_ptr, qs_ptr, d_ptr, b_ptr, y_ptr,
                   M, N, K, NB, GROUPS_PER_SPLIT, M_BUCKET,
                   stride_xm, stride_qs, stride_d, stride_ym, stride_ys,
                   ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EXPAND_MODE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # ACT 0: x in bf16/fp16 (W1A16). ACT 1: x in fp8 e4m3, ACT 2: x in int8, each with a
        # float32 scale per row in xs. SPLIT: write float32 partials to slice pid_k of y (no bias,
        # no row scale: the reduce kernel applies them).
        rm, rn, g0, g1 = _tile(M, N, NB, GROUPS_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
        j = tl.arange(0, 128)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(g0, g1):
            cols = g * 128 + j
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                        mask=mmask[:, None] & (cols < K)[None, :], other=0.0)  # int 0 cannot cast to fp8
            byte = _byte_tile(qs_ptr, rn, nmask, g, stride_qs, j, EXPAND_MODE, BLOCK_N)
            scale = tl.load(d_ptr + rn * stride_d + g, mask=nmask, other=0.0)
            if ACT == 0:
                neg = (-scale.to(tl.float32).to(x.dtype)).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                wbits = neg[:, None] ^ ((byte << (15 - (j & 7))[None, :]) & 0x8000)
                w = wbits.to(tl.int16).to(x.dtype, bitcast=True)
                acc = tl.dot(x, tl.trans(w), acc)
            elif ACT == 1:
                wbits = 0xB8 ^ ((byte << (7 - (j & 7))[None, :]) & 0x80)
                w = wbits.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
                acc += tl.dot(x, tl.trans(w)) * scale.to(tl.float32)[None, :]
            else:
                w = (((byte >> (j & 7)[None, :]) & 1) * 2 - 1).to(tl.int8)
                acc += tl.dot(x, tl.trans(w)).to(tl.float32) * scale.to(tl.float32)[None, :]
        _store(acc, y_ptr, xs_ptr, b_ptr, rm, rn, M, N, stride_ym, stride_ys, ACT != 0, HAS_BIAS, SPLIT)

    _w1_large = triton.autotune(configs=_configs_large(), key=["M_BUCKET", "N", "K", "ACT", "EXPAND_MODE"])(_w1_kernel)

    @triton.jit
    def _reduce_kernel(p_ptr, xs_ptr, b_ptr, y_ptr, MN, N, SPLITS,
                       ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
        if ROW_SCALE:
            acc *= tl.load(xs_ptr + offs // N, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                           QMAX: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
        # one program per token: s = max|x| / QMAX (a zero row gets s = 1), q = round(x / s)
        row = tl.program_id(0)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            c = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + c, mask=c < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        s = tl.where(m > 0, m / QMAX, 1.0)
        for k0 in range(0, K, BLOCK):
            c = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + c, mask=c < K, other=0.0).to(tl.float32) / s
            if ACT == 1:
                q = tl.minimum(tl.maximum(x, -QMAX), QMAX).to(tl.float8e4nv)
            else:
                r = tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))  # half away from zero
                q = tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8)
            tl.store(q_ptr + row * stride_qm + c, q, mask=c < K)
        tl.store(s_ptr + row, s)


def quantize_rows(x2: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 8-bit activations: ``(q [M, K] fp8 e4m3 or int8, s [M] float32)``, ``x ~= s * q``."""
    m, k = x2.shape
    code = ACTS[act]
    q = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if code == 1 else torch.int8)
    s = torch.empty(m, device=x2.device, dtype=torch.float32)
    _quant_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0),
                             QMAX=FP8_MAX if code == 1 else INT8_MAX, ACT=code, BLOCK=1024, num_warps=4)
    return q, s


def split_plan(m: int, n: int, groups: int, device):
    """Launch plan of a split-K product: ``(grid, float32 partials [splits, m, n], groups per split,
    block sizes and launch options)``."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    splits, per = _split_k(n, groups, block_n, device)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), splits)
    return grid, part, per, dict(BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=1, num_warps=4, num_stages=3)


def reduce_splits(part: torch.Tensor, row_scale, bias, y: torch.Tensor) -> None:
    """``y = sum over splits of part`` (in order), times ``row_scale`` per row, plus ``bias``: one kernel."""
    splits, m, n = part.shape
    _reduce_kernel[(triton.cdiv(m * n, 1024),)](part, part if row_scale is None else row_scale,
                                                y if bias is None else bias, y, m * n, n, splits,
                                                ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
                                                BLOCK=1024)


def linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int, bias, act: str | None = None,
           expand: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` from the packed weight: W1A16 when ``act`` is None, else W1A8 (``fp8``/``int8``)."""
    shape = x.shape
    x2 = _rows(x)
    if act is None:
        y = matmul(x2, None, qs, d, in_features, bias, x.dtype, expand)
    else:
        xq, xs = quantize_rows(x2, act)
        y = matmul(xq, xs, qs, d, in_features, bias, x.dtype, expand)
    return y.reshape(*shape[:-1], d.shape[0])


def matmul(xin: torch.Tensor, xs: torch.Tensor | None, qs: torch.Tensor, d: torch.Tensor, in_features: int, bias,
           out_dtype: torch.dtype, expand: int | None = None) -> torch.Tensor:
    """The kernels on a 2-D input: 16-bit ``xin`` (``xs`` None) or 8-bit ``xin`` with its row scales ``xs``."""
    m, n, nb = xin.shape[0], d.shape[0], d.shape[1]
    expand = EXPAND if expand is None else expand
    code = 0 if xs is None else (1 if xin.dtype == torch.float8_e4m3fn else 2)
    xs_arg = xs if xs is not None else d  # a dummy pointer when there are no row scales (never read)
    y = torch.empty(m, n, dtype=out_dtype, device=xin.device)
    bias_arg = bias if bias is not None else y
    if m <= SPLIT_MAX_M:
        grid, part, per, meta = split_plan(m, n, nb, xin.device)
        _w1_kernel[grid](xin, xs_arg, qs, d, bias_arg, part, m, n, in_features, nb, per, 0,
                         xin.stride(0), qs.stride(0), d.stride(0), n, m * n,
                         ACT=code, HAS_BIAS=False, SPLIT=True, EXPAND_MODE=expand, **meta)
        reduce_splits(part, xs if code else None, bias, y)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)

        _w1_large[grid](xin, xs_arg, qs, d, bias_arg, y, m, n, in_features, nb, nb, _m_bucket(m),
                        xin.stride(0), qs.stride(0), d.stride(0), y.stride(0), 0,
                        ACT=code, HAS_BIAS=bias is not None, SPLIT=False, EXPAND_MODE=expand)
    return y
