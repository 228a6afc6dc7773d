"""The fused kernels run by Triton's interpreter on a CPU: error against the float32 reference.

No GPU needed: ``TRITON_INTERPRET=1`` executes the kernels with NumPy. Needs a Triton wheel beside
the CPU torch (``pip install triton``; the project's own install does not need one). Covers W1A16
(split and tiled launches, both byte expansions) and int8 W1A8 in fp16, and W4A16 with F16 / BF16 /
F32 scales, and fp8_blockwise's block quantizer (float32 codes). bf16 and fp8 cannot be checked here (the interpreter's bf16 bitcasts and e4m3 casts are
wrong or missing): the CUDA tests in tests/test_triton_w1.py cover them.

    TRITON_INTERPRET=1 python benchmarks/interpreter_check.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


class _Fixed:
    """A tiled launch with one fixed config (the autotuner needs a GPU to time its configs)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            meta = dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2)
            return self.kernel[grid(meta)](*args, **kwargs, **meta)
        return run


def rel(got, ref) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1")
        return 1
    from bonsai_core.quant import q1_0, q4_affine, triton_q4, triton_w1

    triton_w1._w1_large = _Fixed(triton_w1._w1_kernel)
    triton_q4._w4_large = _Fixed(triton_q4._w4_kernel)
    torch.manual_seed(0)
    for m, n, k in [(3, 64, 256), (20, 70, 320), (70, 130, 320), (200, 64, 256)]:
        qs, d = q1_0.quantize(torch.randn(n, k))
        x, b = torch.randn(m, k).half(), torch.randn(n).half()
        ref = x.float() @ q1_0.dequantize(qs, d, k, torch.float16).float().T + b.float()
        for expand in (0, 1):
            print(f"W1A16 fp16 M={m} N={n} K={k} expand {expand}: {rel(triton_w1.linear(x, qs, d, k, b, None, expand), ref):.2e}")
        print(f"W1A8 int8  M={m} N={n} K={k}: {rel(triton_w1.linear(x, qs, d, k, b, 'int8'), ref):.2e}")
    for m, n, k, sdt in [(3, 64, 256, torch.float16), (20, 70, 128, torch.bfloat16), (70, 130, 320, torch.float32)]:
        qs, s, c = q4_affine.quantize(torch.randn(n, k), 64, sdt)
        x, b = torch.randn(m, k).half(), torch.randn(n).half()
        ref = x.float() @ q4_affine.dequantize(qs, s, c, torch.float16).float().T + b.float()
        print(f"W4A16 fp16 M={m} N={n} K={k} scales {sdt}: {rel(triton_q4.linear(x, qs, s, c, b), ref):.2e}")
    # the block quantizer of fp8_blockwise, with a float32 output (the interpreter has no e4m3):
    # scales must equal the reference's exactly, codes before the e4m3 rounding to float32 rounding
    from bonsai_core.quant import fp8_blockwise

    for m, k, rows in [(5, 256, 5), (33, 1000, 33), (65, 384, 80)]:  # rows > m: zero padding, scale 1
        x = torch.randn(m, k).half() * 3
        x[1] = 0
        q = torch.empty(rows, k)
        s = torch.empty(rows, -(-k // 128))
        fp8_blockwise._quant_blocks_kernel[(-(-rows // 16), s.shape[1])](
            x, q, s, m, rows, k, s.shape[1], x.stride(0), q.stride(0), s.stride(0), s.stride(1),
            QMAX=fp8_blockwise.FP8_MAX, BLOCK_M=16, BLOCK_K=128)
        padded = torch.cat([x, x.new_zeros(rows - m, k)])
        _, rs = fp8_blockwise.reference_quantize(padded, torch.float32)
        rq = padded.float() / rs.repeat_interleave(128, dim=1)[:, :k]
        print(f"fp8 block quantizer M={m} rows={rows} K={k}: scales {'equal' if torch.equal(s, rs) else 'DIFFER'}, "
              f"codes {rel(q, rq):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
