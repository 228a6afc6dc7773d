"""Bonsai Image 4B whole, with its Qwen3 text encoder at 4 bits (issue 23), beside the bf16 text encoder.

Random weights at full size (klein-4B transformer packed Q1_0, a Qwen3-4B-shaped text encoder, the
FLUX.2 VAE), written once by ``bench_klein_image.write_pipelines`` (Bonsai folder, text encoder bf16)
and a second Bonsai folder whose text encoder is Q4_AFFINE (every linear round-to-nearest per group
of 64, as ``bonsai convert --quantize-text-encoder`` makes it; with ``--embedding q4``, the default,
the tied embedding too, as the public MLX payload holds it). Each run is ``BonsaiImageEngine`` as a
user runs it: a warm-up image, then timed images with a new prompt each (so the text encoder runs
every time), peak GPU memory from ``torch.cuda.max_memory_allocated`` over the whole image (encode,
4 steps, decode) and each phase's own peak (the engine's ``phase_peak_bytes``: the allocator's peak is
reset as each phase begins). Runs:

* bf16 text encoder, 1024^2, the default budget (6 GiB: the 8 GB text encoder is parked in host
  memory and lent per prompt, the pipeline as it was);
* 4-bit text encoder, 1024^2 and 512^2, the default budget (the placement decides; resident when it fits);
* 4-bit text encoder, 1024^2, ``--max-vram 4`` (BONSAI_MAX_VRAM_GB=4), and with an unconstrained budget;
* 4-bit text encoder resident (unconstrained budget), 1024^2, the VAE decode forced into 256^2 tiles
  (``BONSAI_VAE_TILE``): what the resident peak is when the decode is tiled (``--max-vram 3`` would
  not show it: the memory estimate parks the encoder under it); then the same, and at 512^2, with
  the steps eager (``BONSAI_CUDA_GRAPH=0``: a CUDA graph's private pool holds a second step's
  activations). The column "VAE tile" says how each run decoded (``auto`` tiles when the whole
  decode's estimate is over a budget you set, or the card's memory);
* prompt embeddings of the 4-bit encoder against the bf16 one: cosine similarity per token.

    python benchmarks/bench_te4bit.py --device cuda --json benchmarks/results/h200/te4bit.json
    python benchmarks/bench_te4bit.py --quick          # tiny config on the CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_klein_image import write_pipelines  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DTYPES, command_line, fmt_bytes, fmt_ratio, fmt_s, free_memory, header, machine_info, pick_device, ratio, table,
    write_json,
)

VAE_TILE_ENV = "BONSAI_VAE_TILE"  # bonsai_core.families.base.VAE_TILE_ENV (not imported here: the engine loads late)
GRAPH_ENV = "BONSAI_CUDA_GRAPH"  # bonsai_core.cuda_graph
PROMPTS = ("a bonsai tree on a cliff at sunrise", "a red fox in deep snow, telephoto",
           "an old fisherman mending a net, 35mm photo", "a glass teapot on a wooden table, soft light")


def write_q4_text_encoder(bf16_folder: Path, out: Path, device, embedding: str) -> dict:
    """``out`` = ``bf16_folder`` with its text encoder made Q4_AFFINE (quantized on ``device``)."""
    from transformers import Qwen3ForCausalLM

    from bonsai_core import checkpoint
    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import text_encoder_policy
    from bonsai_core.quant.tensor import Q4Tensor

    shutil.copytree(bf16_folder, out)
    te_dir = out / "text_encoder"
    te = Qwen3ForCausalLM.from_pretrained(te_dir, torch_dtype=torch.bfloat16).to(device).eval()
    policy = text_encoder_policy()
    report = quantize_model(te, policy, reference_dtype=torch.bfloat16)
    if embedding == "q4":  # as the public MLX payload: the tied embedding 4-bit too (rows expanded when looked up)
        emb = te.model.embed_tokens
        emb.weight = torch.nn.Parameter(Q4Tensor.from_float(emb.weight.detach(), torch.bfloat16), requires_grad=False)
        te.tie_weights()
    te.to("cpu")
    tensors, reasons = checkpoint.model_tensors(te)
    for f in te_dir.glob("*.safetensors"):
        f.unlink()
    checkpoint.save_tensors(te_dir / checkpoint.TE_WEIGHTS_NAME, tensors, family="flux2_klein",
                            component="text_encoder", policy=policy.to_dict(), reasons=reasons,
                            tied=checkpoint.tied_names(te))
    quantized = sum(layer.quantized for layer in report.layers)
    del te, tensors
    free_memory(device)
    return {"layers_q4": quantized, "embedding": embedding,
            "file_bytes": (te_dir / checkpoint.TE_WEIGHTS_NAME).stat().st_size}


def run(folder: Path, device, size: int, steps: int, repeats: int, seed: int, max_vram_gb: float | None,
        env: dict[str, str] | None = None) -> dict:
    """``env``: environment variables set for this run only (``BONSAI_VAE_TILE``, ``BONSAI_CUDA_GRAPH``)."""
    with patch.dict(os.environ, env or {}):
        return _run(folder, device, size, steps, repeats, seed, max_vram_gb)


def _run(folder: Path, device, size: int, steps: int, repeats: int, seed: int, max_vram_gb: float | None) -> dict:
    from bonsai_core.config import BonsaiConfig
    from bonsai_core.engine import BonsaiImageEngine

    free_memory(device)
    config = BonsaiConfig.from_env(max_vram_gb=max_vram_gb)
    t0 = time.perf_counter()
    eng = BonsaiImageEngine.from_pretrained(folder, device=str(device), config=config)
    eng.measure_phases = True  # each phase's own CUDA peak in the metadata
    load_s = time.perf_counter() - t0
    placement = getattr(eng.family, "te_placement", None)
    kw = dict(width=size, height=size, steps=steps, seed=seed, guardrail="warn")
    eng.generate("a warm-up prompt", **kw)
    runs = [eng.generate(f"{PROMPTS[i % len(PROMPTS)]}, take {i}", **kw).metadata for i in range(repeats)]
    eng.unload()
    del eng
    free_memory(device)
    totals = sorted(m["timings"]["total_s"] for m in runs)
    med = runs[[m["timings"]["total_s"] for m in runs].index(totals[len(totals) // 2])]
    return {"size": size, "max_vram_gb": config.max_vram_gb, "load_s": load_s, "timings": med["timings"],
            "total_s_all": totals, "peak_bytes": max(m["peak_bytes"] or 0 for m in runs), "peak_kind": med["peak_kind"],
            "phase_peak_bytes": phase_peaks(runs), "vae_tile": med.get("vae_tile"),
            "placement": None if placement is None else {"where": placement.where, "reason": placement.reason},
            "placement_after": runs[-1].get("text_encoder_placement"),
            "warnings": sorted({w for m in runs for w in m["guardrail"]["warnings"]})}


def phase_peaks(runs: list[dict]) -> dict:
    """Each phase's peak (the engine's ``phase_peak_bytes``: CUDA only, else None), the largest over the runs."""
    out = {}
    for phase in ("encode", "denoise", "decode"):
        seen = [m["phase_peak_bytes"][phase] for m in runs if m.get("phase_peak_bytes", {}).get(phase) is not None]
        out[phase] = max(seen) if seen else None
    return out


@torch.inference_mode()
def embedding_cosine(bf16_folder: Path, q4_folder: Path, device) -> dict:
    """Prompt embeddings (the klein hidden states, [1, 512, 3*hidden]) of both encoders: cosine per token,
    over the prompt's own tokens and over all 512 (padding included)."""
    from bonsai_core.config import BonsaiConfig
    from bonsai_core.engine import BonsaiImageEngine

    embs = {}
    n_tokens = []
    for name, folder in (("bf16", bf16_folder), ("q4", q4_folder)):
        eng = BonsaiImageEngine.from_pretrained(folder, device=str(device), config=BonsaiConfig.from_env(max_vram_gb=200))
        embs[name] = [eng.family.encode([p]).float().cpu() for p in PROMPTS]
        n_tokens = [eng.family.count_tokens(p) for p in PROMPTS]
        eng.unload()
        del eng
        free_memory(device)
    prompt_cos, all_cos = [], []
    for a, b, n in zip(embs["bf16"], embs["q4"], n_tokens):
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).flatten()
        prompt_cos.append(cos[:n])
        all_cos.append(cos)
    p, a = torch.cat(prompt_cos), torch.cat(all_cos)
    return {"prompts": len(PROMPTS), "prompt_tokens": int(p.numel()),
            "prompt_cos_min": float(p.min()), "prompt_cos_mean": float(p.mean()),
            "all_cos_min": float(a.min()), "all_cos_mean": float(a.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--config", default="klein-4b", choices=["klein-4b", "tiny"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding", default="q4", choices=["q4", "bf16"], help="the tied embedding 4-bit (as MLX) or bf16")
    p.add_argument("--unconstrained-gb", type=float, default=120.0, help="the budget of the unconstrained runs")
    p.add_argument("--workdir", default=None, help="where the model folders are written (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny config, 64/32 px, CPU: proves the script runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    big, small, tile_side = 1024, 512, 256
    if args.quick:
        args.config, args.repeats, big, small, tile_side = "tiny", 1, 64, 32, 32
        if args.device == "auto":
            args.device = "cpu"
    device = pick_device(args.device)
    info = machine_info(device, DTYPES["bf16"])
    print(header("bench_te4bit: Bonsai Image 4B whole with a 4-bit Qwen3 text encoder", info))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bonsai-te4bit-"))
    res: dict = {}
    try:
        t0 = time.perf_counter()
        _fp, bf16_folder = write_pipelines(root, args.config, device, DTYPES["bf16"], args.seed)
        q4_folder = root / "bonsai-te4"
        res["q4_text_encoder"] = write_q4_text_encoder(bf16_folder, q4_folder, device, args.embedding)
        print(f"wrote the pipelines in {fmt_s(time.perf_counter() - t0)} under {root}; 4-bit text encoder file "
              f"{fmt_bytes(res['q4_text_encoder']['file_bytes'])}")
        free = f"4-bit TE, {{0}}, --max-vram {args.unconstrained_gb:g}"
        # the last three: the encoder resident (a budget of 3 GiB would park it: the denoise phase's estimate
        # with it is over 0.95 x 3 GiB) and the decode forced into tiles (an unconstrained budget never tiles);
        # then also without the CUDA graph, whose private pool holds a second step's activations
        tile, eager = {VAE_TILE_ENV: str(tile_side)}, {VAE_TILE_ENV: str(tile_side), GRAPH_ENV: "0"}
        plan = [("bf16 TE, {0}", bf16_folder, big, None, None),
                ("4-bit TE, {0}", q4_folder, big, None, None),
                ("4-bit TE, {0}", q4_folder, small, None, None),
                ("4-bit TE, {0}, --max-vram 4", q4_folder, big, 4.0, None),
                (free, q4_folder, big, args.unconstrained_gb, None),
                (free + f", {VAE_TILE_ENV}={tile_side}", q4_folder, big, args.unconstrained_gb, tile),
                (free + f", {VAE_TILE_ENV}={tile_side}, {GRAPH_ENV}=0", q4_folder, big, args.unconstrained_gb, eager),
                (free + f", {VAE_TILE_ENV}={tile_side}, {GRAPH_ENV}=0", q4_folder, small, args.unconstrained_gb, eager)]
        runs = []
        for label, folder, size, budget, env in plan:
            label = label.format(f"{size}x{size}")
            print(f"\n{label}: {args.steps} steps, median of {args.repeats} images ...")
            r = run(folder, device, size, args.steps, args.repeats, args.seed, budget, env)
            r["label"] = label
            runs.append(r)
            t = r["timings"]
            ph = r["phase_peak_bytes"]
            print(f"  total {fmt_s(t['total_s'])} (encode {fmt_s(t['encode_s'])}, denoise {fmt_s(t['denoise_s'])}, "
                  f"decode {fmt_s(t['decode_s'])}), peak {fmt_bytes(r['peak_bytes'])} (encode "
                  f"{fmt_bytes(ph['encode'])}, denoise {fmt_bytes(ph['denoise'])}, decode {fmt_bytes(ph['decode'])}), "
                  f"text encoder {r['placement']['where'] if r['placement'] else 'on the CPU run'}, VAE "
                  + (f"in {r['vae_tile']} px tiles" if r["vae_tile"] else "whole"))
        res["runs"] = runs
        print("\nprompt embeddings, 4-bit vs bf16 ...")
        res["embedding_cosine"] = embedding_cosine(bf16_folder, q4_folder, device)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    base = res["runs"][0]
    rows = [[r["label"], fmt_s(r["timings"]["encode_s"]), fmt_s(r["timings"]["total_s"]),
             fmt_ratio(ratio(r["timings"]["total_s"], base["timings"]["total_s"])), fmt_bytes(r["peak_bytes"]),
             *(fmt_bytes(r["phase_peak_bytes"][k]) for k in ("encode", "denoise", "decode")),
             r["placement"]["where"] if r["placement"] else "-", r["vae_tile"] or "whole"] for r in res["runs"]]
    print("\n" + table(["run", "encode", "total", "total / bf16 TE", "peak", "encode peak", "denoise peak",
                         "decode peak", "text encoder", "VAE tile"], rows, "<>>>>>>><>"))
    print(f"budget: --max-vram as labelled, else BONSAI_MAX_VRAM_GB or the default ({base['max_vram_gb']:g} GiB)")
    c = res["embedding_cosine"]
    print(f"cosine per token, 4-bit vs bf16 text encoder: prompt tokens min {c['prompt_cos_min']:.5f} mean "
          f"{c['prompt_cos_mean']:.5f} ({c['prompt_tokens']} tokens, {c['prompts']} prompts); all 512 positions "
          f"min {c['all_cos_min']:.5f} mean {c['all_cos_mean']:.5f}")
    print(f"peak: {base['peak_kind']}, over the whole image (encode + {args.steps} steps + decode); each phase's own "
          "peak beside it (CUDA only: the allocator's peak is reset as each phase begins)")
    write_json(args.json, {"benchmark": "bench_te4bit", "command": command_line(), "machine": info,
                           "settings": vars(args), **res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
