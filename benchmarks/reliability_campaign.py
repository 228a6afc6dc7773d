"""Issue 21's two campaigns: >= 1,000 corrupted variants, and >= 100 SIGKILLs at random moments.

    python benchmarks/reliability_campaign.py fuzz [--cases 1200] [--seed 21]
    python benchmarks/reliability_campaign.py kill [--kills 120] [--seed 21]

``fuzz`` runs ``tests/fuzz_harness.py`` (every mutation kind through every entry point, each case in
a forked child with a timeout and a memory limit) and prints the outcomes by kind.

``kill`` forks a child that runs one of convert / import / export-gguf / generate (the functions the
CLI commands call, with every import already done, so a kill lands inside the work and not inside
Python's start-up), SIGKILLs it at a moment drawn uniformly from 0 to that operation's duration
(measured uninterrupted, then followed run by run), and then checks the disk:

* half-written: the destination exists but is not a complete output (a model folder whose
  ``bonsai info`` fails, a .gguf that does not import, a PNG that does not decode);
* lost: an ``--overwrite`` trial whose old model is gone even after the next run;
* leftovers: anything ``.<name>.bonsai-*`` beside the destination after the next run (the same
  operation run again to completion; half of the overwrite trials run it without --overwrite, so the
  restore-then-refuse path is counted too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_fuzz(args) -> int:
    from tests.fuzz_harness import build_bases, run_campaign, summary

    root = Path(args.dir)
    bases = build_bases(root / "bases")
    t0 = time.perf_counter()

    def log(o):
        if o.bad:
            print(f"[{o.case}] {o.kind} {o.entry}: {o.detail} -> {o.label}: {o.message}", flush=True)
        elif o.case % 100 == 0:
            print(f"... case {o.case} ({time.perf_counter() - t0:.0f} s)", flush=True)
    outs = run_campaign(bases, root / "work", args.cases, seed=args.seed, timeout=args.timeout, log=log)
    print(summary(outs))
    bad = [o for o in outs if o.bad]
    print(f"\n{len(outs)} cases in {time.perf_counter() - t0:.0f} s; failures (raw, hang, memory, silent): {len(bad)}")
    return 1 if bad else 0


def run_kill(args) -> int:
    from tests.fuzz_harness import build_bases
    from tests.kill_harness import COUNT_NAMES, kill_campaign

    root = Path(args.dir)
    bases = build_bases(root / "bases")
    counts, by_op, problems, trials = kill_campaign(bases, root, args.kills, args.trials, args.seed,
                                                    log=lambda m: print(m, flush=True))
    print(f"\n{trials} trials, SIGKILLs by operation: {dict(by_op)}")
    for k in COUNT_NAMES:
        print(f"  {k:<72} {counts[k]}")
    for p in problems[:20]:
        print("  !", p)
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("campaign", choices=["fuzz", "kill"])
    p.add_argument("--cases", type=int, default=1200)
    p.add_argument("--kills", type=int, default=120, help="stop after this many runs were really killed")
    p.add_argument("--trials", type=int, default=400, help="at most this many trials")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--dir", default=os.environ.get("BONSAI_FUZZ_DIR", "/tmp/bonsai-campaign"))
    args = p.parse_args()
    return run_fuzz(args) if args.campaign == "fuzz" else run_kill(args)


if __name__ == "__main__":
    sys.exit(main())
