"""A whole FLUX.2 [klein] image through the engine, Bonsai 1-bit beside the same pipeline in bf16.

Issue 11: "a whole 1024^2 image (4 steps, encode and decode included) timed beside the same
pipeline in bf16". Random weights at full size (klein-4B transformer, a Qwen3-4B-shaped text
encoder, the FLUX.2 VAE), written once as a full-precision pipeline folder (bf16) and as a Bonsai
folder (transformer quantized on the device, Q1_0). Both are run by ``BonsaiImageEngine`` with the
same prompt, seed and size: a warm-up image (triton autotune, CUDA-graph capture, first prompt
encode), then timed images, each with a new prompt so the text encoder runs every time.

    python benchmarks/bench_klein_image.py --device cuda --size 1024 --json out.json
    python benchmarks/bench_klein_image.py --quick          # tiny config on the CPU, a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DTYPES, build_random_transformer, command_line, config_for, fmt_bytes, fmt_ratio, fmt_s, free_memory, header,
    machine_info, pick_device, ratio, table, write_json,
)

QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=True, max_position_embeddings=40960)
QWEN3_TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True)


@torch.no_grad()
def _randomize(model, device, dtype, seed):
    import math

    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif "norm" in name or name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    for name, b in model.named_buffers():
        if "running_var" in name:
            b.fill_(1.0)
        elif b.is_floating_point():
            b.zero_()
    return model.eval()


def write_pipelines(root: Path, config_name: str, device, dtype, seed: int) -> tuple[Path, Path]:
    """Full-precision folder ``root/bf16`` and Bonsai folder ``root/bonsai`` with the same weights."""
    from diffusers import AutoencoderKLFlux2

    from bonsai_core import checkpoint
    from bonsai_core.importers.assemble import DEFAULT_SCHEDULER_CONFIG
    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import default_policy
    from tests.klein_fixtures import make_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fp, bq = root / "bf16", root / "bonsai"
    for d in (fp, bq):
        d.mkdir(parents=True)
    tcfg = config_for(config_name)
    if config_name != "klein-4b":  # the prompt embedding is 3 stacked hidden states of the text encoder
        tcfg["joint_attention_dim"] = 3 * QWEN3_TINY["hidden_size"]
    transformer = build_random_transformer(tcfg, device, dtype, seed)
    transformer.save_pretrained(fp / "transformer", safe_serialization=True)
    quantize_model(transformer, default_policy("flux2_klein"))
    tensors, reasons = checkpoint.model_tensors(transformer)
    checkpoint.save_tensors(bq / "transformer" / checkpoint.WEIGHTS_NAME, tensors, family="flux2_klein",
                            component="transformer", policy=default_policy("flux2_klein").to_dict(), reasons=reasons)
    shutil.copy2(fp / "transformer" / "config.json", bq / "transformer" / "config.json")
    del transformer, tensors
    free_memory(device)

    qcfg = QWEN3_4B if config_name == "klein-4b" else QWEN3_TINY
    with torch.device("meta"):
        te = Qwen3ForCausalLM(Qwen3Config(**qcfg))
    te = _randomize(te, device, dtype, seed + 1)
    te.tie_weights()  # Qwen3-4B ties lm_head to the embedding; to_empty broke the tie
    te.save_pretrained(fp / "text_encoder", safe_serialization=True)
    del te
    free_memory(device)

    vae_kwargs = {} if config_name == "klein-4b" else dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    with torch.device("meta"):
        vae = AutoencoderKLFlux2(**vae_kwargs)
    vae = _randomize(vae, device, dtype, seed + 2)
    vae.save_pretrained(fp / "vae", safe_serialization=True)
    del vae
    free_memory(device)

    make_tokenizer(fp / "tokenizer")
    (fp / "scheduler").mkdir()
    (fp / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEFAULT_SCHEDULER_CONFIG))
    index = {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1", "is_distilled": True,
             "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
             "vae": ["diffusers", "AutoencoderKLFlux2"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (fp / "model_index.json").write_text(json.dumps(index, indent=2))
    if config_name != "klein-4b":
        (fp / "bonsai.json").write_text(json.dumps({"text_encoder_out_layers": [1, 2, 3]}))
    for part in ("text_encoder", "vae", "tokenizer", "scheduler"):
        shutil.copytree(fp / part, bq / part)
    for f in fp.glob("*.json"):
        shutil.copy2(f, bq / f.name)
    bindex = dict(index, _bonsai={"format_version": checkpoint.FORMAT_VERSION, "family": "flux2_klein",
                                  "quantized": ["transformer"]})
    (bq / "model_index.json").write_text(json.dumps(bindex, indent=2))
    return fp, bq


def run_model(folder: Path, device, size: int, steps: int, repeats: int, seed: int) -> dict:
    from bonsai_core.engine import BonsaiImageEngine

    free_memory(device)
    t0 = time.perf_counter()
    eng = BonsaiImageEngine.from_pretrained(folder, device=str(device))
    load_s = time.perf_counter() - t0
    weights = eng.family.weight_bytes()
    kw = dict(width=size, height=size, steps=steps, seed=seed, guardrail="warn")
    eng.generate("a warm-up prompt", **kw)  # autotune, graph capture, allocator warm-up
    runs = []
    for i in range(repeats):
        r = eng.generate(f"a bonsai tree on a cliff, variation {i}", **kw)  # a new prompt: encode runs
        runs.append(r.metadata)
    eng.unload()
    del eng
    free_memory(device)
    totals = sorted(m["timings"]["total_s"] for m in runs)
    med = runs[[m["timings"]["total_s"] for m in runs].index(totals[len(totals) // 2])]
    return {"load_s": load_s, "weights_on_device_bytes": weights, "dtype": med["dtype"], "timings": med["timings"],
            "total_s_all": totals, "peak_bytes": max(m["peak_bytes"] or 0 for m in runs), "peak_kind": med["peak_kind"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--config", default="klein-4b", choices=["klein-4b", "tiny"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the two model folders are written (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny config, 64 px, CPU: proves the script runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.size, args.repeats = "tiny", 64, 1
        if args.device == "auto":
            args.device = "cpu"
    device = pick_device(args.device)
    dtype = DTYPES["bf16"]
    info = machine_info(device, dtype)
    print(header("bench_klein_image: a whole FLUX.2 klein image, Bonsai 1-bit vs the same pipeline in bf16", info))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bonsai-klein-image-"))
    try:
        t0 = time.perf_counter()
        fp, bq = write_pipelines(root, args.config, device, dtype, args.seed)
        print(f"wrote both pipelines in {fmt_s(time.perf_counter() - t0)} under {root}")
        res = {}
        for name, folder in (("bf16", fp), ("bonsai", bq)):
            print(f"\n{name}: {args.size}x{args.size}, {args.steps} steps, median of {args.repeats} images ...")
            res[name] = run_model(folder, device, args.size, args.steps, args.repeats, args.seed)
            t = res[name]["timings"]
            print(f"  total {fmt_s(t['total_s'])} (encode {fmt_s(t['encode_s'])}, denoise {fmt_s(t['denoise_s'])}, "
                  f"decode {fmt_s(t['decode_s'])}), peak {fmt_bytes(res[name]['peak_bytes'])}, "
                  f"weights on device while denoising {fmt_bytes(res[name]['weights_on_device_bytes'])}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    a, b = res["bf16"], res["bonsai"]
    rows = [[k, fmt_s(a["timings"][k + "_s"]), fmt_s(b["timings"][k + "_s"]),
             fmt_ratio(ratio(b["timings"][k + "_s"], a["timings"][k + "_s"]))]
            for k in ("encode", "denoise", "decode", "total")]
    rows.append(["peak memory", fmt_bytes(a["peak_bytes"]), fmt_bytes(b["peak_bytes"]), fmt_ratio(ratio(b["peak_bytes"], a["peak_bytes"]))])
    rows.append(["weights on device (denoising)", fmt_bytes(a["weights_on_device_bytes"]),
                 fmt_bytes(b["weights_on_device_bytes"]),
                 fmt_ratio(ratio(b["weights_on_device_bytes"], a["weights_on_device_bytes"]))])
    print("\n" + table(["measure", "bf16 pipeline", "Bonsai 1-bit", "Bonsai / bf16"], rows, "<>>>"))
    print(f"peak: {a['peak_kind']}; the text encoder moves to the device only to encode (both pipelines)")
    write_json(args.json, {"benchmark": "bench_klein_image", "command": command_line(), "machine": info,
                           "settings": vars(args), "bf16": a, "bonsai": b})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
