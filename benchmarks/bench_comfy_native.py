"""The Bonsai native MODEL inside ComfyUI beside ComfyUI's own loader: step time, VRAM, LoRA cost.

Imports ComfyUI's Python modules directly (``COMFYUI_PATH``; no server). Random weights in each
architecture's real shape, loaded three ways through ``comfy.sd.load_diffusion_model_state_dict``:

* ``bonsai``   -- the packed Q1_0 weights with the pack's ops (``nodes/comfy_native.py``), as the
  Bonsai Diffusion Model Loader gives them;
* ``bf16``     -- ComfyUI's own layers in bf16 (what *Load Diffusion Model* gives, weight_dtype default);
* ``fp8_fast`` -- ComfyUI's ``fp8_e4m3fn_fast`` (fp8 weights, fp8 matmuls where the GPU has them).

For each: the sampler step (one ``model.apply_model`` call, as KSampler makes it: batch 1 for klein
at cfg 1, batch 2 for SD1.5 at cfg > 1), eager as ComfyUI runs and replayed as a CUDA graph; the GPU
memory the model holds once ComfyUI has loaded it. Then LoRAs on every packed layer through
ComfyUI's own LoRA loader: the step with 0, 1 and 4 LoRAs on the Bonsai MODEL (side products), and
the same LoRAs applied the ComfyUI-GGUF way (dequantize, ``comfy.lora.calculate_weight`` merge,
dense matmul, every forward) on the same layers.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_comfy_native.py --json out.json
    COMFYUI_PATH=/work/comfy/v033 /work/comfy/venv-v033/bin/python benchmarks/bench_comfy_native.py --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (KLEIN_4B_CONFIG, build_random_transformer, header, machine_info, table,  # noqa: E402
                    time_fn, write_json)

SD15_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                   block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8)
TINY_KLEIN = dict(KLEIN_4B_CONFIG, num_attention_heads=2, num_layers=1, num_single_layers=1, joint_attention_dim=256)
TINY_SD = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=768, attention_head_dim=8)


def import_comfy(device: torch.device):
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (0.33 or newer for FLUX.2 klein)")
    sys.path.insert(0, path)
    import importlib.util

    # by file: ComfyUI's own ``tests`` package is ahead of ours on the path
    from common import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bonsai_bench_stub", REPO_ROOT / "tests" / "comfy_stub.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    stub.stub_missing_torchaudio()
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401

    return stub.load_pack("ComfyUI_Bonsai_bench").nodes.comfy_native


# ------------------------------------------------------------------------------------------ weights
def klein_weights(config: dict, device: torch.device, seed: int) -> tuple[dict, dict]:
    """(dense bf16 BFL-named dict, same with the packed linears as Q1Tensor)."""
    from bonsai_core.importers.flux2_names import diffusers_to_bfl, is_packed_linear
    from bonsai_core.quant.tensor import Q1Tensor

    model = build_random_transformer(config, device, torch.bfloat16, seed)
    diff = dict(model.state_dict())
    del model
    dense, _ = diffusers_to_bfl(diff)
    packed = {k: (Q1Tensor.from_float(v) if is_packed_linear(k) else v) for k, v in diff.items()}
    packed, _ = diffusers_to_bfl(packed)
    return dense, packed


def sd_weights(config: dict, device: torch.device, seed: int) -> tuple[dict, dict]:
    from diffusers import UNet2DConditionModel

    from bonsai_core.native import sd_unet_ldm_names
    from bonsai_core.quant.layers import quantize_model

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).to(device, torch.bfloat16).eval()
    names = sd_unet_ldm_names(list(unet.state_dict()))
    dense = {names[k]: v.clone() for k, v in unet.state_dict().items()}
    quantize_model(unet)
    packed = {names[k]: v for k, v in unet.state_dict().items()}
    return dense, packed


# ------------------------------------------------------------------------------------------ models
def load(variant: str, dense: dict, packed: dict, native, device):
    import comfy.model_management as mm
    import comfy.sd

    mm.unload_all_models()
    mm.soft_empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if variant == "bonsai":
        patcher = native.load_native_model(dict(packed), "bench")
    else:
        opts = {"dtype": torch.bfloat16} if variant == "bf16" else {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
        if device.type == "cpu":
            opts = {"dtype": torch.float32}  # CPU: ComfyUI computes in fp32 there (the "bf16" row is fp32)
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(dense), model_options=opts)
    mm.load_models_gpu([patcher])
    held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else native.model_nbytes(patcher.model)
    return patcher, held


def step_fn(patcher, family: str, size: int, device, tokens: int, context: int, seed: int):
    g = torch.Generator("cpu").manual_seed(seed)
    dtype = patcher.model.get_dtype() if patcher.model.manual_cast_dtype is None else patcher.model.manual_cast_dtype
    if family == "klein":
        x = torch.randn(1, 128, size // 16, size // 16, generator=g)
        c = torch.randn(1, tokens, context, generator=g)
    else:  # SD1.5 at cfg > 1: cond and uncond in one batch
        x = torch.randn(2, 4, size // 8, size // 8, generator=g)
        c = torch.randn(2, 77, 768, generator=g)
    x, c = x.to(device, torch.float32), c.to(device, dtype)
    t = torch.full((x.shape[0],), 0.5 if family == "klein" else 1.0, device=device)  # sigma, as samplers pass it
    kwargs = {"x": x, "t": t, "c": c}

    def fn(x, t, c):
        return patcher.model.apply_model(x, t, c_crossattn=c)

    return fn, kwargs


def time_step(fn, kwargs, device, args, graph: bool, profile: bool = False) -> dict:
    with torch.inference_mode():
        if not graph:
            r = time_fn(lambda: fn(**kwargs), device, warmup=args.warmup, repeats=args.repeats)
            out = {"step_ms": r["median_s"] * 1e3}
            if profile and args.profile:
                out["profile"] = profile_steps(fn, kwargs, device, args.profile)
            if profile and args.torch_profile and device.type == "cuda":
                out["torch_profile"] = torch_profile_steps(fn, kwargs, args.torch_profile)
            return out
        from bonsai_core.cuda_graph import GraphedStep

        try:
            g = GraphedStep(fn)
            g(**kwargs)
        except Exception as exc:  # noqa: BLE001 - report which variant cannot be captured, and why
            return {"step_ms": None, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        r = time_fn(lambda: g(**kwargs), device, warmup=args.warmup, repeats=args.repeats)
        return {"step_ms": r["median_s"] * 1e3}


def torch_profile_steps(fn, kwargs, steps: int, top: int = 20) -> dict:
    """Host and GPU time of ``steps`` eager steps under torch.profiler: the GPU's busy share of the
    wall time (an eager step bound by the host leaves the GPU idle between launches), the ops with the
    most host time of their own, the kernels with the most GPU time, and every call that waits for the
    GPU (synchronize, blocking copies), which would serialise host and GPU."""
    import time as _time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = _time.perf_counter()
        for _ in range(steps):
            fn(**kwargs)
        torch.cuda.synchronize()
        wall = _time.perf_counter() - t0
    events = prof.key_averages()

    def dev_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    kernels = [e for e in events if dev_us(e) > 0 and e.self_cpu_time_total == 0]
    gpu_us = sum(dev_us(e) for e in kernels)
    waits = [e for e in events if any(w in e.key for w in ("Synchronize", "cudaMemcpy", "StreamWait", "item",
                                                               "_local_scalar_dense"))]
    return {
        "steps": steps, "wall_ms_per_step": round(wall / steps * 1e3, 3),
        "gpu_kernel_ms_per_step": round(gpu_us / steps / 1e3, 3),
        "gpu_busy_share": round(gpu_us / 1e6 / wall, 3),
        "host_ops": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                      "self_cpu_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 3)}
                     for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
        "gpu_kernels": [{"kernel": e.key[:120], "calls_per_step": round(e.count / steps, 1),
                         "gpu_ms_per_step": round(dev_us(e) / steps / 1e3, 3)}
                        for e in sorted(kernels, key=lambda e: -dev_us(e))[:top]],
        "waits": [{"op": e.key, "calls_per_step": round(e.count / steps, 2),
                   "self_cpu_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 3)} for e in waits],
    }


def profile_steps(fn, kwargs, device, steps: int, top: int = 25) -> list[dict]:
    """Where an eager step's host time goes: cProfile over ``steps`` calls, the ``top`` functions by
    their own time, in ms a step (cProfile slows Python down: the shares matter, not the sums)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn(**kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}:{name}", "calls_per_step": round(nc / steps, 1),
             "own_ms_per_step": round(tt / steps * 1e3, 3), "total_ms_per_step": round(ct / steps * 1e3, 3)}
            for (f, line, name), (_, nc, tt, ct, _) in rows]


def lora_dict(packed: dict, rank: int, seed: int, device) -> dict:
    """One LoRA (ComfyUI key names) on every packed layer."""
    from bonsai_core.quant.tensor import Q1Tensor

    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for k, w in packed.items():
        if isinstance(w, Q1Tensor):
            base = k[: -len(".weight")]
            fan_in = w.shape[1:].numel()
            down = torch.randn(rank, fan_in, generator=g, device=device, dtype=torch.bfloat16) / fan_in ** 0.5
            out[f"diffusion_model.{base}.lora_down.weight"] = down.reshape(rank, *w.shape[1:]) if w.dim() > 2 else down
            up = torch.randn(w.shape[0], rank, generator=g, device=device, dtype=torch.bfloat16) * 0.01
            out[f"diffusion_model.{base}.lora_up.weight"] = up.reshape(*up.shape, 1, 1) if w.dim() > 2 else up
    return out


def gguf_style(native):
    """The ComfyUI-GGUF way for packed layers with patches: dequantize, merge with ComfyUI's own
    ``calculate_weight``, dense product -- every forward."""
    import comfy.lora
    import torch.nn.functional as F

    original = native._q1_forward

    def forward(m, x, op):
        patches = native._weight_patches(m)
        if not patches:
            return original(m, x, op)
        w = m.weight.to(x.device).dequantize(x.dtype)
        w = comfy.lora.calculate_weight(patches, w, "bench", intermediate_dtype=x.dtype)
        bias = native._bias(m, x)
        if op == "linear":
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, m.stride, m.padding, m.dilation)

    return original, forward


def run_family(family: str, sizes, args, device, native, results: dict) -> None:
    import comfy.sd

    config = (TINY_KLEIN if args.tiny else KLEIN_4B_CONFIG) if family == "klein" else (TINY_SD if args.tiny else SD15_CONFIG)
    t0 = time.perf_counter()
    dense, packed = (klein_weights if family == "klein" else sd_weights)(config, device, args.seed)
    # made (and packed) on the device for speed, then kept on the host as a loaded file is: the GPU
    # memory a variant holds is then what ComfyUI's load put there
    dense = {k: v.cpu() for k, v in dense.items()}
    packed = {k: v.cpu() for k, v in packed.items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"{family}: random weights in {time.perf_counter() - t0:.1f} s")
    variants = ["bonsai", "bf16"] + (["fp8_fast"] if device.type == "cuda" else [])
    graph_modes = [False, True] if device.type == "cuda" and not args.no_graph else [False]
    context = config.get("joint_attention_dim", 768)
    out = results.setdefault(family, {})
    for variant in variants:
        patcher, held = load(variant, dense, packed, native, device)
        out.setdefault(variant, {})["held_bytes"] = held
        for size in sizes:
            fn, kwargs = step_fn(patcher, family, size, device, args.text_tokens, context, args.seed)
            for graph in graph_modes:
                r = time_step(fn, kwargs, device, args, graph, profile=size == sizes[0])
                out[variant][f"{size}_{'graph' if graph else 'eager'}"] = r
                print(f"  {family} {variant:8s} {size}^2 {'graph' if graph else 'eager'}: "
                      f"{r['step_ms'] if r['step_ms'] is None else round(r['step_ms'], 2)} ms {r.get('error', '')}")
                for row in r.get("profile", [])[:10]:
                    print(f"      {row['own_ms_per_step']:8.3f} ms own {row['calls_per_step']:7.1f} calls  {row['function']}")
        if variant == "bonsai" and family == "klein":
            size = sizes[0]
            loras = {}
            for n in args.loras:
                p = patcher
                for i in range(n):
                    p = comfy.sd.load_lora_for_models(p, None, lora_dict(packed, args.rank, args.seed + i, device), 1.0, 0)[0]
                import comfy.model_management as mm

                mm.load_models_gpu([p])
                fn, kwargs = step_fn(p, family, size, device, args.text_tokens, context, args.seed)
                side = time_step(fn, kwargs, device, args, False)["step_ms"]
                original, forward = gguf_style(native)
                native._q1_forward = forward
                try:
                    merged = time_step(fn, kwargs, device, args, False)["step_ms"] if n else side
                finally:
                    native._q1_forward = original
                loras[n] = {"side_ms": side, "gguf_merge_ms": merged}
                print(f"  klein bonsai {size}^2 {n} LoRA(s) rank {args.rank}: side {side:.2f} ms, "
                      f"dequantize+merge per forward {merged:.2f} ms")
            out["bonsai"]["lora"] = {"size": size, "rank": args.rank, "by_count": loras}
        del patcher
    del dense, packed


def gguf_read(folder: Path, tiny: bool) -> dict:
    """Write a klein-4B-shaped Q1_0 GGUF (random blocks, BFL names, as the community file) and time
    ``bonsai_core.native.read_native`` on it: the whole parse, ComfyUI not needed."""
    from bonsai_core.importers.flux2_names import expected_shapes, is_packed_linear
    from bonsai_core.importers.gguf_q1 import write_gguf
    from bonsai_core.native import read_native
    from bonsai_core.quant.q1_0 import QS_BYTES, n_blocks
    from bonsai_core.quant.tensor import Q1Tensor

    config = TINY_KLEIN if tiny else KLEIN_4B_CONFIG
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if is_packed_linear(name):
            rows, nb = shape[0], n_blocks(shape[1])
            qs = torch.randint(0, 256, (rows, nb * QS_BYTES), generator=g, dtype=torch.uint8)
            tensors[name] = Q1Tensor(qs, torch.rand(rows, nb, generator=g).half() * 0.02, shape)
        else:
            tensors[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
    path = folder / "klein-shaped-q1_0.gguf"
    write_gguf(path, tensors)
    del tensors
    size = path.stat().st_size
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        native = read_native(path)
        times.append(time.perf_counter() - t0)
        del native
    path.unlink()
    return {"file_bytes": size, "read_s": times, "note": "page cache warm after the write (second and third reads)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run of the script")
    p.add_argument("--device", default="auto")
    p.add_argument("--families", nargs="+", default=["klein", "sd15"], choices=["klein", "sd15"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="klein sides (default 512 1024; SD1.5: 512)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--loras", type=int, nargs="+", default=[0, 1, 4])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile the eager steps' host time (cProfile over STEPS calls; top functions in the JSON)")
    p.add_argument("--torch-profile", type=int, default=0, metavar="STEPS",
                   help="also run STEPS eager steps under torch.profiler (CUDA only): GPU busy share, host ops, "
                        "kernels, and calls that wait for the GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--gguf-read", metavar="DIR", help="only time reading a klein-4B-shaped Q1_0 GGUF written in DIR "
                                                      "(no ComfyUI needed)")
    args = p.parse_args(argv)
    if args.gguf_read:
        info = machine_info(torch.device("cpu"))
        r = gguf_read(Path(args.gguf_read), args.tiny)
        print(f"GGUF {r['file_bytes'] / 2**30:.2f} GiB read in " + ", ".join(f"{t:.2f} s" for t in r["read_s"]))
        write_json(args.json, {"machine": info, "gguf_read": r})
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    device = torch.device(args.device)
    if args.tiny:
        args.sizes = args.sizes or [64]
        args.text_tokens, args.warmup, args.repeats, args.rank = 8, 1, 2, 4
    native = import_comfy(device)
    import comfyui_version

    info = machine_info(device, torch.bfloat16)
    info["comfyui"] = comfyui_version.__version__
    print(header("Bonsai native MODEL in ComfyUI " + comfyui_version.__version__, info))
    results: dict = {"machine": info, "args": vars(args)}
    for family in args.families:
        if family == "klein":
            import comfy.supported_models

            if not hasattr(comfy.supported_models, "Flux2"):
                print("klein: this ComfyUI has no FLUX.2 [klein]; skipped")
                continue
            run_family("klein", args.sizes or [512, 1024], args, device, native, results)
        else:
            run_family("sd15", [args.sizes[0]] if args.tiny else [512], args, device, native, results)
    rows = []
    for family in ("klein", "sd15"):
        for variant, r in results.get(family, {}).items():
            for key, v in r.items():
                if isinstance(v, dict) and "step_ms" in v:
                    base = results[family]["bf16"].get(key.split("_")[0] + "_eager", {}).get("step_ms")
                    ms = v["step_ms"]
                    rows.append([family, variant, key, "-" if ms is None else f"{ms:.2f}",
                                 "-" if ms is None or not base else f"{ms / base:.2f}x"])
            rows.append([family, variant, "held MiB", f"{r['held_bytes'] / 2**20:.1f}", ""])
    print(table(["family", "variant", "size / mode", "step ms", "vs bf16 eager"], rows))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
