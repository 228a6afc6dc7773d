"""Size and CPU time of the shipped model's design, with random weights (no training needed).

    python training/measure_design.py [--config shipped] [--steps 24] [--json out.json]
    python training/measure_design.py --model bonsai_core/assets/... [--json out.json]   # a real folder


Prints the Q1_0 plan of the UNet (``plan_report``), builds a random-weight pipeline, converts it with
``bonsai convert``'s code, measures the Bonsai folder on disk, then times what ``bonsai generate``
does with its defaults (load + 512x512, 24 steps DPM++ 2M with CFG) through ``BonsaiImageEngine`` on
the CPU, with the peak resident memory. Weights do not change the time, so this is the shipped
model's time on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="shipped")
    ap.add_argument("--steps", type=int, default=None, help="default: the engine's")
    ap.add_argument("--size", type=int, default=None, help="default: the engine's")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None, help="time this Bonsai folder instead of a random-weight one")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)

    import torch

    from bonsai_core.convert import convert_pipeline
    from bonsai_core.quant.layers import plan_report
    from training.tiny_sd import build_components, save_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return time_folder(Path(args.model), args, prompt="a red circle on a white background")
    tok, te, unet, vae = build_components(args.config)
    plan = plan_report(unet)
    q = [l for l in plan.layers if l.quantized]
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, {len(q)} layers Q1_0, "
          f"{plan.bytes_before / 2**20:.2f} MB fp16 -> {plan.bytes_after / 2**20:.2f} MB")
    for name, m in (("text_encoder", te), ("vae", vae)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters, "
              f"{sum(p.numel() for p in m.parameters()) * 2 / 2**20:.2f} MB fp16")
    with tempfile.TemporaryDirectory() as tmp:
        src = save_pipeline(Path(tmp) / "fp", tok, te, unet, vae)
        del te, unet, vae
        dst = Path(tmp) / "bonsai"
        convert_pipeline(src, dst, log=lambda m: None)
        size = folder_bytes(dst)
        comps = {p.name: folder_bytes(p) for p in dst.iterdir() if p.is_dir()}
        print(f"Bonsai folder: {size / 2**20:.2f} MB  ({', '.join(f'{k} {v / 2**20:.2f}' for k, v in comps.items())})")
        extra = {"config": args.config, "unet_params": sum(p.numel() for p in build_components(args.config)[2].parameters()),
                 "unet_fp16_bytes": plan.bytes_before, "unet_q1_bytes_planned": plan.bytes_after,
                 "bonsai_folder_bytes": size, "components_bytes": comps}
        return time_folder(dst, args, prompt="a red circle on a white background", extra=extra)


def time_folder(folder: Path, args, prompt: str, extra: dict | None = None) -> int:
    """What ``bonsai generate PROMPT`` does with its defaults, timed from before the load."""
    import resource

    import torch

    from bonsai_core.engine import BonsaiImageEngine

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    eng = BonsaiImageEngine.from_pretrained(folder, device="cpu")
    load = time.perf_counter() - t0
    kw = {} if args.size is None else {"width": args.size, "height": args.size}
    r = eng.generate(prompt, seed=1, steps=args.steps, **kw)
    total = time.perf_counter() - t0
    m = r.metadata
    out = {**(extra or {}), "model": str(folder), "folder_bytes": folder_bytes(folder),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg_1_5_15": os.getloadavg(),
           "load_s": round(load, 2), "generate": m["timings"], "steps": m["steps"], "size": [m["width"], m["height"]],
           "cfg": m["cfg"], "sampler": m["sampler"], "load_plus_generate_s": round(total, 2),
           "process_cpu_s": round(time.process_time() - cpu0, 2),
           "peak_bytes": m.get("peak_bytes"), "peak_kind": m.get("peak_kind"),
           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
