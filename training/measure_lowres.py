"""CPU cost of a teacher UNet step at the config's resolution and at lower ones (``train_teacher.py unet
--resolution``): what pretraining at 256² before 512² saves a step, as a ratio on this machine.

    OMP_NUM_THREADS=1 python training/measure_lowres.py --config tiny --resolutions 64 32 --steps 30

Each run is the real training step (``train_teacher.main``: fresh scenes rendered and VAE-encoded into
the pool, text encoder + UNet forward and backward, AdamW, EMA) in a fresh work folder on a one-step
VAE; the time a step is the slope of the logged ``elapsed`` over the steps after the first few (the pool
fill and the first steps are left out). Resolutions are measured in turns, ``--repeats`` times each, so
other jobs on a shared CPU slow them alike; the median is reported. A CPU ratio only: a GPU's ratio
depends on how full the card is at each size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import tiny_sd, train_teacher  # noqa: E402


def seconds_a_step(vae_work: Path, config: str, res: int, steps: int, batch: int, skip: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bonsai-lowres-") as tmp:
        work = Path(tmp)
        shutil.copytree(vae_work / "vae", work / "vae")
        train_teacher.main(["unet", "--work", str(work), "--config", config, "--device", "cpu", "--batch", str(batch),
                            "--pool", str(batch), "--fresh", "2", "--steps", str(steps), "--log-every", "1",
                            "--ckpt-every", str(10 ** 9), "--resolution", str(res)])
        rows = [json.loads(ln) for ln in (work / "log.jsonl").read_text().splitlines()]
        t = {r["step"]: r["elapsed"] for r in rows if "loss" in r}
        return (t[steps] - t[skip]) / (steps - skip)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(tiny_sd.CONFIGS))
    p.add_argument("--resolutions", type=int, nargs="+", help="default: the config's and half of it")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    full = tiny_sd.CONFIGS[args.config]["resolution"]
    sizes = args.resolutions or [full, full // 2]
    with tempfile.TemporaryDirectory(prefix="bonsai-lowres-vae-") as tmp:
        vae_work = Path(tmp)
        train_teacher.main(["vae", "--work", str(vae_work), "--config", args.config, "--device", "cpu",
                            "--batch", "2", "--steps", "1", "--crop", "64"])
        times = {r: [] for r in sizes}
        for _ in range(args.repeats):
            for r in sizes:
                times[r].append(seconds_a_step(vae_work, args.config, r, args.steps, args.batch, args.skip))
    med = {r: statistics.median(v) for r, v in times.items()}
    out = {"config": args.config, "batch": args.batch, "steps": args.steps, "skip": args.skip,
           "seconds_a_step": {str(r): round(v, 4) for r, v in med.items()},
           "runs": {str(r): [round(x, 4) for x in v] for r, v in times.items()},
           "ratio_to_first": {str(r): round(med[sizes[0]] / v, 2) for r, v in med.items()},
           "command": "python training/measure_lowres.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
