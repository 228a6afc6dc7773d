"""Fused W4A16 matmul for Q4_AFFINE weights (the 4-bit text encoders) in Triton, CUDA only.

Reads the codes, scales and biases as stored (``qs`` uint8 ``[N, K/2]``, even column in the low
nibble; ``scale``/``bias`` ``[N, K/g]`` in F16, BF16 or F32); the dense weight never exists in
memory. One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T``, one group of ``g``
columns at a time: each weight is ``scale * q + bias`` in float32, rounded once to the input's dtype
(the reference's rounding: q4_affine.dequantize, then the dense matmul), then fed to the tensor cores.

Prompt encoding is the small-M case (M = prompt tokens, a few to 512): up to ``SPLIT_MAX_M`` tokens,
K is split as in ``triton_w1`` (float32 partials summed in a fixed order by a second kernel).
"""

from __future__ import annotations

import torch

from .triton_q1 import _m_bucket, _rows, tl, triton
from .triton_w1 import SPLIT_MAX_M, _configs_large, reduce_splits, split_plan

if triton is not None:
    from .triton_w1 import _store, _tile

    @triton.jit
    def _w4_kernel(x_ptr, qs_ptr, s_ptr, c_ptr, b_ptr, y_ptr, M, N, K, NG, GROUPS_PER_SPLIT, M_BUCKET,
                   stride_xm, stride_qs, stride_s, stride_c, stride_ym, stride_ys,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # s: scales, c: the per-group biases (offsets), b: the layer's bias
        rm, rn, g0, g1 = _tile(M, N, NG, GROUPS_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
        j = tl.arange(0, GROUP)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(g0, g1):
            cols = g * GROUP + j
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                        mask=mmask[:, None] & (cols < K)[None, :], other=0.0)
            byte = tl.load(qs_ptr + rn[:, None] * stride_qs + (cols >> 1)[None, :],
                           mask=nmask[:, None], other=0).to(tl.int32)
            q = ((byte >> ((cols & 1) * 4)[None, :]) & 15).to(tl.float32)
            sc = tl.load(s_ptr + rn * stride_s + g, mask=nmask, other=0.0).to(tl.float32)
            off = tl.load(c_ptr + rn * stride_c + g, mask=nmask, other=0.0).to(tl.float32)
            w = (q * sc[:, None] + off[:, None]).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        _store(acc, y_ptr, y_ptr, b_ptr, rm, rn, M, N, stride_ym, stride_ys, False, HAS_BIAS, SPLIT)

    _w4_large = triton.autotune(configs=_configs_large(), key=["M_BUCKET", "N", "K", "GROUP"])(_w4_kernel)


def linear(x: torch.Tensor, qs: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias) -> torch.Tensor:
    """``x @ W.T + bias`` for a Q4_AFFINE weight (codes ``qs``, per-group ``scale`` and ``offset``)."""
    shape = x.shape
    x2 = _rows(x)
    m, n, ng = x2.shape[0], scale.shape[0], scale.shape[1]
    k = qs.shape[1] * 2
    group = k // ng
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else y
    if m <= SPLIT_MAX_M:
        grid, part, per, meta = split_plan(m, n, ng, x.device)
        _w4_kernel[grid](x2, qs, scale, offset, bias_arg, part, m, n, k, ng, per, 0,
                         x2.stride(0), qs.stride(0), scale.stride(0), offset.stride(0), n, m * n,
                         HAS_BIAS=False, SPLIT=True, GROUP=group, **meta)
        reduce_splits(part, None, bias, y)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)

        _w4_large[grid](x2, qs, scale, offset, bias_arg, y, m, n, k, ng, ng, _m_bucket(m),
                        x2.stride(0), qs.stride(0), scale.stride(0), offset.stride(0), y.stride(0), 0,
                        HAS_BIAS=bias is not None, SPLIT=False, GROUP=group)
    return y.reshape(*shape[:-1], n)
