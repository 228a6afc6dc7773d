"""The memory guardrail's estimate beside the measured peak of whole generations.

Issue 17: the estimate (``guardrails.MemoryModel``, built by each family from its modules) must
be within +-25% of the measured peak for SD1.5 at 512², SDXL at 1024² and klein-4B at 512² and
1024². For each model this script:

  1. writes a random-weight pipeline of the real shapes (SD1.5: ``bench_generate.write_sd15_pipeline``;
     SDXL: the SDXL 1.0 UNet, CLIP-L and CLIP-bigG text encoders and VAE shapes, written below;
     klein-4B: ``bench_klein_image.write_pipelines``) and converts it to Bonsai in the run
     (``bonsai_core.convert_pipeline``; klein's transformer is quantized as bench_klein_image does);
  2. loads the Bonsai folder with ``BonsaiImageEngine`` and generates two images at the size (the
     first also captures the CUDA graph, the second encodes a new prompt, so the lent text encoder
     is counted), measuring over both: on CUDA the allocator's ``max_memory_reserved`` (what the
     card really holds: the graph pool and the cache included) and ``max_memory_allocated``; on a
     CPU the growth of the resident high-water mark (the weights were resident before), with a
     fixed glibc mmap threshold so that freed blocks leave the resident set at once;
  3. prints the estimate beside the measurement, and the ratio.

    python benchmarks/bench_memory_estimate.py --device cuda --out out/memory_estimate.json
    python benchmarks/bench_memory_estimate.py --device cpu --tiny --out /tmp/mem.json   # test-size models
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MMAP_VAR = "MALLOC_MMAP_THRESHOLD_"
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"] and MMAP_VAR not in os.environ:
    # glibc reads this at start-up only: run again with it, so the CPU's resident peak means what was alive
    os.environ[MMAP_VAR] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from common import (DTYPES, command_line, fmt_bytes, fmt_s, free_memory, header, machine_info,  # noqa: E402
                    pick_device, table, write_json)

PROMPTS = ("a bonsai tree on a rock, digital painting", "a lantern in the rain at night, film photograph")

# name -> (sizes, sizes with --tiny)
CASES = {"sd15": ((512,), (256,)), "sdxl": ((1024,), (256,)), "klein-4b": ((512, 1024), (128, 256))}

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=1024)


@torch.no_grad()
def _random(model, device, seed: int):
    """Random normal weights (1/sqrt(fan-in)) on ``device``, fast for billions of parameters."""
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif "norm" in name or name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    for name, b in model.named_buffers():  # to_empty left buffers uninitialized
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
        elif b.is_floating_point():
            b.zero_()
    return model.eval()


def write_sdxl_pipeline(folder: Path, device, seed: int = 0) -> Path:
    """A random-weight StableDiffusionXLPipeline folder with SDXL 1.0's shapes (fp16, as SDXL ships);
    the tokenizers are the tests' tiny byte-level CLIP tokenizer (vocabulary ~520 instead of 49408)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.sd_fixtures import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(folder / "tokenizer")
    tiny_clip_tokenizer(folder / "tokenizer_2")
    parts = [("unet", lambda: UNet2DConditionModel(**SDXL_UNET)),
             ("vae", lambda: AutoencoderKL(**SD_VAE, scaling_factor=0.13025, force_upcast=True))]
    for name, cls, cfg in (("text_encoder", CLIPTextModel, CLIP_L),
                           ("text_encoder_2", CLIPTextModelWithProjection, CLIP_BIG_G)):
        conf = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **cfg)
        parts.append((name, lambda cls=cls, conf=conf: cls(conf)))
    for i, (name, make) in enumerate(parts):
        with torch.device("meta"):
            model = make()
        model = _random(model, device, seed + i).to(torch.float16)
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
        free_memory(device)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_model(name: str, root: Path, device, tiny: bool) -> Path:
    """The Bonsai folder of one case, converted in this run."""
    from bonsai_core.convert import convert_pipeline

    fp = root / f"{name}-fp"
    if name == "sd15":
        if tiny:
            from tests.sd_fixtures import make_tiny_sd_pipeline

            make_tiny_sd_pipeline(fp)
        else:
            from bench_generate import write_sd15_pipeline

            write_sd15_pipeline(fp, log=lambda m: None)
    elif name == "sdxl":
        if tiny:
            from tests.sd_fixtures import make_tiny_sdxl_pipeline

            make_tiny_sdxl_pipeline(fp)
        else:
            write_sdxl_pipeline(fp, device)
    else:
        from bench_klein_image import write_pipelines

        _, bonsai = write_pipelines(root / name, "tiny" if tiny else "klein-4b", device, DTYPES["bf16"], 0)
        return bonsai
    dst = root / f"{name}-bonsai"
    convert_pipeline(fp, dst, log=lambda m: None)
    shutil.rmtree(fp)
    return dst


class DevicePeak:
    """Peak over a region: CUDA reserved and allocated bytes, or a CPU's resident high-water mark growth."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = self._rss("VmRSS")
        return self

    @staticmethod
    def _rss(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return None

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = {"reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                           "allocated_bytes": int(torch.cuda.max_memory_allocated(self.device))}
        else:
            self.result = {"added_rss_bytes": self._rss("VmHWM") - self.start}


def measure(folder: Path, device, size: int) -> dict:
    from bonsai_core.engine import BonsaiImageEngine
    from bonsai_core.guardrails import ALLOCATOR_SLACK

    free_memory(device)
    eng = BonsaiImageEngine.from_pretrained(folder, device=str(device))
    fam = eng.family
    kw = dict(width=size, height=size, seed=0, guardrail="warn", max_side=max(size, 64), steps=4)
    if device.type == "cpu":  # the allocator's first touches stay out of the CPU number
        eng.generate("warm up", **dict(kw, width=64, height=64, steps=1))
    free_memory(device)
    with DevicePeak(device) as peak:
        t0 = time.perf_counter()
        runs = [eng.generate(p, **kw).metadata for p in PROMPTS]
        seconds = time.perf_counter() - t0
    model = fam.memory_model(cfg=runs[-1]["cfg"])
    phases = model.phases(size, size, 1)
    estimate = runs[-1]["estimate_bytes"]
    out = {"size": size, "family": fam.name, "dtype": runs[-1]["dtype"], "steps": kw["steps"], "cfg": runs[-1]["cfg"],
           "estimate_bytes": estimate, "phases_bytes": phases, "resident_bytes": model.resident_bytes,
           "lent_bytes": model.lent_bytes, "unpacked_bytes": model.unpacked_bytes, "graph_pool": model.graph_pool,
           "engine_peak_bytes": [m["peak_bytes"] for m in runs], "seconds": seconds, **peak.result}
    if device.type == "cuda":
        out["measured_bytes"], out["compared"] = peak.result["reserved_bytes"], estimate
    else:  # the weights were resident before the generations: compare what was added
        out["measured_bytes"] = peak.result["added_rss_bytes"]
        out["compared"] = int(estimate / ALLOCATOR_SLACK - model.resident_bytes)
    out["ratio"] = out["compared"] / out["measured_bytes"] if out["measured_bytes"] else None
    eng.unload()
    del eng
    free_memory(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny models at small sizes (proves the script)")
    p.add_argument("--models", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--workdir", default=None, help="where the model folders are written (default: a temp dir)")
    p.add_argument("--out", "--json", dest="out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    info = machine_info(device, None)
    print(header("bench_memory_estimate: the guardrail's memory estimate beside the measured peak", info))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bonsai-memory-"))
    results = []
    try:
        for name in args.models.split(","):
            sizes = CASES[name][1 if args.tiny else 0]
            t0 = time.perf_counter()
            folder = write_model(name, root, device, args.tiny)
            print(f"{name}: written and converted in {fmt_s(time.perf_counter() - t0)}")
            for size in sizes:
                r = measure(folder, device, size)
                r["model"] = name
                results.append(r)
                print(f"  {size}²: estimate {fmt_bytes(r['compared'])}, measured {fmt_bytes(r['measured_bytes'])} "
                      f"(ratio {r['ratio']:.2f})")
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    what = ("CUDA max_memory_reserved over two generations" if device.type == "cuda"
            else "growth of the resident high-water mark over two generations (estimate less the resident weights)")
    rows = [[r["model"], f"{r['size']}²", r["dtype"], fmt_bytes(r["compared"]), fmt_bytes(r["measured_bytes"]),
             f"{r['ratio']:.2f}", "yes" if r["ratio"] and 0.75 <= r["ratio"] <= 1.25 else "NO"] for r in results]
    print("\n" + table(["model", "size", "dtype", "estimate", "measured", "estimate / measured", "within 25%"],
                       rows, "<<<>>>>"))
    print(f"measured: {what}")
    write_json(args.out, {"benchmark": "bench_memory_estimate", "command": command_line(), "machine": info,
                          "settings": vars(args), "measured": what, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
