"""Q1_0 matmul kernels against dense bf16/fp16 cuBLAS, on the FLUX.2 klein-4B layer shapes.

For each linear shape of klein-4B and each token count
(512^2: 1024 image + 512 text tokens; 1024^2: 4096 + 512), times in ONE run:
  dense      F.linear with a dense weight (the bf16 eager baseline)
  reference  dequantize with the PyTorch reference path, then F.linear
  dequant    one Triton dequantize pass, then F.linear (cuBLAS)
  fused      the Triton kernel that reads packed bits directly
and checks each Q1_0 path against the reference. Prints times and ratios to dense.

    python benchmarks/bench_kernels.py [--dtype bf16] [--json out.json]
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

# (name, out, in, count per step in klein-4B: 5 double blocks, 20 single blocks)
SHAPES = [
    ("double attn q/k/v/out (x8)", 3072, 3072, 40),
    ("double ff linear_in (x2)", 18432, 3072, 10),
    ("double ff linear_out (x2)", 3072, 9216, 10),
    ("single to_qkv_mlp_proj", 27648, 3072, 20),
    ("single to_out", 3072, 12288, 20),
]
# double-block linears see image tokens (img stream) or text tokens (txt stream): half of each
# kind runs on each stream; single blocks see image + text tokens.


def timeit(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not triton_q1.available():
        print("needs CUDA and Triton")
        return 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} dtype {dtype}; command: {' '.join(sys.argv)}")
    rows = []
    totals = {}
    for size, img in (("512^2", 1024), ("1024^2", 4096)):
        txt = 512
        for name, n, k, count in SHAPES:
            m_list = [img + txt] if name.startswith("single") else [img, txt]
            for m in m_list:
                torch.manual_seed(0)
                w = torch.randn(n, k, device="cuda") * 0.02
                qs, d = q1_0.quantize(w)
                wd = w.to(dtype)
                del w
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                wq = Q1Tensor(qs, d, (n, k))
                ref = REFERENCE.linear(x.float(), wq, None)
                err = {}
                for path, fn in (("dequant", triton_q1.linear_dequant), ("fused", triton_q1.linear_fused)):
                    got = fn(x, qs, d, k, None).float()
                    err[path] = ((got - ref).abs().max() / ref.abs().max()).item()
                t = {
                    "dense": timeit(lambda: torch.nn.functional.linear(x, wd)),
                    "reference": timeit(lambda: REFERENCE.linear(x, wq, None)),
                    "dequant": timeit(lambda: triton_q1.linear_dequant(x, qs, d, k, None)),
                    "fused": timeit(lambda: triton_q1.linear_fused(x, qs, d, k, None)),
                }
                per = count // len(m_list)
                for key, v in t.items():
                    totals[(size, key)] = totals.get((size, key), 0.0) + v * per
                row = dict(size=size, layer=name, m=m, n=n, k=k, count=per, **{f"{a}_ms": round(b, 4) for a, b in t.items()},
                           err_dequant=err["dequant"], err_fused=err["fused"])
                rows.append(row)
                print(f"{size:<7} {name:<28} m={m:<5} dense {t['dense']:.3f} ms | reference x{t['reference'] / t['dense']:.2f}"
                      f" | dequant x{t['dequant'] / t['dense']:.2f} | fused x{t['fused'] / t['dense']:.2f}"
                      f" | rel err {err['dequant']:.1e}/{err['fused']:.1e}")
                wd = qs = d = x = ref = None  # free before the next shape
                torch.cuda.empty_cache()
    print("\n# sum over all 100 packed linears of one step (ms) and ratio to dense")
    summary = {}
    for size in ("512^2", "1024^2"):
        dense = totals[(size, "dense")]
        line = {k: round(totals[(size, k)], 3) for k in ("dense", "reference", "dequant", "fused")}
        summary[size] = line
        print(f"{size:<7} " + "  ".join(f"{k} {v:.2f} ms (x{v / dense:.2f})" for k, v in line.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "device": torch.cuda.get_device_name(),
                                               "torch": torch.__version__, "command": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
