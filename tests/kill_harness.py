"""The SIGKILL campaign of issue 21, as a library: ``benchmarks/reliability_campaign.py kill`` runs it
long, ``tests/test_kill.py`` runs it short in CI."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

"""SIGKILLs at random moments of convert, import, export-gguf and generate (see
``benchmarks/reliability_campaign.py`` for what is counted)."""

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
        from tests.fuzz_harness import fork_safe_child

        fork_safe_child()
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    return pid


def kill_campaign(bases: dict, root: Path, kills: int, trials: int, seed: int, log=print):
    """SIGKILL operations until ``kills`` runs were really killed (at most ``trials`` trials).
    Returns ``(counts, kills by operation, problems, trials run)``."""
    import torch

    from tests.fuzz_harness import warm_up

    torch.set_num_threads(1)
    root = Path(root)
    warm_up(bases, root / "warm")
    work = root / "kill"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(seed)
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
    log("uninterrupted: " + ", ".join(f"{k} {v:.2f} s" for k, v in durations.items()))

    counts: Counter = Counter()
    by_op: Counter = Counter()
    problems = []
    trial = -1
    while counts["killed"] < kills and trial + 1 < trials:
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
    return counts, by_op, problems, trial + 1


COUNT_NAMES = ("killed", "finished before the kill", "half-written", "lost model under --overwrite",
               "leftovers after the next run", "next run failed",
               "overwrite: old model moved aside at the kill (restored by the next run)")




# ---------------------------------------------------------------------------------------------
# bonsai batch: killed at random moments, restarted with the same command
# ---------------------------------------------------------------------------------------------
def batch_state(out: Path) -> dict:
    """What a batch folder holds right now: finished PNGs (each must open), records (each must be
    JSON), temporary files, the manifest's lines (each JSON) if there is one."""
    import json

    from PIL import Image

    out = Path(out)
    pngs, broken = [], []
    for p in sorted(out.glob("*.png")):
        try:
            with Image.open(p) as im:
                im.load()
            pngs.append(p.name)
        except Exception:  # noqa: BLE001 - unreadable: half-written
            broken.append(p.name)
    records = {}
    for p in sorted((out / ".bonsai-batch" / "records").glob("*.json")) if out.exists() else ():
        try:
            records[p.name] = json.loads(p.read_text())
        except ValueError:
            broken.append(p.name)
    temps = sorted(p.name for p in out.rglob("*") if ".bonsai-" in p.name and p.name.endswith(".partial"))
    manifest = None
    if (out / "manifest.jsonl").exists():
        try:
            manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        except ValueError:
            broken.append("manifest.jsonl")
    return {"pngs": pngs, "broken": broken, "records": records, "temps": temps, "manifest": manifest}


def batch_kill_campaign(run, out: Path, kills: int, seed: int, max_trials: int = 200):
    """``run()`` renders a batch into ``out`` (the same command every time). Fork it, SIGKILL it at a
    random moment, check that nothing is half-written, and start it again, until ``kills`` runs
    were really killed; a run that finishes before its kill starts the batch over (folder removed).
    Returns ``(kills by moment, problems)``; the caller runs the batch to the end afterwards."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    pid = _fork_run(run)
    _, status = os.waitpid(pid, 0)
    duration = time.perf_counter() - t0
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the batch does not run uninterrupted ({status})"
    shutil.rmtree(out)
    problems, killed, trials = [], [], 0
    while len(killed) < kills and trials < max_trials:
        trials += 1
        done_before = len(batch_state(out)["pngs"]) if out.exists() else 0
        delay = rng.uniform(0.05, duration)
        pid = _fork_run(run)
        time.sleep(delay)
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed.append((round(delay, 2), done_before))
        else:  # it finished: start over so that later kills land in real work
            shutil.rmtree(out, ignore_errors=True)
            continue
        state = batch_state(out)
        if state["broken"]:
            problems.append(f"kill {len(killed)} at {delay:.2f} s: half-written {state['broken']}")
    return killed, problems
