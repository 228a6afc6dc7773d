"""Time one text-to-image generation with a Bonsai (1-bit) model against the same model in full
precision, on the same machine, in the same run.

What it does:
  1. writes a random-weight SD1.5-shaped diffusers pipeline into a work folder (UNet of
     ``SD15_UNET_CONFIG``; a CLIP text encoder of SD1.5 size: hidden 768, 12 layers, 12 heads,
     intermediate 3072, 77 positions, with the tiny test tokenizer's vocabulary; an SD-sized KL VAE:
     block_out_channels 128/256/512/512, 2 layers per block, 4 latent channels), stored in fp16 as
     SD1.5 is distributed; ``--tiny`` writes the test-sized pipeline of ``tests/sd_fixtures.py``;
  2. converts it with ``bonsai_core.convert_pipeline`` (UNet to Q1_0 under the default policy);
  3. generates the same image (seed, prompt, steps, size, sampler, guidance) with each model
     through ``BonsaiImageEngine``: ``--warmup`` untimed generations, then the median of
     ``--repeats`` timed ones (the prompt cache is emptied before each, so totals include encoding);
  4. prints, per model, load time, denoise time, time per step, total, peak memory and weight bytes,
     the ratios Bonsai / baseline, and the UNet file sizes (fp16 file vs Bonsai file).

The baseline is the full-precision folder in fp16 on cuda/mps and fp32 on a CPU (the engine's
defaults; ``--baseline-dtype`` forces one). The Bonsai model computes in the same dtype.

    python benchmarks/bench_generate.py --quick                      # CPU smoke run, ~15 s
    python benchmarks/bench_generate.py --device cuda --json out.json  # SD1.5 size, 512 px, 24 steps
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DTYPES, PeakMemory, allocated, fmt_bytes, fmt_ratio, fmt_s, free_memory,  # noqa: E402
                    header, machine_info, pick_device, ratio, table, write_json, command_line)

import torch  # noqa: E402

PROMPT = "a bonsai tree on a rock, digital painting"


# ------------------------------------------------------------------------------- building the models
def write_sd15_pipeline(folder: Path, seed: int = 0, log=print) -> Path:
    """A random-weight StableDiffusionPipeline folder with SD1.5's UNet, text encoder and VAE shapes.

    The tokenizer is the tiny byte-level CLIP tokenizer of the tests (no download), so the text
    encoder's vocabulary is ~520 tokens instead of 49408 (its embedding is 0.4 M instead of 38 M
    parameters; every other shape is SD1.5's). Weights are stored in fp16.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.sd_fixtures import SD15_UNET_CONFIG, tiny_clip_tokenizer, write_sd_scheduler_and_index

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(folder / "tokenizer")
    t0 = time.perf_counter()
    log("  building UNet (SD1.5 shapes, ~860 M parameters) ...")
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet.to(torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    del unet
    log("  building VAE and text encoder ...")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512)
    vae.to(torch.float16).save_pretrained(folder / "vae", safe_serialization=True)
    del vae
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=768,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    te.to(torch.float16).save_pretrained(folder / "text_encoder", safe_serialization=True)
    del te
    write_sd_scheduler_and_index(folder)
    log(f"  written in {time.perf_counter() - t0:.1f} s")
    return folder


def write_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    from tests.sd_fixtures import make_tiny_sd_pipeline

    return make_tiny_sd_pipeline(folder, seed=seed)


def unet_file(folder: Path) -> Path:
    from bonsai_core import checkpoint

    return folder / "unet" / checkpoint.WEIGHTS_NAME


def fp16_unet_file(src: Path, workdir: Path) -> Path:
    """The fp16 UNet file: the source's own when it is stored in fp16, else an fp16 copy written now."""
    from safetensors import safe_open

    f = unet_file(src)
    with safe_open(str(f), framework="pt") as sf:
        dtypes = {sf.get_slice(k).get_dtype() for k in sf.keys()}
    if dtypes <= {"F16", "I64", "I32", "U8"}:
        return f
    from bonsai_core import checkpoint
    from diffusers import UNet2DConditionModel

    out = workdir / "unet_fp16"
    if not (out / checkpoint.WEIGHTS_NAME).exists():
        unet = UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float16)
        unet.save_pretrained(out, safe_serialization=True)
        del unet
    return out / checkpoint.WEIGHTS_NAME


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------- measuring one model
def measure(label: str, folder: Path, device: torch.device, dtype: torch.dtype, args) -> dict:
    from bonsai_core.config import BonsaiConfig
    from bonsai_core.engine import BonsaiImageEngine
    from bonsai_core.quant.layers import module_nbytes, quantized_layers

    free_memory(device)
    print(f"\n--- {label}: loading {folder} on {device} / {str(dtype).replace('torch.', '')}")
    with PeakMemory(device) as load_mem:
        t0 = time.perf_counter()
        engine = BonsaiImageEngine.from_pretrained(str(folder), device=str(device), dtype=dtype,
                                                   config=BonsaiConfig())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load_s = time.perf_counter() - t0
    fam = engine.family
    weights_resident = allocated(device)
    unet = fam.modules()["unet"]
    gen_kwargs = dict(steps=args.steps, guidance=args.guidance, width=args.size, height=args.size, seed=args.seed,
                      sampler=args.sampler, guardrail="warn")

    def generate(**over):
        cache = getattr(fam, "_prompt_cache", None)
        if cache is not None:
            cache.clear()  # time the text encoder too, as a first generation with a new prompt would
        return engine.generate(args.prompt, **{**gen_kwargs, **over})

    warm_steps = min(args.steps, 2) if args.short_warmup else args.steps
    for w in range(args.warmup):
        t0 = time.perf_counter()
        generate(steps=warm_steps)
        print(f"    warm-up generation {w + 1}/{args.warmup} ({warm_steps} steps): {time.perf_counter() - t0:.2f} s")
    print(f"    {args.repeats} timed generation(s) ...")
    runs, peaks, image = [], [], None
    for r in range(args.repeats):
        with PeakMemory(device) as gen_mem:
            t0 = time.perf_counter()
            res = generate()
            wall = time.perf_counter() - t0
        runs.append(dict(res.metadata["timings"], total_s=wall))  # the engine rounds to ms: keep our own
        peaks.append(gen_mem.result)
        image = res.tensor
        t = res.metadata["timings"]
        print(f"    run {r + 1}: total {fmt_s(t['total_s'])}, denoise {fmt_s(t['denoise_s'])} "
              f"({fmt_s(t['per_step_s'])}/step), peak {fmt_bytes(gen_mem.result['peak_bytes'])}")

    def med(key):
        vals = sorted(t[key] for t in runs)
        return vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2

    peak = max(peaks, key=lambda p: p["peak_bytes"] or 0)
    q = quantized_layers(unet)
    out = {
        "label": label, "folder": str(folder), "dtype": str(dtype).replace("torch.", ""),
        "load_s": load_s, "encode_s": med("encode_s"), "denoise_s": med("denoise_s"),
        "per_step_s": med("denoise_s") / args.steps, "decode_s": med("decode_s"), "total_s": med("total_s"),
        "runs": runs,
        "peak_bytes": peak["peak_bytes"], "peak_added_bytes": peak["added_bytes"], "peak_kind": peak["peak_kind"],
        "load_peak_bytes": load_mem.result["peak_bytes"], "load_added_bytes": load_mem.result["added_bytes"],
        "resident_after_load_bytes": weights_resident,
        "weight_bytes": fam.weight_bytes(), "unet_weight_bytes": module_nbytes(unet),
        "unet_quantized_layers": len(q),
        "image_finite": bool(torch.isfinite(image).all()), "image_mean": float(image.float().mean()),
    }
    if q:
        from bonsai_core.quant import kernels

        layer = next(iter(q.values()))
        probe = torch.zeros(1, getattr(layer, "in_features", 128), dtype=dtype, device=device)
        out["kernel"] = kernels.active(probe, layer.weight)
    unet = q = None  # noqa: F841 - drop our references before the engine frees its modules
    engine.unload()
    return out


# ------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--baseline-dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype of both runs; auto = fp16 on cuda/mps, fp32 on cpu")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (square)")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["dpmpp_2m", "euler"])
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (7.5: two UNet passes a step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--warmup", type=int, default=2, help="untimed generations per model before the timed ones")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per model (median reported)")
    p.add_argument("--short-warmup", action="store_true",
                   help="warm up with a 2-step generation instead of a full one (saves time on a CPU)")
    p.add_argument("--tiny", action="store_true", help="test-sized pipeline instead of SD1.5 shapes")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: --tiny --size 64 --steps 2 --warmup 1 --repeats 3 on the cpu")
    p.add_argument("--kernel", choices=["auto", "reference"], default=None,
                   help="sets BONSAI_KERNEL for the Bonsai run (default: leave the environment as it is)")
    p.add_argument("--workdir", help="folder for the pipelines (default: a temporary folder, removed after); "
                                     "an existing source pipeline there is reused")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--json", help="write the full result as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.tiny, args.size, args.steps, args.warmup, args.repeats, args.short_warmup = True, 64, 2, 1, 3, False
        if args.device == "auto":
            args.device = "cpu"
    if args.kernel:
        os.environ["BONSAI_KERNEL"] = args.kernel

    device = pick_device(args.device)
    if args.baseline_dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    else:
        dtype = DTYPES[args.baseline_dtype]
    info = machine_info(device, dtype)
    model_kind = "tiny test pipeline (tests/sd_fixtures.py)" if args.tiny else "SD1.5-shaped pipeline, random weights"
    print(header("bench_generate: Bonsai 1-bit vs full precision, one text-to-image generation", info))
    print(f"model   : {model_kind}")
    print(f"request : {args.size}x{args.size}, {args.steps} steps, {args.sampler}, guidance {args.guidance}, "
          f"seed {args.seed}, prompt {args.prompt!r}")

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bonsai_bench_"))
        workdir = tmp
    try:
        src = workdir / ("tiny_fp" if args.tiny else "sd15_fp16")
        dst = workdir / ("tiny_bonsai" if args.tiny else "sd15_bonsai")
        if (src / "model_index.json").exists():
            print(f"\nreusing source pipeline {src}")
        else:
            print(f"\nwriting source pipeline {src}")
            if src.exists():
                shutil.rmtree(src)
            write_tiny_pipeline(src, args.seed) if args.tiny else write_sd15_pipeline(src, args.seed)
        from bonsai_core.convert import convert_pipeline

        print(f"converting to Bonsai {dst}")
        t0 = time.perf_counter()
        conv = convert_pipeline(src, dst, overwrite=True, log=lambda m: print("  " + m))
        convert_s = time.perf_counter() - t0
        unet_report = conv.reports.get("unet")

        f16 = fp16_unet_file(src, workdir)
        sizes = {"fp16_unet_file": str(f16), "fp16_unet_file_bytes": f16.stat().st_size,
                 "bonsai_unet_file": str(unet_file(dst)), "bonsai_unet_file_bytes": unet_file(dst).stat().st_size,
                 "source_folder_bytes": folder_bytes(src), "bonsai_folder_bytes": folder_bytes(dst)}
        sizes["unet_file_ratio"] = sizes["bonsai_unet_file_bytes"] / sizes["fp16_unet_file_bytes"]

        results = {"baseline": measure("baseline", src, device, dtype, args)}
        free_memory(device)  # the baseline is gone before the Bonsai model loads
        results["bonsai"] = measure("bonsai", dst, device, dtype, args)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"work folder kept: {tmp}")

    b, q = results["baseline"], results["bonsai"]
    dname = str(dtype).replace("torch.", "")
    print("\n" + "=" * 100)
    print(f"RESULTS  ({device}, {dname}; {args.size}x{args.size}, {args.steps} steps {args.sampler}, "
          f"CFG {args.guidance}; "
          f"times are medians of {args.repeats} after {args.warmup} warm-up(s))")
    rows = []
    keys = [("load", "load_s", fmt_s), ("encode (text)", "encode_s", fmt_s), ("denoise", "denoise_s", fmt_s),
            ("per step", "per_step_s", fmt_s), ("decode (VAE)", "decode_s", fmt_s),
            ("total generate", "total_s", fmt_s),
            ("peak memory (generate)", "peak_bytes", fmt_bytes),
            ("  added during generate", "peak_added_bytes", fmt_bytes),
            ("peak memory (load)", "load_peak_bytes", fmt_bytes),
            ("weights, all modules", "weight_bytes", fmt_bytes), ("weights, UNet", "unet_weight_bytes", fmt_bytes)]
    for name, key, fmt in keys:
        rows.append([name, fmt(b[key]), fmt(q[key]), fmt_ratio(ratio(q[key], b[key]))])
    print(table(["measure", f"baseline ({dname})", f"bonsai 1-bit ({dname})", "bonsai / baseline"], rows))
    print(f"\npeak memory is {b['peak_kind']}" + ("; on a CPU it counts the whole process, so compare the "
                                                  "'added' rows" if device.type == "cpu" else ""))
    print(f"bonsai kernel: {q.get('kernel', 'n/a')}   UNet layers quantized: {q['unet_quantized_layers']}   "
          f"images finite: baseline {b['image_finite']}, bonsai {q['image_finite']}")
    print(f"conversion: {fmt_s(convert_s)}" + (f", UNet in memory 1/{1 / unet_report.ratio:.2f} of fp16 "
                                             f"(plan ratio {unet_report.ratio:.4f})" if unet_report else ""))
    print("\nFILE SIZES (real files on disk)")
    print(table(["file", "bytes", "size"], [
        ["fp16 UNet   " + Path(sizes["fp16_unet_file"]).name, f"{sizes['fp16_unet_file_bytes']:,}",
         fmt_bytes(sizes["fp16_unet_file_bytes"])],
        ["Bonsai UNet " + Path(sizes["bonsai_unet_file"]).name, f"{sizes['bonsai_unet_file_bytes']:,}",
         fmt_bytes(sizes["bonsai_unet_file_bytes"])],
        ["source pipeline folder", f"{sizes['source_folder_bytes']:,}", fmt_bytes(sizes["source_folder_bytes"])],
        ["Bonsai pipeline folder", f"{sizes['bonsai_folder_bytes']:,}", fmt_bytes(sizes["bonsai_folder_bytes"])],
    ]))
    r = sizes["unet_file_ratio"]
    print(f"Bonsai UNet file / fp16 UNet file = {r:.4f} (1/{1 / r:.2f}); README claim <= 1/8 (0.125): "
          f"{'met' if r <= 0.125 else 'NOT met'}")
    if args.tiny:
        print("(tiny model: many layers are kept in 16-bit or are small, so the file ratio is far from SD1.5's)")

    write_json(args.json, {
        "benchmark": "bench_generate", "command": command_line(), "machine": info,
        "settings": {"model": model_kind, "size": args.size, "steps": args.steps, "sampler": args.sampler,
                     "guidance": args.guidance, "seed": args.seed, "prompt": args.prompt, "repeats": args.repeats,
                     "warmup": args.warmup, "short_warmup": args.short_warmup,
                     "dtype": dname, "quick": args.quick, "tiny": args.tiny},
        "convert_s": convert_s, "unet_plan_ratio_vs_fp16": None if unet_report is None else unet_report.ratio,
        "file_sizes": sizes, "baseline": b, "bonsai": q,
        "ratios_bonsai_over_baseline": {k: ratio(q[k], b[k]) for _, k, _ in keys},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
