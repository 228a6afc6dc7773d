"""Do the position words move the object? The probe's measurement on a real model folder.

    python training/position_check.py MODEL [--size 512] [--steps 24] [--seeds 0 1 2 3] [--json F] [--grid F]

For the probe's two prompts ("a red circle on a white background, <position>", "a blue square on a
yellow background, <position>"), the nine positions x the seeds are generated with the engine (the
model's own scheduler config: epsilon or v, SD's or the zero-SNR schedule), each seed's nine images
from the same starting noise; every image is averaged down to 32x32 and read by
``position_probe.read_images`` (the object: pixels far from the known background; its centroid's 3x3
cell). Reports position accuracy (chance 11 %) and the same-seed sensitivity (a model that places
objects by the noise gives one cell for all nine words).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bonsai_core import scenes as S  # noqa: E402
from training import position_probe as P  # noqa: E402


def check(model: str, size: int = 512, steps: int | None = None, seeds=(0, 1, 2, 3), device: str = "cpu",
          grid: str | None = None) -> dict:
    from bonsai_core.engine import BonsaiImageEngine

    eng = BonsaiImageEngine.from_pretrained(model, device=device)
    rows = P.eval_captions()
    n_pos = len(S.POSITIONS)
    imgs, ordered = [], []
    for p in range(len(P.EVAL_PAIRS)):  # order: pair, seed, position (P.summarise reads it so)
        for seed in seeds:
            for row in rows[p * n_pos:(p + 1) * n_pos]:
                r = eng.generate(row[0], seed=seed, steps=steps, width=size, height=size)
                imgs.append(r.tensor[0].permute(2, 0, 1).float())
                ordered.append(row)
    small = F.adaptive_avg_pool2d(torch.stack(imgs), P.RES)
    out = {"model": str(model), "size": size, "steps": steps, "seeds": list(seeds),
           "centroid": P.summarise(P.read_images(small, ordered), len(seeds)),
           "median3": P.summarise(P.read_images(small, ordered, by="median3"), len(seeds))}
    if grid:
        P.save_grid(small, Path(grid))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--grid")
    args = ap.parse_args(argv)
    out = check(args.model, args.size, args.steps, args.seeds, args.device, args.grid)
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
