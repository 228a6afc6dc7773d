"""README's first command, timed as a user runs it: `bonsai generate "..."` with every default (the
shipped model, 512x512, its sampler and steps), each run a fresh process, model load included.

    python benchmarks/bench_shipped_cpu.py [--runs 3] [--threads 2] [--json out.json]

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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (the machine's cores)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    info = C.machine_info(torch.device("cpu"))
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
