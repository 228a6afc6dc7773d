"""How far the SD family's images are from diffusers' own pipelines, case by case (max abs, fp32).

The same comparisons as ``tests/test_sd_family.py``, printed as a table instead of asserted
against 1e-4: ``engine.generate`` on the tests' tiny SD1.5- and SDXL-shaped models beside
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` given the same initial latents
(64x96, 5 steps, CFG 6 with a negative prompt), per sampler, Karras sigmas and prediction type.

    python benchmarks/sd_oracle.py --out out/sd_oracle.json      # CPU, about a minute
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import command_line, header, machine_info, table, write_json  # noqa: E402


def main(argv=None) -> int:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from bonsai_core.convert import convert_pipeline
    from bonsai_core.engine import BonsaiImageEngine
    from tests.sd_fixtures import make_tiny_sd_pipeline, make_tiny_sdxl_pipeline, set_prediction_type
    from tests.test_sd_family import (CFG, H, NEGATIVE, PROMPT, STEPS, W, diffusers_scheduler, initial_noise,
                                      max_diff)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--json", dest="out", default=None)
    args = p.parse_args(argv)
    info = machine_info(torch.device("cpu"), torch.float32)
    print(header("sd_oracle: the SD family beside diffusers' pipelines (max abs difference, fp32)", info))
    root = Path(tempfile.mkdtemp(prefix="bonsai-sd-oracle-"))
    rows, results = [], []
    quiet = dict(log=lambda m: None)
    try:
        eps = make_tiny_sd_pipeline(root / "sd-eps")
        v = set_prediction_type(shutil.copytree(eps, root / "sd-v"), "v_prediction")
        for prediction, folder in (("epsilon", eps), ("v_prediction", v)):
            eng = BonsaiImageEngine.from_pretrained(folder, device="cpu")
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
            pipe.set_progress_bar_config(disable=True)
            for sampler in ("euler", "dpmpp_2m"):
                for karras in (False, True):
                    ours = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=11,
                                        sampler=sampler, karras=karras)
                    pipe.scheduler = diffusers_scheduler(pipe.scheduler.config, sampler, karras)
                    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                               width=W, height=H, latents=initial_noise(eng, ours), output_type="pt").images
                    results.append(dict(model="SD1.5 (full precision)", prediction=prediction, sampler=sampler,
                                        karras=karras, schedule="auto", max_abs=max_diff(ours, ref)))
            # DPM++ 2M on Euler's sigmas against diffusers' DPM-Solver given Euler's (whole) timesteps
            ours = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=2,
                                sampler="dpmpp_2m", schedule="euler")
            euler = EulerDiscreteScheduler.from_config(eng.family.scheduler_config)
            euler.set_timesteps(STEPS)
            pipe.scheduler = diffusers_scheduler(pipe.scheduler.config, "dpmpp_2m", False)
            ref = pipe(PROMPT, negative_prompt=NEGATIVE, timesteps=euler.timesteps.long().tolist(), guidance_scale=CFG,
                       width=W, height=H, latents=initial_noise(eng, ours), output_type="pt").images
            results.append(dict(model="SD1.5 (full precision)", prediction=prediction, sampler="dpmpp_2m",
                                karras=False, schedule="euler", max_abs=max_diff(ours, ref)))
            eng.unload()
        xl_fp = make_tiny_sdxl_pipeline(root / "sdxl-fp")
        convert_pipeline(xl_fp, root / "sdxl-bonsai", **quiet)
        eng = BonsaiImageEngine.from_pretrained(root / "sdxl-bonsai", device="cpu")
        fam = eng.family
        for sampler in ("euler", "dpmpp_2m"):
            for karras in (False, True):
                for negative in (NEGATIVE, ""):
                    ours = eng.generate(PROMPT, negative, steps=STEPS, guidance=CFG, width=W, height=H, seed=9,
                                        sampler=sampler, karras=karras, default_negative=False)
                    pipe = StableDiffusionXLPipeline(
                        vae=fam.vae, text_encoder=fam.text_encoders[0], text_encoder_2=fam.text_encoders[1],
                        tokenizer=fam._tokenizers[0], tokenizer_2=fam._tokenizers[1], unet=fam.unet,
                        scheduler=diffusers_scheduler(fam.scheduler_config, sampler, karras))
                    pipe.set_progress_bar_config(disable=True)
                    ref = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=CFG,
                               width=W, height=H, latents=initial_noise(eng, ours), output_type="pt").images
                    results.append(dict(model="SDXL (Bonsai 1-bit UNet)" + ("" if negative else ", empty negative"),
                                        prediction="epsilon", sampler=sampler, karras=karras, schedule="auto",
                                        max_abs=max_diff(ours, ref)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r in results:
        rows.append([r["model"], r["prediction"], r["sampler"], "yes" if r["karras"] else "no", r["schedule"],
                     f"{r['max_abs']:.1e}"])
    print(table(["model", "prediction", "sampler", "Karras", "schedule", "max abs vs diffusers"], rows, "<<<<<>"))
    write_json(args.out, {"benchmark": "sd_oracle", "command": command_line(), "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
