"""The GEMM table: every Q1_0 linear path against cuBLAS bf16, eager and CUDA-graphed, one run.

Shapes: the packed linears of klein-4B, SD1.5 and SDXL (SDXL's packed linears have SD1.5's widths
at 640/1280 channels; its 2048-wide context only enters the 16-bit cross-attention). Token counts
M = 1, 16, 256, 1536, 4096, 8192. Paths:
  dense    F.linear with the bf16 weight (cuBLAS), the baseline
  auto     what the engine runs on CUDA (BONSAI_KERNEL=auto: split-K GEMV for M <= 16, else dequant)
  dequant  one Triton dequantize pass into a dense weight, then cuBLAS
  gemv     the split-K GEMV on tensor cores (M <= 16 only)
  fused    the first tiled kernel reading packed bits (klein shapes only: its autotuning is slow)
  fp8blk   fp8_blockwise: activations to e4m3 per (token, 128), signs to e4m3, cuBLAS's (1x128, 1x128) fp8 GEMM;
           fp8blk_gemm that GEMM alone on operands made beforehand (what fusing the two passes away could reach)
  mma      cuda_w1's CUDA C++ W1A16 on tensor cores (mma.sync; split-K with an in-kernel reduction),
           mma_wide the same with each lane taking whole groups (16-byte loads of bits; up to 32 tokens);
           mma_nt4 with four n8 tiles a warp on every layer (each activation fragment feeds four mmas;
           the engine's plan gives narrow layers one), mma_nt4x that with 4x more room for split-K partials
  w1a16    triton_w1's fused W1A16 (split-K below M = 65, tiled above; EXPAND 0), w1a16x1 with EXPAND 1
  fp8      triton_w1's W1A8 with e4m3 activations, activation quantization included; int8 likewise
  fp8_gemm the same kernel on activations quantized beforehand (int8_gemm likewise): like with like
           against the 8-bit ceilings
  scaled_mm torch._scaled_mm e4m3 x e4m3 with per-row / per-column scales (the plain 8-bit
           ceiling: a dense fp8 weight, activations quantized beforehand); int_mm: torch._int_mm
Each is timed eager (CUDA events around R back-to-back calls) and as a CUDA graph of R calls
replayed once, so every ratio compares like with like. Errors are against the float32 reference.

    python3 benchmarks/bench_gemm.py [--ms 1,16,256,1536,4096,8192] [--paths dense,auto,...]
                                     [--families klein-4B,SD1.5/SDXL] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_core.quant import cuda_w1, fp8_blockwise, q1_0, triton_q1, triton_w1  # noqa: E402
from bonsai_core.quant.kernels import REFERENCE  # noqa: E402
from bonsai_core.quant.tensor import Q1Tensor  # noqa: E402

SHAPES = [  # (family, name, out, in)
    ("klein-4B", "attn q/k/v/out", 3072, 3072), ("klein-4B", "ff in", 18432, 3072),
    ("klein-4B", "ff out", 3072, 9216), ("klein-4B", "single qkv+mlp", 27648, 3072),
    ("klein-4B", "single out", 3072, 12288),
    ("SD1.5/SDXL", "attn1 320", 320, 320), ("SD1.5/SDXL", "ff in 320", 2560, 320),
    ("SD1.5/SDXL", "ff out 320", 320, 1280), ("SD1.5/SDXL", "attn1 640", 640, 640),
    ("SD1.5/SDXL", "ff in 640", 5120, 640), ("SD1.5/SDXL", "ff out 640", 640, 2560),
    ("SD1.5/SDXL", "attn1 1280", 1280, 1280), ("SD1.5/SDXL", "ff in 1280", 10240, 1280),
    ("SD1.5/SDXL", "ff out 1280", 1280, 5120),
]


def time_eager(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def time_graph(fn, reps):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):  # captured on the warmed stream, as the engine's GraphedStep does
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def commit() -> str:
    from benchmarks.common import _git_commit

    return _git_commit() or os.environ.get("BENCH_GIT_COMMIT", "unknown")


def save(path, rows) -> None:
    if path:
        Path(path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "commit": commit(), "command": sys.argv, "rows": rows}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,16,256,1536,4096,8192")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 256: a smoke run")
    ap.add_argument("--paths", default="dense,auto,dequant,gemv,fused",
                    help="which paths (dense is always measured: the ratios' baseline)")
    ap.add_argument("--families", default="klein-4B,SD1.5/SDXL")
    args = ap.parse_args()
    if not triton_q1.available():
        print("needs CUDA and Triton")
        return 1
    dtype = torch.bfloat16
    ms = [int(v) for v in args.ms.split(",")]
    want = set(args.paths.split(",")) | {"dense"}
    shapes = [s for s in SHAPES if s[0] in args.families.split(",")]
    shapes = shapes[:1] + shapes[5:6] if args.quick else shapes
    if args.quick:
        ms = [1, 256]
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; command: {' '.join(sys.argv)}")
    rows = []
    for fam, name, n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") * 0.02
        qs, d = q1_0.quantize(w)
        wq = Q1Tensor(qs, d, (n, k))
        wd = wq.dequantize(dtype)  # the dense baseline holds the same values
        del w
        w8 = ws8 = wi = None  # the 8-bit ceilings' dense weights: made once per shape
        if "scaled_mm" in want:
            w8 = wd.float().clamp(-448, 448)
            ws8 = (w8.abs().amax(1).clamp_min(1e-12) / 448.0)
            w8 = (w8 / ws8[:, None]).to(torch.float8_e4m3fn)
        if "int_mm" in want:
            wi = torch.sign(wd).to(torch.int8)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            reps = 50 if m * n * k < 2**33 else 10
            ref = REFERENCE.linear(x.float(), wq, None)
            xq8, xs8 = triton_w1.quantize_rows(x, "fp8") if want & {"fp8_gemm", "scaled_mm"} else (None, None)
            xqi, xsi = triton_w1.quantize_rows(x, "int8") if want & {"int8_gemm", "int_mm"} else (None, None)
            paths = {"dense": lambda: torch.nn.functional.linear(x, wd),
                     "auto": lambda: triton_q1.linear_auto(x, qs, d, k, None),
                     "dequant": lambda: triton_q1.linear_dequant(x, qs, d, k, None),
                     "overlap": lambda: triton_q1.linear_overlap(x, qs, d, k, None),
                     "w1a16": lambda: triton_w1.linear(x, qs, d, k, None, None, 0),
                     "w1a16x1": lambda: triton_w1.linear(x, qs, d, k, None, None, 1),
                     "mma": lambda: cuda_w1.linear(x, qs, d, k, None, wide=False),
                     "mma_wide": lambda: cuda_w1.linear(x, qs, d, k, None, wide=True),
                     "mma_nt4": lambda: cuda_w1.linear(x, qs, d, k, None, wide=False, four=True),
                     "mma_nt4x": lambda: cuda_w1.linear(x, qs, d, k, None, wide=False, four=True, partial_ratio=8),
                     "fp8blk": lambda: fp8_blockwise.linear(x, qs, d, k, None),
                     "fp8": lambda: triton_w1.linear(x, qs, d, k, None, "fp8"),
                     "int8": lambda: triton_w1.linear(x, qs, d, k, None, "int8"),
                     "fp8_gemm": lambda: triton_w1.matmul(xq8, xs8, qs, d, k, None, dtype),
                     "int8_gemm": lambda: triton_w1.matmul(xqi, xsi, qs, d, k, None, dtype)}
            if "scaled_mm" in want:
                paths["scaled_mm"] = lambda: torch._scaled_mm(xq8, w8.t(), scale_a=xs8[:, None], scale_b=ws8[None, :],
                                                              out_dtype=dtype)
            if "fp8blk_gemm" in want and fp8_blockwise.available(x.device) is None:
                a_major, b_major = fp8_blockwise._STATE[x.device][0]
                pa, psa = fp8_blockwise.quantize_blocks(x, m_major=a_major, rows=-(-m // 16) * 16)
                psg, psb = fp8_blockwise._signs(qs, d, k), fp8_blockwise._weight_scales(d, b_major)
                paths["fp8blk_gemm"] = lambda: fp8_blockwise._gemm(pa, psa, psg, psb, dtype)
            if "int_mm" in want and m > 16:
                paths["int_mm"] = lambda: torch._int_mm(xqi, wi.t())
            if m <= triton_q1.GEMV_MAX_M:
                paths["gemv"] = lambda: triton_q1.linear_gemv(x, qs, d, k, None)
            if fam == "klein-4B":
                paths["fused"] = lambda: triton_q1.linear_fused(x, qs, d, k, None)
            paths = {p: fn for p, fn in paths.items() if p in want}
            row = {"family": fam, "layer": name, "n": n, "k": k, "m": m}
            for p, fn in paths.items():
                try:
                    got = fn().float()
                except Exception as exc:  # one path failing to build must not cost the rest of the table
                    row[f"{p}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"  {p}: {row[f'{p}_error']}")
                    continue
                if p == "int_mm":
                    got = got * xsi[:, None] * d.float().mean(1)[None, :]  # timing only: no per-group scales
                row[f"{p}_err"] = float((got - ref).abs().max() / ref.abs().max())
                row[f"{p}_eager_ms"] = time_eager(fn, reps)
                row[f"{p}_graph_ms"] = time_graph(fn, reps)
            rows.append(row)
            save(args.json, rows)  # after every row: a run stopped at its time limit keeps what it measured
            ratios = "  ".join(f"{p} x{row['dense_eager_ms'] / row[f'{p}_eager_ms']:.2f}/x{row['dense_graph_ms'] / row[f'{p}_graph_ms']:.2f}"
                               for p in paths if p != "dense" and f"{p}_eager_ms" in row)
            print(f"{fam:<10} {name:<15} [{n}x{k}] M={m:<5} dense {row['dense_eager_ms'] * 1e3:8.1f}/"
                  f"{row['dense_graph_ms'] * 1e3:8.1f} us  speed vs dense (eager/graph): {ratios}  "
                  + "  err " + " ".join(f"{p} {row[p + '_err']:.1e}" for p in paths if p + "_err" in row))
            x = ref = None
        wd = qs = d = wq = w8 = ws8 = wi = None
        torch.cuda.empty_cache()
    save(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
