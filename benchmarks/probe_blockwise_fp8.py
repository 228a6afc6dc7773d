"""Can cuBLAS's fp8 GEMM with 128-wide block scales run a Q1_0 layer exactly? (issue 20, W1A8)

A Q1_0 weight is +-1 times one scale per (output row, 128 inputs): the weight side of the
(BlockWise1x128, BlockWise1x128) recipe of ``torch._scaled_mm``, with signs that e4m3 holds exactly.
The activations get one scale per (token, 128 inputs), as DeepGEMM's fp8 recipe does. This probe
times, per klein-4B layer shape and token count, against cuBLAS bf16 in the same run (eager, median
of ``triton.testing.do_bench``):

* ``gemm``: the blockwise fp8 GEMM alone (signs already expanded to e4m3, activations quantized);
* ``expand``: writing the e4m3 signs from the packed bits (``triton_q1.dequantize_triton`` with unit
  scales), what a per-layer expansion into a reused buffer would add;
* ``quant``: quantizing the activations per (token, 128 inputs) with plain torch ops (a fused kernel
  would be faster);

and the error of the fp8 product against the float64 product with the exact weight.

    python3 benchmarks/probe_blockwise_fp8.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info  # noqa: E402
from bonsai_core.quant import q1_0, triton_q1  # noqa: E402

SHAPES = [("attn q/k/v/out", 3072, 3072), ("ff in", 18432, 3072), ("ff out", 3072, 9216),
          ("single qkv+mlp", 27648, 3072), ("single out", 3072, 12288)]


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    g = x.float().reshape(m, k // 128, 128)
    s = g.abs().amax(-1).clamp_min(1e-12) / 448.0
    q = (g / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(m, k)
    return q, s.t().contiguous().t()  # token-major: torch 2.11 asks for scale_a strides (1, M)


def blockwise_mm(a, sa, b, sb, out_dtype):
    f = getattr(torch.nn.functional, "scaled_mm", None)
    if f is not None:
        from torch.nn.functional import ScalingType

        return f(a, b, sa, ScalingType.BlockWise1x128, sb, ScalingType.BlockWise1x128, output_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def main() -> int:
    import triton

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="256,1536,4096")
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    print(f"# {torch.cuda.get_device_name(dev)} torch {torch.__version__}")
    for name, n, k in SHAPES:
        torch.manual_seed(0)
        qs, d = q1_0.quantize(torch.randn(n, k, device=dev) * 0.02)
        wd = q1_0.dequantize(qs, d, k, torch.bfloat16)
        signs = triton_q1.dequantize_triton(qs, torch.ones_like(d), k, torch.float8_e4m3fn)
        sb = d.float().t().contiguous()  # [K/128, N]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"layer": name, "n": n, "k": k, "m": m}
            ref = x.double() @ q1_0.dequantize(qs, d, k, torch.float32).double().T
            try:
                a, sa = quantize_blocks(x)
                y = blockwise_mm(a, sa, signs.t(), sb, torch.bfloat16)
                row["err"] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                row["gemm_ms"] = triton.testing.do_bench(lambda: blockwise_mm(a, sa, signs.t(), sb, torch.bfloat16),
                                                         return_mode="median")
            except Exception as e:  # noqa: BLE001 - a probe reports what the library refuses
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["dense_ms"] = triton.testing.do_bench(lambda: x @ wd.T, return_mode="median")
            row["dense_err"] = (((x @ wd.T).double() - ref).abs().max() / ref.abs().max()).item()
            row["expand_ms"] = triton.testing.do_bench(
                lambda: triton_q1.dequantize_triton(qs, torch.ones_like(d), k, torch.float8_e4m3fn),
                return_mode="median")
            row["quant_ms"] = triton.testing.do_bench(lambda: quantize_blocks(x), return_mode="median")
            rows.append(row)
            if "error" in row:
                print(f"{name:15s} M={m:5d} dense {row['dense_ms'] * 1e3:7.1f} us  blockwise fp8: {row['error']}")
            else:
                print(f"{name:15s} M={m:5d} dense {row['dense_ms'] * 1e3:7.1f} us  fp8 gemm {row['gemm_ms'] * 1e3:7.1f} us "
                      f"(x{row['dense_ms'] / row['gemm_ms']:.2f})  +expand {row['expand_ms'] * 1e3:6.1f} us "
                      f"+quant {row['quant_ms'] * 1e3:6.1f} us  err {row['err']:.1e} (dense {row['dense_err']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(dev), "command": " ".join(sys.argv),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
