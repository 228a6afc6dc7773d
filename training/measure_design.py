"""Size and CPU time of the shipped model's design, with random weights (no training needed).

    python training/measure_design.py [--config shipped] [--steps 24] [--json out.json]

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
    args = ap.parse_args(argv)

    import torch

    from bonsai_core.convert import convert_pipeline
    from bonsai_core.engine import BonsaiImageEngine
    from bonsai_core.quant.layers import plan_report
    from training.tiny_sd import build_components, save_pipeline

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
        t0 = time.perf_counter()
        eng = BonsaiImageEngine.from_pretrained(dst, device="cpu")
        load = time.perf_counter() - t0
        kw = {} if args.size is None else {"width": args.size, "height": args.size}
        r = eng.generate("a red circle on a white background", seed=1, steps=args.steps, **kw)
        total = time.perf_counter() - t0
        m = r.metadata
        out = {"config": args.config, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_avg": os.getloadavg(), "unet_params": sum(l.bytes_before for l in plan.layers),
               "unet_fp16_bytes": plan.bytes_before, "unet_q1_bytes": plan.bytes_after,
               "bonsai_folder_bytes": size, "components_bytes": comps, "load_s": round(load, 2),
               "generate": m["timings"], "steps": m["steps"], "size": [m["width"], m["height"]],
               "cfg": m["cfg"], "sampler": m["sampler"], "load_plus_generate_s": round(total, 2),
               "peak_bytes": m.get("peak_bytes"), "peak_kind": m.get("peak_kind")}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
