"""Whole-model denoiser steps in the same mode: dense against 1-bit, both eager and both CUDA-graphed.

Issue 20's step table. One process, one GPU, one run: each model is built with random weights in
its usual dtype (klein-4B bf16, SD1.5 and SDXL UNets fp16), timed dense, then quantized in place
with the family's default policy and timed again with each named kernel (``BONSAI_KERNEL``) and
activation precision (``BONSAI_ACT``). Every variant is timed eager and as a CUDA graph
(``bonsai_core.cuda_graph.GraphedStep``, what the families run on CUDA), so each ratio compares
like with like: graph with graph, eager with eager.

For 8-bit activations it also reports the error against the 16-bit-activation step of the same
1-bit model: the relative L2 error of one step's output, and for klein-4B the PSNR of the final
latent of the 4-step Euler loop (random weights: a latent, not an image; ``bench_w1a8_images.py``
measures images of the shipped model).

    python3 benchmarks/bench_step_modes.py --models klein-4b,sd15,sdxl --kernels triton,w1 \
        --acts 16,fp8,int8 --json benchmarks/results/h200/step_modes.json
    python3 benchmarks/bench_step_modes.py --quick     # tiny shapes: proves the script (CUDA, or
                                                       # the CPU: eager only, 16-bit activations)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (build_random_transformer, config_for, free_memory, machine_info, make_inputs,  # noqa: E402
                    time_fn, write_json)

import torch  # noqa: E402

SIZES = {"klein-4b": (512, 1024), "sd15": (512, 1024), "sdxl": (1024, 512)}


def build(name: str, device, quick: bool):
    """(model, dtype, family, make_call): make_call(size) -> (fn(**tensors), tensors)."""
    if name == "klein-4b":
        config = config_for("tiny" if quick else "klein-4b")
        dtype = torch.bfloat16
        model = build_random_transformer(config, device, dtype)

        def make_call(size):
            inp = make_inputs(config, size, 64 if quick else 512, device, dtype)

            def fn(hidden_states, timestep):
                return model(hidden_states=hidden_states, encoder_hidden_states=inp["encoder_hidden_states"],
                             timestep=timestep, img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=None,
                             return_dict=False)[0]

            return fn, {"hidden_states": inp["noise"].to(dtype),
                        "timestep": torch.full((1,), 0.9, device=device, dtype=dtype)}, inp

        return model, dtype, "flux2_klein", make_call
    from diffusers import UNet2DConditionModel

    from bench_memory_estimate import SDXL_UNET, _random
    from tests.sd_fixtures import SD15_UNET_CONFIG, TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG

    if name == "sd15":
        cfg = TINY_UNET_CONFIG if quick else SD15_UNET_CONFIG
    else:
        cfg = TINY_SDXL_UNET_CONFIG if quick else SDXL_UNET
    dtype = torch.float16
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet = _random(unet, device, 0).to(dtype).requires_grad_(False)
    ctx = cfg.get("cross_attention_dim", 768)
    xl = cfg.get("addition_embed_type") == "text_time"

    def make_call(size):
        g = torch.Generator("cpu").manual_seed(0)
        side = size // 8
        tensors = {"sample": torch.randn(2, 4, side, side, generator=g).to(device, dtype),  # CFG: batch 2
                   "timestep": torch.tensor(500.0, device=device),
                   "encoder_hidden_states": torch.randn(2, 77, ctx, generator=g).to(device, dtype)}
        if xl:
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            tensors["text_embeds"] = torch.randn(2, pooled, generator=g).to(device, dtype)
            tensors["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)

        def fn(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}} if xl else {}
            return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]

        return fn, tensors, None

    return unet, dtype, "sd_unet", make_call


def timed(fn, tensors, device, graph: bool, args) -> tuple[float, torch.Tensor]:
    from bonsai_core.cuda_graph import GraphedStep

    call = GraphedStep(fn) if graph else fn
    with torch.inference_mode():
        out = call(**tensors).float()
        t = time_fn(lambda: call(**tensors), device, warmup=args.warmup, repeats=args.repeats)
    return t["median_s"], out


def klein_loop(fn, tensors, inp, device, dtype) -> torch.Tensor:
    from bonsai_core import sampling

    sched = sampling.flow_schedule(4, inp["image_seq_len"], {"use_dynamic_shifting": True, "shift": 3.0})

    def denoise(x, i):
        t = sampling.model_timestep(sched, i).reshape(1).to(device=device, dtype=dtype)
        return sampling.to_x0(sched, x, fn(hidden_states=x.to(dtype), timestep=t).float(), i)

    with torch.inference_mode():
        return sampling.sample(denoise, inp["noise"] * sampling.initial_noise_scale(sched), sched, sampler="euler")


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((a - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def set_choice(kernel: str, act: str) -> None:
    from bonsai_core.quant import kernels

    os.environ["BONSAI_KERNEL"] = kernel
    os.environ["BONSAI_ACT"] = act
    kernels.reload()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="klein-4b,sd15,sdxl")
    p.add_argument("--kernels", default="triton,w1", help="BONSAI_KERNEL values to time the 1-bit model with")
    p.add_argument("--acts", default="16,fp8,int8", help="BONSAI_ACT values (8-bit only with kernels that take them)")
    p.add_argument("--sizes", default=None, help="override every model's sizes, e.g. 512,1024")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print("needs a CUDA device (--quick runs tiny shapes on the CPU)")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graphs = (False, True) if device.type == "cuda" else (False,)
    if device.type == "cpu":
        args.kernels, args.acts = "auto", "16"
    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import default_policy

    info = machine_info(device)
    info["git_commit"] = info.get("git_commit") or os.environ.get("BENCH_GIT_COMMIT")
    print(f"# {info.get('gpu')} torch {torch.__version__} commit {info['git_commit']}; {' '.join(sys.argv)}")
    results = []
    for name in args.models.split(","):
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES[name])
        if args.quick:
            sizes = [128]
        set_choice("auto", "16")
        model, dtype, family, make_call = build(name, device, args.quick)
        rows = {}
        for size in sizes:
            fn, tensors, _ = make_call(size)
            for graph in graphs:
                s, _ = timed(fn, tensors, device, graph, args)
                rows[(size, "dense", "16", graph)] = s
            print(f"{name} {size}: dense " + ", ".join(f"{'graph' if g else 'eager'} "
                                                       f"{rows[(size, 'dense', '16', g)] * 1e3:.2f} ms" for g in graphs),
                  flush=True)
        t0 = time.perf_counter()
        quantize_model(model, default_policy(family))
        print(f"{name}: quantized in {time.perf_counter() - t0:.1f} s", flush=True)
        free_memory(device)
        for size in sizes:
            fn, tensors, inp = make_call(size)
            for kernel in args.kernels.split(","):
                base_out = base_loop = None
                # 8-bit activations run the same W1A8 kernel whichever CUDA kernel is named: time them once
                acts = args.acts.split(",") if kernel == args.kernels.split(",")[-1] else ["16"]
                for act in acts:
                    set_choice(kernel, act)
                    rec = {"model": name, "size": size, "kernel": kernel, "act": act, "dtype": str(dtype)}
                    try:
                        for graph in graphs:
                            s, out = timed(fn, tensors, device, graph, args)
                            mode = "graph" if graph else "eager"
                            rec[f"{mode}_ms"] = s * 1e3
                            rec[f"dense_{mode}_ms"] = rows[(size, "dense", "16", graph)] * 1e3
                            rec[f"{mode}_ratio"] = s / rows[(size, "dense", "16", graph)]
                        if act == "16":
                            base_out = out
                        elif base_out is not None:
                            rec["step_rel_l2_vs_16"] = float((out - base_out).norm() / base_out.norm())
                        if name == "klein-4b" and inp is not None:
                            lat = klein_loop(fn, tensors, inp, device, dtype).float()
                            if act == "16":
                                base_loop = lat
                            elif base_loop is not None:
                                rec["loop_latent_psnr_vs_16"] = psnr(lat, base_loop)
                    except Exception as exc:  # a kernel that cannot run here must not cost the table
                        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    results.append(rec)
                    write_json(args.json, {"machine": info, "command": sys.argv, "results": results})
                    extra = "".join(f", {k} {v:.4g}" for k, v in rec.items() if k.startswith(("step_rel", "loop_lat")))
                    if "error" in rec:
                        print(f"{name} {size} {kernel} act={act}: {rec['error']}", flush=True)
                    else:
                        print(f"{name} {size} {kernel} act={act}: " + ", ".join(
                            f"{m} {rec[m + '_ms']:.2f} ms (x{rec[m + '_ratio']:.3f} dense {m})"
                            for m in ("eager", "graph") if m + "_ms" in rec) + extra, flush=True)
        model = fn = tensors = inp = None
        free_memory(device)
    set_choice("auto", "16")
    write_json(args.json, {"machine": info, "command": sys.argv, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
