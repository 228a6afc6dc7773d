"""The GEMM table: every Q1_0 linear path against cuBLAS bf16, eager and CUDA-graphed, one run.

Shapes: the packed linears of klein-4B, SD1.5 and SDXL (SDXL's packed linears have SD1.5's widths
at 640/1280 channels; its 2048-wide context only enters the 16-bit cross-attention). Token counts
M = 1, 16, 256, 1536, 4096, 8192. Paths:
  dense    F.linear with the bf16 weight (cuBLAS), the baseline
  auto     what the engine runs on CUDA (BONSAI_KERNEL=auto: split-K GEMV for M <= 16, else dequant)
  dequant  one Triton dequantize pass into a dense weight, then cuBLAS
  gemv     the split-K GEMV on tensor cores (M <= 16 only)
  fused    the tiled kernel reading packed bits (klein shapes only: its autotuning is slow)
Each is timed eager (CUDA events around R back-to-back calls) and as a CUDA graph of R calls
replayed once, so every ratio compares like with like. Errors are against the float32 reference.

    python3 benchmarks/bench_gemm.py [--ms 1,16,256,1536,4096,8192] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_core.quant import q1_0, triton_q1  # noqa: E402
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
    with torch.cuda.graph(g):
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,16,256,1536,4096,8192")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 256: a smoke run")
    args = ap.parse_args()
    if not triton_q1.available():
        print("needs CUDA and Triton")
        return 1
    dtype = torch.bfloat16
    ms = [int(v) for v in args.ms.split(",")]
    shapes = SHAPES[:1] + SHAPES[5:6] if args.quick else SHAPES
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
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            reps = 50 if m * n * k < 2**33 else 10
            ref = REFERENCE.linear(x.float(), wq, None)
            paths = {"dense": lambda: torch.nn.functional.linear(x, wd),
                     "auto": lambda: triton_q1.linear_auto(x, qs, d, k, None),
                     "dequant": lambda: triton_q1.linear_dequant(x, qs, d, k, None)}
            if m <= triton_q1.GEMV_MAX_M:
                paths["gemv"] = lambda: triton_q1.linear_gemv(x, qs, d, k, None)
            if fam == "klein-4B":
                paths["fused"] = lambda: triton_q1.linear_fused(x, qs, d, k, None)
            row = {"family": fam, "layer": name, "n": n, "k": k, "m": m}
            for p, fn in paths.items():
                got = fn().float()
                row[f"{p}_err"] = float((got - ref).abs().max() / ref.abs().max())
                row[f"{p}_eager_ms"] = time_eager(fn, reps)
                row[f"{p}_graph_ms"] = time_graph(fn, reps)
            rows.append(row)
            ratios = "  ".join(f"{p} x{row['dense_eager_ms'] / row[f'{p}_eager_ms']:.2f}/x{row['dense_graph_ms'] / row[f'{p}_graph_ms']:.2f}"
                               for p in paths if p != "dense")
            print(f"{fam:<10} {name:<15} [{n}x{k}] M={m:<5} dense {row['dense_eager_ms'] * 1e3:8.1f}/"
                  f"{row['dense_graph_ms'] * 1e3:8.1f} us  speed vs dense (eager/graph): {ratios}  "
                  f"err auto {row['auto_err']:.1e}")
            x = ref = None
        wd = qs = d = wq = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "command": sys.argv, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
