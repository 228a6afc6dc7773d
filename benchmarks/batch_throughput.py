"""``bonsai batch`` throughput: images/s with 1 process and with N processes in the same run, and the
cost of each attached LoRA per denoising step.

Driver (what you run): for each process count it renders the same ``--prompts`` prompts into a
fresh folder with ``bonsai batch`` (1: a plain process; N: ``accelerate launch --multi_gpu
--num_processes N``, one process per GPU, or N CPU processes joined with gloo on a machine without
GPUs) and reports

* ``images/s (wall)``: prompts / the whole command's time (process start, model load, render, manifest);
* ``images/s (render)``: images / the slowest process's render loop (what more devices buy once loaded);
* the speed-up of each against 1 process, measured in the same run.

Then, in this process, the per-step time of one model with 0, 1, 2 and 4 synthetic LoRAs attached
(rank ``--lora-rank`` on every linear and conv layer of the denoiser's attention and feed-forward
blocks: a large LoRA), and the step cost per LoRA.

The script is also launchable under accelerate itself (``accelerate launch --num_processes N
benchmarks/batch_throughput.py --model M --prompts 64``): it then runs one batch across the
launched processes and the main process prints its images/s.

    python benchmarks/batch_throughput.py --model models/bonsai/<name> --prompts 64 --processes 1,2
    python benchmarks/batch_throughput.py --tiny --prompts 16 --processes 1,2 --steps 2 --size 64   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, command_line, header, machine_info, table, write_json  # noqa: E402

import torch  # noqa: E402

PROMPTS = ["a bonsai tree on a rock", "a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen",
           "a city street in the rain", "a mountain lake at sunrise", "an old sailing ship", "a cat on a windowsill"]


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("\n".join(f"{PROMPTS[i % len(PROMPTS)]}, study {i}" for i in range(n)) + "\n")
    return path


def batch_args(args, prompts: Path, out: Path) -> list[str]:
    extra = ["--steps", str(args.steps), "--width", str(args.size), "--height", str(args.size), "--no-progress"]
    if args.dtype:
        extra += ["--dtype", args.dtype]
    for lora in args.lora or ():
        extra += ["--lora", lora]
    return ["batch", str(prompts), "--out", str(out), "--model", str(args.model), *extra]


def run_batch_command(args, n: int, prompts: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    if n == 1:
        cmd = [sys.executable, "-m", "bonsai_core", *batch_args(args, prompts, out)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bonsai_core",
               *batch_args(args, prompts, out)]
        if torch.cuda.is_available() and torch.cuda.device_count() < n:
            raise SystemExit(f"{n} processes need {n} GPUs; this machine has {torch.cuda.device_count()}")
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-4000:])
        raise SystemExit(f"the batch with {n} process(es) failed ({run.returncode})")
    per = [(int(r), int(k), float(s)) for r, k, s in
           re.findall(r"process (\d+)/\d+ rendered (\d+) image\(s\), \d+ failed, in ([\d.]+) s", run.stderr)]
    rendered = sum(k for _r, k, _s in per)
    render_s = max(s for _r, _k, s in per)
    return {"processes": n, "images": rendered, "wall_s": round(wall, 3), "render_s": round(render_s, 3),
            "images_per_s_wall": round(rendered / wall, 4), "images_per_s_render": round(rendered / render_s, 4),
            "per_process": [{"process": r, "images": k, "render_s": s} for r, k, s in per],
            "command": " ".join(cmd)}


# ------------------------------------------------------------------------------------ LoRA step cost
def synthetic_lora(engine, path: Path, rank: int, seed: int) -> tuple[Path, int]:
    """A diffusers/PEFT-layout LoRA on every weight layer of the denoiser's attention and FF blocks."""
    from safetensors.torch import save_file
    from torch import nn

    from bonsai_core.lora import components_of
    from bonsai_core.quant.layers import lora_fan_in

    comps = components_of(engine.family)
    name = "unet" if "unet" in comps else "transformer"
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod_name, m in comps[name].named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not re.search(r"attn|ff|proj", mod_name):
            continue
        fan_in = lora_fan_in(m)
        if fan_in is None:
            continue
        out = m.weight.shape[0]
        sd[f"{name}.{mod_name}.lora_A.weight"] = torch.randn((rank, *fan_in), generator=g) * 0.01
        sd[f"{name}.{mod_name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    save_file(sd, str(path))
    return path, len(sd) // 2


def lora_step_cost(args, work: Path) -> dict:
    from bonsai_core.engine import BonsaiImageEngine

    engine = BonsaiImageEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    files, layers = [], 0
    for i in range(4):
        path, layers = synthetic_lora(engine, work / f"lora{i}.safetensors", args.lora_rank, seed=i)
        files.append(path)

    def step_time() -> float:
        times = []
        for rep in range(args.repeats + 1):
            r = engine.generate("a bonsai tree", steps=args.steps, width=args.size, height=args.size, seed=rep)
            if rep:  # the first is warm-up
                times.append(r.metadata["timings"]["per_step_s"])
        return statistics.median(times)

    rows = []
    base = None
    for k in (0, 1, 2, 4):
        engine.use_loras([(f, 1.0) for f in files[:k]])
        t = step_time()
        base = t if base is None else base
        rows.append({"loras": k, "step_s": round(t, 5), "per_lora_s": round((t - base) / k, 5) if k else 0.0,
                     "per_lora_pct": round(100 * (t - base) / k / base, 2) if k else 0.0})
    engine.unload()
    return {"device": str(engine.device), "rank": args.lora_rank, "layers_per_lora": layers, "rows": rows}


# --------------------------------------------------------------------------------------------- main
def inner(args) -> int:
    """Launched under accelerate: one batch across the launched processes."""
    from bonsai_core.batch import BatchOptions, run_batch

    # one folder for every process of the launch (a per-process temporary folder would split the batch)
    work = Path(args.workdir or Path(tempfile.gettempdir()) / f"bonsai-throughput-{os.environ.get('MASTER_PORT', 0)}")
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    out = work / "out"
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        write_prompts(prompts, args.prompts)
        shutil.rmtree(out, ignore_errors=True)
    state.wait_for_everyone()
    opts = BatchOptions(model=str(args.model), out=out, dtype=args.dtype,
                        settings={"steps": args.steps, "width": args.size, "height": args.size})
    t0 = time.perf_counter()
    summary = run_batch(prompts, opts, state=state, progress=False)
    wall = time.perf_counter() - t0
    if state.is_main_process:
        print(json.dumps({"processes": state.num_processes, "images": summary["ok"], "wall_s": round(wall, 3),
                          "images_per_s": round(summary["ok"] / wall, 4)}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Bonsai model folder")
    p.add_argument("--tiny", action="store_true", help="build and use the test-sized SD model (CPU smoke run)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--processes", default="1,2", help="process counts to compare, e.g. 1,2 or 1,2,4,8")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None, help="for the LoRA step cost (default: auto)")
    p.add_argument("--lora", action="append", help="FILE[:STRENGTH] attached in every batch process")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-lora-cost", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if "WORLD_SIZE" in os.environ or "MASTER_ADDR" in os.environ:  # launched under accelerate
        if args.model is None:
            p.error("under accelerate launch give --model (build the --tiny model with a plain run first)")
        return inner(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bonsai-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny and args.model is None:
        from bonsai_core.convert import convert_pipeline
        from tests.sd_fixtures import make_tiny_sd_pipeline

        args.model = work / "tiny-bonsai"
        if not args.model.exists():
            convert_pipeline(make_tiny_sd_pipeline(work / "tiny-fp"), args.model, log=lambda m: None)
    if args.model is None:
        p.error("give --model (a Bonsai folder) or --tiny")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    print(header("bonsai batch throughput", info))
    prompts = write_prompts(work / "prompts.txt", args.prompts)
    runs = []
    for n in [int(x) for x in args.processes.split(",")]:
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        runs.append(run_batch_command(args, n, prompts, out))
    base = runs[0]
    print(table(["processes", "images", "wall s", "images/s (wall)", "x", "render s", "images/s (render)", "x"],
                [[r["processes"], r["images"], f"{r['wall_s']:.1f}", f"{r['images_per_s_wall']:.3f}",
                  f"{r['images_per_s_wall'] / base['images_per_s_wall']:.2f}", f"{r['render_s']:.1f}",
                  f"{r['images_per_s_render']:.3f}", f"{r['images_per_s_render'] / base['images_per_s_render']:.2f}"]
                 for r in runs]))
    result = {"machine": info, "command": command_line(), "model": str(args.model), "prompts": args.prompts,
              "steps": args.steps, "size": args.size, "runs": runs}
    if not args.no_lora_cost:
        cost = lora_step_cost(args, work)
        print(f"\nLoRA step cost on {cost['device']} (rank {cost['rank']}, {cost['layers_per_lora']} layers each):")
        print(table(["LoRAs", "step s", "per LoRA s", "per LoRA %"],
                    [[r["loras"], f"{r['step_s']:.4f}", f"{r['per_lora_s']:.4f}", f"{r['per_lora_pct']:.1f}"]
                     for r in cost["rows"]]))
        result["lora_step_cost"] = cost
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
