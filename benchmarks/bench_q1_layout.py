"""Which in-memory layout a Q1_0 weight keeps: GGUF's interleaved 18-byte blocks, or bits and scales apart.

Times the reference dequantization of klein-4B-sized weights from each layout (from the blocks it
needs the split first; apart it does not) and, with --device cuda, the Triton dequantize kernel on
the split layout beside a split-then-dequantize from blocks. Prints one line per shape and writes
JSON with --out. The answer is in quant/tensor.py's docstring.

    python3 benchmarks/bench_q1_layout.py [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bonsai_core.quant import q1_0  # noqa: E402

SHAPES = [(3072, 3072), (9216, 3072), (3072, 9216)]  # klein-4B attention, fused qkv/mlp-in, mlp-out


def timeit(fn, device, reps=10):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for n, k in SHAPES:
        torch.manual_seed(0)
        qs, d = q1_0.quantize(torch.randn(n, k))
        qs, d = qs.to(args.device), d.to(args.device)
        blocks = q1_0.to_blocks(qs, d)
        row = {"shape": [n, k], "dtype": str(dtype),
               "split_s": timeit(lambda: q1_0.dequantize(qs, d, k, dtype), args.device),
               "split_from_blocks_s": timeit(lambda: q1_0.from_blocks(blocks), args.device),
               "blocks_s": timeit(lambda: q1_0.dequantize(*q1_0.from_blocks(blocks), k, dtype), args.device)}
        if args.device == "cuda":
            from bonsai_core.quant import triton_q1

            row["triton_split_s"] = timeit(lambda: triton_q1.dequantize_triton(qs, d, k, dtype), args.device)
            row["triton_blocks_s"] = timeit(
                lambda: triton_q1.dequantize_triton(*q1_0.from_blocks(blocks), k, dtype), args.device)
        rows.append(row)
        print(f"[{n}, {k}] reference dequantize: split {row['split_s'] * 1e3:.2f} ms, from 18-byte blocks "
              f"{row['blocks_s'] * 1e3:.2f} ms (of which the split {row['split_from_blocks_s'] * 1e3:.2f} ms)"
              + (f"; Triton split {row['triton_split_s'] * 1e3:.3f} ms, from blocks {row['triton_blocks_s'] * 1e3:.3f} ms"
                 if "triton_split_s" in row else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
