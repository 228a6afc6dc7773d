"""README's first command, timed as a user runs it: `bonsai generate "..."` with every default (the
shipped model, 512x512, its sampler and steps), each run a fresh process, model load included; and
the shipped model's 1-bit UNet against the same UNet dense in fp32 (issue 20's CPU target).

    python benchmarks/bench_shipped_cpu.py [--runs 3] [--threads 2] [--json out.json]
    python benchmarks/bench_shipped_cpu.py --vs-dense [--runs 5] [--kernel auto|reference] [--json out.json]

``--vs-dense``: both models loaded in one process, the 1-bit one as shipped and a copy whose every
1-bit weight is dequantized (sign x scale: the very values the 1-bit model computes with) into a
plain diffusers UNet in fp32; the same generation (defaults, seed 0) timed alternately, A B A B ...,
so that a shared machine's load hits both alike; medians of the denoise time and their ratio.

Each run is ``python -m bonsai_core generate PROMPT --out TMP.png --seed i`` in a new process
(interpreter start, imports, load, sampling, decode, PNG write): the wall time is what the user
waits. Peak RAM is the child's resident high-water mark (``ru_maxrss`` of the finished child).
The target of issue 19 is <= 60 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import torch  # noqa: E402

PROMPT = "a red circle on a white background"


def one_run(seed: int, threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bonsai_core", "generate", PROMPT, "--out", str(out),
                           "--seed", str(seed)], env=env, cwd=C.REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bonsai generate failed ({proc.returncode}):\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    line = [ln for ln in proc.stderr.splitlines() if " steps " in ln and "peak" in ln]
    return {"seed": seed, "wall_s": round(wall, 2), "child_maxrss_kib": after if after > before else None,
            "engine_line": line[-1].strip() if line else None}


def dense_copy(unet):
    """A plain diffusers UNet in fp32 holding ``unet``'s 1-bit weights dequantized."""
    from diffusers import UNet2DConditionModel

    from bonsai_core.quant.tensor import Q1Tensor

    dense = {k: (v.dequantize(torch.float32) if isinstance(v, Q1Tensor) else v.float())
             for k, v in unet.state_dict().items()}
    ref = UNet2DConditionModel.from_config(unet.config)
    ref.load_state_dict(dense, strict=True)
    return ref.eval().requires_grad_(False)


def vs_dense(runs: int, threads: int) -> dict:
    from bonsai_core.engine import BonsaiImageEngine
    from bonsai_core.quant import kernels

    torch.set_num_threads(threads)
    engines = {"bonsai": BonsaiImageEngine.from_pretrained("bonsai-shapes", device="cpu")}
    engines["dense"] = BonsaiImageEngine.from_pretrained("bonsai-shapes", device="cpu")
    fam = engines["dense"].family
    fam.unet = dense_copy(fam.unet)  # the same model, every weight dense
    times = {k: [] for k in engines}
    pixels = {}
    for r in range(runs + 1):  # the first round warms both up and is not counted
        for name, eng in engines.items():
            res = eng.generate(PROMPT, seed=0)
            if r:
                times[name].append(res.metadata["timings"]["denoise_s"])
                print(f"round {r} {name}: denoise {times[name][-1]:.2f} s")
            pixels[name] = res.tensor
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = (pixels["bonsai"].float() - pixels["dense"].float()).abs().max().item()
    from bonsai_core.quant.layers import quantized_layers

    probe = next(m for m in quantized_layers(engines["bonsai"].family.unet).values() if hasattr(m, "in_features"))
    return {"kernel": kernels.active(torch.zeros(1, probe.in_features), probe.weight), "denoise_s": times,
            "median_denoise_s": med,
            "ratio_bonsai_over_dense": med["bonsai"] / med["dense"], "max_pixel_diff": diff}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (the machine's cores)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--vs-dense", action="store_true", help="the 1-bit UNet against its dense fp32 copy, alternately")
    ap.add_argument("--kernel", default=None, help="BONSAI_KERNEL for --vs-dense (default: the engine's choice)")
    args = ap.parse_args(argv)
    if args.kernel:
        os.environ["BONSAI_KERNEL"] = args.kernel
    info = C.machine_info(torch.device("cpu"))
    if args.vs_dense:
        print(C.header("bench_shipped_cpu --vs-dense: the shipped 1-bit UNet against its dense fp32 copy", info))
        result = vs_dense(args.runs, args.threads)
        m = result["median_denoise_s"]
        print(f"\nkernel {result['kernel']}: denoise median 1-bit {m['bonsai']:.2f} s, dense fp32 {m['dense']:.2f} s, "
              f"ratio {result['ratio_bonsai_over_dense']:.3f}x (<= 1.0: the 1-bit model is not slower); "
              f"largest pixel difference {result['max_pixel_diff']:.2e}")
        C.write_json(args.json, dict(result, machine=info))
        return result
    print(C.header("bench_shipped_cpu: `bonsai generate PROMPT` with defaults, fresh process each run", info))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            r = one_run(i, args.threads, Path(tmp) / f"run{i}.png")
            runs.append(r)
            rss = f"{r['child_maxrss_kib'] / 1024:.0f} MiB" if r["child_maxrss_kib"] else "-"
            print(f"run {i}: {r['wall_s']:.1f} s wall, peak RSS {rss}  [{r['engine_line']}]")
    walls = [r["wall_s"] for r in runs]
    result = {"prompt": PROMPT, "threads": args.threads, "runs": runs, "median_wall_s": statistics.median(walls),
              "max_wall_s": max(walls), "target_s": 60, "machine": info}
    print(f"\nmedian {result['median_wall_s']:.1f} s, worst {result['max_wall_s']:.1f} s (target <= 60 s)")
    C.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
