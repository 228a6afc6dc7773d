"""W1A8 against W1A16 on final images: the shipped model, same prompts and seeds, PSNR per image.

Issue 20 asks for the 8-bit activations' error on final images. The shipped ``bonsai-shapes`` model
generates each prompt with ``BONSAI_ACT`` = 16 (exact: the reference), fp8 and int8, on CUDA, a
fresh engine per setting (CUDA graphs captured under one setting are never replayed under another);
the PSNR of each 8-bit image against its 16-bit twin (8-bit pixels, peak 255) and the denoising time
are written out.

    python3 benchmarks/bench_w1a8_images.py --json benchmarks/results/h200/w1a8_images.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROMPTS = ["a red circle on a white background", "a small blue star on a yellow background, top left",
           "a green triangle on a black background", "a large orange square on a blue background, bottom right",
           "a purple ring on a white background", "a yellow cross on a red background, center",
           "a white star and a red circle on a green background", "blue stripes on an orange background"]


def psnr8(a: torch.Tensor, b: torch.Tensor) -> float:
    a8 = (a.clamp(0, 1) * 255).round()
    b8 = (b.clamp(0, 1) * 255).round()
    mse = float(((a8 - b8) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--acts", default="16,fp8,int8")
    p.add_argument("--model", default="bonsai-shapes")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    from bonsai_core.engine import BonsaiImageEngine
    from bonsai_core.quant import kernels

    images, times = {}, {}
    for act in args.acts.split(","):
        os.environ["BONSAI_ACT"] = act
        kernels.reload()
        eng = BonsaiImageEngine.from_pretrained(args.model, device="cuda")
        eng.generate(PROMPTS[0], seed=0)  # warm-up: autotuning and graph capture are not timed
        images[act], times[act] = [], []
        for i, prompt in enumerate(PROMPTS):
            res = eng.generate(prompt, seed=i)
            images[act].append(res.tensor)
            times[act].append(res.metadata["timings"]["denoise_s"])
        print(f"act {act}: median denoise {statistics.median(times[act]) * 1e3:.1f} ms", flush=True)
        del eng
    os.environ.pop("BONSAI_ACT", None)
    kernels.reload()
    out = {"command": sys.argv, "gpu": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_GIT_COMMIT"),
           "prompts": PROMPTS, "median_denoise_s": {a: statistics.median(t) for a, t in times.items()}, "psnr": {}}
    for act in images:
        if act == "16":
            continue
        vals = [psnr8(a, b) for a, b in zip(images[act], images["16"])]
        out["psnr"][act] = vals
        finite = [v for v in vals if math.isfinite(v)]
        print(f"{act} vs 16-bit activations: PSNR per image {', '.join(f'{v:.1f}' for v in vals)} dB; "
              f"min {min(vals):.1f}, mean of finite {statistics.mean(finite) if finite else math.inf:.1f} dB")
    if args.json:
        Path(args.json).write_text(__import__("json").dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
