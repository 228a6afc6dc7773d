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
import random
import shutil
import signal
import sys
import time
from collections import Counter
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


# ---------------------------------------------------------------------------------------------
# SIGKILL campaign
# ---------------------------------------------------------------------------------------------
OPS = ("convert", "import", "export", "generate")


def _op(name: str, bases: dict, dst: Path, overwrite: bool):
    def quiet(_m):
        pass

    if name == "convert":
        from bonsai_core.convert import convert_pipeline
        return lambda: convert_pipeline(bases["sd_src"], dst, overwrite=overwrite, log=quiet)
    if name == "import":
        from bonsai_core.importers.assemble import import_model
        parts = bases["klein_gguf"] / "parts"
        return lambda: import_model(bases["klein_gguf"] / "bonsai-image-4b-q1_0.gguf", dst, text_encoder=parts / "text_encoder",
                                    vae=parts / "vae", tokenizer=parts / "tokenizer", overwrite=overwrite, log=quiet)
    if name == "export":
        from bonsai_core.importers.assemble import export_gguf
        return lambda: export_gguf(bases["klein_bonsai"], dst, overwrite=overwrite, log=quiet)

    def generate():
        from bonsai_core.engine import BonsaiImageEngine
        eng = BonsaiImageEngine.from_pretrained(bases["sd_bonsai"], device="cpu", dtype="fp32")
        res = eng.generate("a red fox", steps=2, width=64, height=64, seed=1)
        res.save(dst, 0)
    return generate


def _valid(name: str, dst: Path) -> bool:
    """Is ``dst`` a complete output of ``name``?"""
    try:
        if name in ("convert", "import"):
            from bonsai_core.cli import describe_model
            describe_model(dst)
            return True
        if name == "export":
            from bonsai_core.importers.gguf_q1 import read_gguf
            read_gguf(dst)
            return True
        from PIL import Image
        with Image.open(dst) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure to read it back means half-written
        return False


def _leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.bonsai-"))


def _fork_run(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    return pid


def run_kill(args) -> int:
    import torch

    from tests.fuzz_harness import build_bases, warm_up

    torch.set_num_threads(1)
    root = Path(args.dir)
    bases = build_bases(root / "bases")
    warm_up(bases, root / "warm")
    work = root / "kill"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    suffix = {"convert": "", "import": "", "export": ".gguf", "generate": ".png"}

    # how long each operation takes here, uninterrupted (the kill moments are drawn from it)
    durations = {}
    for name in OPS:
        dst = work / f"probe-{name}{suffix[name]}"
        t0 = time.perf_counter()
        pid = _fork_run(_op(name, bases, dst, False))
        _, status = os.waitpid(pid, 0)
        durations[name] = time.perf_counter() - t0
        assert os.WEXITSTATUS(status) == 0 and _valid(name, dst), f"{name} does not run uninterrupted"
        shutil.copytree(dst, work / f"good-{name}") if dst.is_dir() else shutil.copy2(dst, work / f"good-{name}{suffix[name]}")
    print("uninterrupted:", ", ".join(f"{k} {v:.2f} s" for k, v in durations.items()), flush=True)

    counts: Counter = Counter()
    by_op: Counter = Counter()
    problems = []
    trial = -1
    while counts["killed"] < args.kills and trial + 1 < args.trials:
        trial += 1
        name = OPS[trial % len(OPS)]
        overwrite = name != "generate" and rng.random() < 0.5
        dst = work / f"t{trial}" / f"out{suffix[name]}"
        dst.parent.mkdir()
        if overwrite:
            good = work / f"good-{name}{suffix[name]}"
            shutil.copytree(good, dst) if good.is_dir() else shutil.copy2(good, dst)
        delay = rng.uniform(0, durations[name])
        pid = _fork_run(_op(name, bases, dst, overwrite))
        time.sleep(delay)
        finished = os.waitpid(pid, os.WNOHANG)[0] != 0
        if not finished:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            counts["killed"] += 1
            by_op[name] += 1
        else:
            counts["finished before the kill"] += 1
        # right after the kill: the destination is absent or complete, never half-written
        present = dst.exists()
        if present and not _valid(name, dst):
            counts["half-written"] += 1
            problems.append(f"trial {trial} {name}: half-written {dst}")
        if overwrite and not present:
            counts["overwrite: old model moved aside at the kill (restored by the next run)"] += 1
        # the next run: the same operation to completion (an overwrite trial half the time without
        # --overwrite, so a restored old model is then refused as existing)
        again_overwrite = overwrite and rng.random() < 0.5 or (not overwrite and present)
        full = again_overwrite or not dst.exists() or name == "generate"  # the next run does the whole work
        t0 = time.perf_counter()
        pid = _fork_run(_op(name, bases, dst, again_overwrite))
        _, status = os.waitpid(pid, 0)
        if full and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:  # follow the machine's current speed
            durations[name] = 0.5 * durations[name] + 0.5 * (time.perf_counter() - t0)
        if overwrite and not (dst.exists() and _valid(name, dst)):
            counts["lost model under --overwrite"] += 1
            problems.append(f"trial {trial} {name}: model lost under --overwrite")
        if not overwrite and not _valid(name, dst):
            counts["next run failed"] += 1
            problems.append(f"trial {trial} {name}: the next run left no valid output (status {status})")
        left = _leftovers(dst)
        if left:
            counts["leftovers after the next run"] += 1
            problems.append(f"trial {trial} {name}: left {left}")
        shutil.rmtree(dst.parent, ignore_errors=True)
    print(f"\n{trial + 1} trials, SIGKILLs by operation: {dict(by_op)}")
    for k in ("killed", "finished before the kill", "half-written", "lost model under --overwrite",
              "leftovers after the next run", "next run failed",
              "overwrite: old model moved aside at the kill (restored by the next run)"):
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
