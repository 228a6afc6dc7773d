"""Python overhead of one quantized layer call: a BonsaiLinear(128 -> 8) on a [1, 128] input, CPU.

The compute is negligible at that size, so the time is what the layer, the kernel choice and the
weight object cost per call (what launch-bound GPU steps pay ~100 times a step).
``--root DIR`` measures the bonsai_core found in DIR (e.g. an older commit unpacked with
``git archive``), for a before/after in one run.

    python3 benchmarks/bench_layer_overhead.py [--root DIR] [--calls N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
p.add_argument("--calls", type=int, default=5000)
args = p.parse_args()
sys.path.insert(0, args.root)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bonsai_core.quant.layers import BonsaiLinear  # noqa: E402

torch.manual_seed(0)
layer = BonsaiLinear.from_linear(nn.Linear(128, 8))
x = torch.randn(1, 128)
with torch.no_grad():
    for _ in range(200):
        layer(x)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        layer(x)
print(f"{args.root}: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} us per call")
