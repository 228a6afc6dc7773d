"""W1A8 through cuBLAS: a Q1_0 layer as one fp8 GEMM with 128-wide block scales (``BONSAI_ACT=fp8``).

A Q1_0 weight is +-1 times one scale per (output row, 128 inputs). That is exactly the weight side
of the (BlockWise1x128, BlockWise1x128) recipe of ``torch._scaled_mm`` (cuBLASLt's 1x128 block
scaling, Hopper and newer): the signs are exact in e4m3, ``d`` is the weight's block scale. The
activations are quantized with one scale per (token, 128 inputs), as DeepGEMM's fp8 recipe does,
finer than a per-token scale. Per call: the activations are quantized (one Triton pass), the signs
are expanded to e4m3 (one Triton pass, 1 byte a weight, a temporary), and cuBLAS does the rest.

Whether this torch and this card run the recipe is found out once per device with a small product
checked against its float64 value (``available``); where they don't, ``BONSAI_ACT=fp8`` keeps the
fused Triton W1A8 kernel (``triton_w1``). The CPU has no blockwise fp8 GEMM: ``reference`` is the
same arithmetic in float64, the truth the CUDA tests compare with.
"""

from __future__ import annotations

import logging
import threading

import torch

from . import q1_0

log = logging.getLogger("bonsai")

FP8_MAX = 448.0
BLOCK = 128
ROW_ALIGN = 16  # tokens are padded to a multiple of this for cuBLAS
MIN_CAPABILITY = (8, 9)
_LOCK = threading.Lock()
_STATE: dict = {}  # device -> (scale layouts, None) or (None, why not)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU path never needs Triton here
    triton = None


if triton is not None:

    @triton.jit
    def _quant_blocks_kernel(x_ptr, q_ptr, s_ptr, M, R, K, G, stride_xm, stride_qm, stride_sm, stride_sg,
                             QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program: BLOCK_M tokens x one block of BLOCK_K inputs; s = max|x| / QMAX (0 -> 1);
        # rows M..R-1 (padding) are written as zeros with scale 1
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        g = tl.program_id(1)
        c = g * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rm < M)[:, None] & (c < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.where(amax > 0, amax / QMAX, 1.0)
        q = tl.minimum(tl.maximum(x / s[:, None], -QMAX), QMAX)
        tl.store(q_ptr + rm[:, None] * stride_qm + c[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=(rm < R)[:, None] & (c < K)[None, :])
        tl.store(s_ptr + rm * stride_sm + g * stride_sg, s, mask=rm < R)


def quantize_blocks(x2: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn,
                    m_major: bool = False, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [R, K] e4m3, s [R, ceil(K/128)] float32)`` with ``x ~= s * q`` per (token, 128 inputs),
    ``R = rows`` (default M; rows past M are zeros with scale 1: padding); on CUDA one Triton pass
    (``m_major``: ``s`` stored with tokens contiguous, as some cuBLAS builds ask), elsewhere
    ``reference_quantize``."""
    m, k = x2.shape
    rows = m if rows is None else rows
    if rows < m:
        raise ValueError(f"rows {rows} < tokens {m}")
    if not x2.is_cuda or triton is None:
        if rows > m:
            x2 = torch.cat([x2, x2.new_zeros(rows - m, k)])
        return reference_quantize(x2, out_dtype)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    groups = -(-k // BLOCK)
    q = torch.empty(rows, k, dtype=out_dtype, device=x2.device)
    s = torch.empty(groups, rows, dtype=torch.float32, device=x2.device).t() if m_major else \
        torch.empty(rows, groups, dtype=torch.float32, device=x2.device)
    block_m = 16
    _quant_blocks_kernel[(triton.cdiv(rows, block_m), groups)](
        x2, q, s, m, rows, k, groups, x2.stride(0), q.stride(0), s.stride(0), s.stride(1),
        QMAX=FP8_MAX, BLOCK_M=block_m, BLOCK_K=BLOCK, num_warps=4)
    return q, s


def reference_quantize(x2: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn):
    """The same quantization in plain torch (the truth for the Triton pass, and the CPU path)."""
    m, k = x2.shape
    groups = -(-k // BLOCK)
    xf = torch.nn.functional.pad(x2.float(), (0, groups * BLOCK - k)).reshape(m, groups, BLOCK)
    amax = xf.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(m, groups * BLOCK)[:, :k].to(out_dtype)
    return q, s


def reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int, bias=None) -> torch.Tensor:
    """What the fp8 path computes, in float64: e4m3 activations with their block scales times the
    exact +-d weight (the only rounding is the activations')."""
    x2 = x.reshape(-1, in_features)
    q, s = reference_quantize(x2)
    xs = (q.double().reshape(-1, in_features) *
          s.double().repeat_interleave(BLOCK, dim=1)[:, :in_features])
    w = q1_0.dequantize(qs, d, in_features, torch.float32).double()
    y = xs @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], d.shape[0])


def _signs(qs: torch.Tensor, d: torch.Tensor, in_features: int) -> torch.Tensor:
    """The weight's signs as e4m3 +-1, [N, K] (one Triton pass over the bits)."""
    from .triton_q1 import dequantize_triton

    return dequantize_triton(qs, _ones(d), in_features, torch.float8_e4m3fn)


_ONES: dict = {}


def _ones(d: torch.Tensor) -> torch.Tensor:
    key = (tuple(d.shape), d.device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(d.shape, dtype=torch.float16, device=d.device)
    return ones


def _weight_scales(d: torch.Tensor, n_major: bool) -> torch.Tensor:
    """``d`` as cuBLAS's weight block scales, [ceil(K/128), N] float32."""
    return d.t().float().contiguous() if n_major else d.float().contiguous().t()


def _gemm(a, sa, signs, sb, out_dtype):
    return torch._scaled_mm(a, signs.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def available(device: torch.device) -> str | None:
    """None when the blockwise fp8 GEMM runs right on ``device``, else why not (found out once: a
    small product against its float64 value, each scale layout cuBLAS may ask for tried)."""
    with _LOCK:
        state = _STATE.get(device)
        if state is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return "not probed yet (a CUDA-graph capture is running)"  # the probe syncs: not now
            state = _STATE[device] = _probe(device)
        return state[1]


def _probe(device: torch.device) -> tuple:
    if device.type != "cuda" or triton is None:
        return None, "the blockwise fp8 GEMM needs CUDA and Triton"
    from .triton_q1 import device_props

    cap = device_props(device)[0]
    if cap < MIN_CAPABILITY:
        return None, f"compute capability {cap[0]}.{cap[1]} has no fp8 tensor cores (8.9+)"
    g = torch.Generator(device="cpu").manual_seed(0)
    qs, d = q1_0.quantize(torch.randn(256, 512, generator=g) * 0.02)
    qs, d = qs.to(device), d.to(device)
    x = torch.randn(64, 512, generator=g).to(device, torch.bfloat16)
    want = reference(x, qs, d, 512)
    errors = []
    for a_major, b_major in ((False, True), (True, True), (False, False), (True, False)):
        try:
            a, sa = quantize_blocks(x, m_major=a_major)
            y = _gemm(a, sa, _signs(qs, d, 512), _weight_scales(d, b_major), torch.bfloat16)
            err = ((y.double() - want).abs().max() / want.abs().max()).item()
            if err < 1e-2:  # the product of exact operands, rounded once to bf16
                return (a_major, b_major), None
            errors.append(f"layouts {a_major}/{b_major}: error {err:.2e}")
        except (RuntimeError, ValueError, TypeError) as e:
            errors.append(f"layouts {a_major}/{b_major}: {str(e).splitlines()[0][:160]}")
    why = f"torch {torch.__version__} does not run the (1x128, 1x128) fp8 recipe here: " + "; ".join(errors)
    log.info("bonsai: %s", why)
    return None, why


def linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int, bias) -> torch.Tensor:
    """``x @ W.T + bias`` with e4m3 activations (block scales) and the Q1_0 weight's exact signs."""
    why = available(x.device)
    if why is not None:
        raise RuntimeError(why)
    a_major, b_major = _STATE[x.device][0]
    shape = x.shape
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    # tokens padded to a multiple of 16 with zeros: a 65-token call failed on an H100 where 64 and
    # 1536 ran (the test's message was cut off); token-major scales of an odd count are the suspect
    a, sa = quantize_blocks(x2, m_major=a_major, rows=-(-m // ROW_ALIGN) * ROW_ALIGN)
    y = _gemm(a, sa, _signs(qs, d, in_features), _weight_scales(d, b_major), x.dtype)[:m]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], d.shape[0])


def takes(m: int, n: int, k: int) -> bool:
    """The shapes sent here: whole 128-input blocks (a partial last block is what some torch builds
    refuse, and the probe checks none), outputs a multiple of 16, and enough tokens to pay for the
    passes."""
    return m > 64 and n % 16 == 0 and k % BLOCK == 0


def refuse(device: torch.device, why: str) -> None:
    """Mark the blockwise GEMM unavailable on ``device`` from now on (a layer's call failed)."""
    with _LOCK:
        _STATE[device] = (None, why)
    log.warning("bonsai: the blockwise fp8 GEMM failed (%s); fp8 layers use the Triton W1A8 kernel from now on", why)
