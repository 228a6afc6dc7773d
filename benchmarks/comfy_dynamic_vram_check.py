"""ComfyUI's dynamic VRAM on the Bonsai native MODEL, on a CUDA GPU: the check the CPU tests cannot make.

tests/test_comfy_kitchen.py checks on the CPU what is plain torch in the kitchen form (sizes,
staging copies, moves, sampling); dynamic VRAM itself (comfy_aimdo's virtual VRAM, pinned host
buffers, ``cast_bias_weight``'s vbar branch) runs only on CUDA. This script starts comfy_aimdo as
ComfyUI's ``main.py`` does (``control.init`` before torch, ``init_devices``, ``ModelPatcherDynamic``
as the core patcher), imports ComfyUI's modules directly (no server), and for the same random
weights in each architecture's real shape loads:

* ``kitchen``  -- the Bonsai Diffusion Model Loader's path with dynamic VRAM on (``BONSAI_KITCHEN``
  unset: the kitchen form is chosen by itself); checked: the patcher is a ``ModelPatcherDynamic``,
  every packed weight a comfy_kitchen tensor of the pack's layout;
* ``classic``  -- ``BONSAI_KITCHEN=off``: ``Q1Tensor`` weights on the classic ModelPatcher
  (``disable_dynamic``), the path of the pack before the kitchen form;
* ``dense``    -- ComfyUI's own loader of the dequantized weights in bf16 (dynamic VRAM too).

For each: ComfyUI's size of the model (``model_size``), the peak GPU memory while sampling, the
sampler's eager step time, and the output of a short core ``comfy.sample`` run. Then on ``kitchen``:
the staged weights evicted (``partially_unload``, as ComfyUI does under memory pressure) and the
same sampling again (re-staged from pinned memory), and a LoRA through ComfyUI's LoRA loader
against the same LoRA on ``classic``. Every stage records its error instead of stopping the run.

    COMFYUI_PATH=/path/to/ComfyUI-0.33 python benchmarks/comfy_dynamic_vram_check.py --json out.json
    COMFYUI_PATH=/work/comfy/v033 /work/comfy/venv-v033/bin/python benchmarks/comfy_dynamic_vram_check.py --tiny

``--tiny`` runs tiny shapes on the CPU (dynamic VRAM off there: the kitchen form is forced with
``BONSAI_KITCHEN=on`` on the classic patcher): a smoke run of the script, not of dynamic VRAM.
Exit status 1 when a check fails (outputs differ, a weight not in the kitchen form, a stage raised).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def start_comfy(cpu: bool) -> bool:
    """ComfyUI's start-up order for dynamic VRAM (main.py): comfy_aimdo before torch. True when on."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI 0.33+ checkout (with comfy_aimdo and comfy_kitchen)")
    sys.path[:0] = [path, str(HERE), str(HERE.parent)]
    from comfy.cli_args import args, enables_dynamic_vram

    args.cpu = cpu
    dynamic = False
    if not cpu and enables_dynamic_vram():
        import comfy_aimdo.control

        try:
            comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=not args.disable_nvml_pressure)
        except TypeError:
            comfy_aimdo.control.init()
    import importlib.util

    spec = importlib.util.spec_from_file_location("bonsai_dvc_stub", HERE.parent / "tests" / "comfy_stub.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)  # imports torch: after comfy_aimdo, as main.py
    stub.stub_missing_torchaudio()
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not cpu and enables_dynamic_vram():
        import comfy_aimdo.control

        devices = mm.get_all_torch_devices()
        try:
            ok = comfy_aimdo.control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3))
                                                  for d in devices)
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in devices)
        if ok:
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            dynamic = True
    global PACK
    PACK = stub.load_pack("ComfyUI_Bonsai_dvc")
    return dynamic


PACK = None
RESULTS: dict = {}
FAILED: list[str] = []


def stage(name: str, out: dict):
    """A context that records a stage's exception (and fails the run) instead of stopping it."""

    class Stage:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            if exc is not None:
                out[name + "_error"] = "".join(traceback.format_exception(kind, exc, tb))[-3000:]
                FAILED.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  {name}: FAILED {type(exc).__name__}: {exc}")
            return True

    return Stage()


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def run_family(family: str, args, device, dynamic: bool) -> None:
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    from bench_comfy_native import (KLEIN_4B_CONFIG, SD15_CONFIG, TINY_KLEIN, TINY_SD, klein_weights, lora_dict,
                                    sd_weights, step_fn)
    from common import time_fn

    native = PACK.nodes.comfy_native
    kitchen = sys.modules[PACK.__name__ + ".nodes.kitchen_layout"]
    config = ((TINY_KLEIN if args.tiny else KLEIN_4B_CONFIG) if family == "klein"
              else (TINY_SD if args.tiny else SD15_CONFIG))
    dense, packed = (klein_weights if family == "klein" else sd_weights)(config, device, args.seed)
    dense = {k: (v.dequantize(torch.bfloat16) if getattr(v, "qtype", None) == "Q1_0" else v.to(torch.bfloat16)).cpu()
             for k, v in packed.items()}  # the 1-bit weights themselves, dense: same numbers for ComfyUI's loader
    packed = {k: v.cpu() for k, v in packed.items()}
    out = RESULTS.setdefault(family, {})
    size = args.size or (64 if args.tiny else (1024 if family == "klein" else 512))
    g = torch.Generator().manual_seed(args.seed)
    if family == "klein":
        latent = torch.randn(1, 128, size // 16, size // 16, generator=g)
        cond = torch.randn(1, 8 if args.tiny else 512, config.get("joint_attention_dim", 7680), generator=g)
    else:
        latent = torch.randn(1, 4, size // 8, size // 8, generator=g)
        cond = torch.randn(1, 77, 768, generator=g)

    def sample(p):
        noise = comfy.sample.prepare_noise(latent, args.seed)
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = comfy.sample.sample(p, noise, args.steps, 1.0 if family == "klein" else 5.0, "euler", "simple",
                                    [[cond, {}]], [[torch.zeros_like(cond), {}]], latent, seed=args.seed,
                                    disable_pbar=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return y, time.perf_counter() - t0

    def load(variant):
        mm.unload_all_models()
        mm.soft_empty_cache()
        if variant == "dense":
            os.environ.pop("BONSAI_KITCHEN", None)
            return comfy.sd.load_diffusion_model_state_dict(dict(dense), model_options={"dtype": torch.bfloat16})
        if variant == "classic":
            os.environ["BONSAI_KITCHEN"] = "off"
        elif dynamic:
            os.environ["BONSAI_KITCHEN"] = "auto"  # the kitchen form because dynamic VRAM is on (the default)
        else:
            os.environ["BONSAI_KITCHEN"] = "on"
        with torch.inference_mode():
            return native.load_native_model(dict(packed), f"{family} ({variant})")

    outputs, patchers = {}, {}
    for variant in ("kitchen", "classic", "dense"):
        r = out.setdefault(variant, {})
        with stage(f"{family}_{variant}", r):
            p = load(variant)
            patchers[variant] = p
            r["patcher"] = [c.__name__ for c in type(p).__mro__][:3]
            r["dynamic"] = bool(p.is_dynamic())
            r["model_size"] = p.model_size()
            r["kitchen_weights"] = sum(kitchen.is_q1(t) for t in p.model.parameters())
            r["q1_weights"] = sum(native.is_q1(t) for t in p.model.parameters())
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            y, seconds = sample(p)
            outputs[variant] = y
            r["sample_s"] = round(seconds, 3)
            y2, seconds2 = sample(p)  # second run: weights resident (or re-staged), caches warm
            r["sample_again_s"] = round(seconds2, 3)
            r["again_rel"] = rel(y2, y)
            if device.type == "cuda":
                r["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
                r["loaded_size"] = int(p.loaded_size())
            fn, kwargs = step_fn(p, "klein" if family == "klein" else "sd15", size, device, cond.shape[1],
                                 cond.shape[2], args.seed)
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                mm.load_models_gpu([p])
                timed = time_fn(lambda: fn(**kwargs), device, warmup=args.warmup, repeats=args.repeats)
            r["step_ms"] = timed["median_s"] * 1e3
            print(f"  {family} {variant:8s} {r['patcher'][0]} dynamic={r['dynamic']} "
                  f"size {r['model_size'] / 2**20:.1f} MiB peak {r.get('peak_bytes', 0) / 2**20:.1f} MiB "
                  f"step {r['step_ms']:.2f} ms sample {seconds:.2f}/{seconds2:.2f} s")
            if variant == "kitchen":
                want_dynamic = dynamic
                if r["dynamic"] != want_dynamic or r["kitchen_weights"] != r["q1_weights"] or not r["kitchen_weights"]:
                    FAILED.append(f"{family} kitchen: dynamic={r['dynamic']} (want {want_dynamic}), "
                                  f"{r['kitchen_weights']} of {r['q1_weights']} packed weights in the kitchen form")
        mm.unload_all_models()
    cmp = out.setdefault("compare", {})
    if "kitchen" in outputs and "classic" in outputs:
        cmp["kitchen_vs_classic_rel"] = rel(outputs["kitchen"], outputs["classic"])
        if cmp["kitchen_vs_classic_rel"] > args.tolerance:
            FAILED.append(f"{family}: kitchen and classic outputs differ by {cmp['kitchen_vs_classic_rel']:.2e}")
    if "kitchen" in outputs and "dense" in outputs:
        cmp["kitchen_vs_dense_rel"] = rel(outputs["kitchen"], outputs["dense"])  # bf16 products: reported only
    print(f"  {family} compare: {json.dumps(cmp)}")

    if "kitchen" not in patchers:
        return
    p = patchers["kitchen"]
    with stage(f"{family}_evict", cmp):  # dynamic VRAM under memory pressure: staged weights dropped, re-staged
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            mm.load_models_gpu([p])
            freed = p.partially_unload(p.load_device, 1e30) if p.is_dynamic() else None
        cmp["evicted_bytes"] = freed
        y, seconds = sample(p)
        cmp["after_evict_rel"] = rel(y, outputs["kitchen"])
        cmp["after_evict_sample_s"] = round(seconds, 3)
        if cmp["after_evict_rel"] > args.tolerance:
            FAILED.append(f"{family}: after eviction the output differs by {cmp['after_evict_rel']:.2e}")
    with stage(f"{family}_lora", cmp):  # a LoRA on every packed layer, dynamic (kept beside) vs classic
        lora = lora_dict(packed, 8, args.seed, torch.device("cpu"))
        got = {}
        for variant in ("kitchen", "classic"):
            base = load(variant)
            lm = comfy.sd.load_lora_for_models(base, None, dict(lora), 1.0, 0)[0]
            got[variant], _ = sample(lm)
            mods = [m for m in lm.model.modules() if native.is_q1(getattr(m, "weight", None))]
            cmp[f"lora_{variant}_left_to_comfy"] = sum(getattr(m, "weight_lowvram_function", None) is not None
                                                       for m in mods)
            cmp[f"lora_{variant}_kept_beside"] = sum(m.__dict__.get("bonsai_lowvram") is not None for m in mods)
            mm.unload_all_models()
        cmp["lora_kitchen_vs_classic_rel"] = rel(got["kitchen"], got["classic"])
        cmp["lora_effect_rel"] = rel(got["classic"], outputs["classic"])
        if cmp["lora_kitchen_vs_classic_rel"] > args.tolerance or cmp["lora_kitchen_left_to_comfy"]:
            FAILED.append(f"{family}: LoRA on the kitchen form differs by {cmp['lora_kitchen_vs_classic_rel']:.2e} "
                          f"({cmp['lora_kitchen_left_to_comfy']} patched layers left for ComfyUI to merge)")
    print(f"  {family} kitchen: {json.dumps({k: v for k, v in cmp.items() if not k.endswith('_error')})}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run of the script")
    p.add_argument("--families", nargs="+", default=["klein", "sd15"], choices=["klein", "sd15"])
    p.add_argument("--size", type=int, default=None, help="image side (default klein 1024, SD1.5 512)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=2e-2,
                   help="largest relative difference kitchen vs classic (same kernels; bf16 reductions may differ)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    dynamic = start_comfy(cpu=args.tiny)
    import torch

    import comfyui_version

    device = torch.device("cpu") if args.tiny else torch.device("cuda")
    if args.tiny:
        args.warmup, args.repeats, args.steps = 1, 2, 2
    RESULTS["comfyui"] = comfyui_version.__version__
    RESULTS["dynamic_vram"] = dynamic
    RESULTS["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"ComfyUI {RESULTS['comfyui']} on {RESULTS['device']}, dynamic VRAM {'on' if dynamic else 'OFF'}")
    if device.type == "cuda" and not dynamic:
        FAILED.append("dynamic VRAM did not start (comfy_aimdo): nothing of the dynamic path was checked")
    for family in args.families:
        if family == "klein":
            import comfy.supported_models

            if not hasattr(comfy.supported_models, "Flux2"):
                print("klein: this ComfyUI has no FLUX.2 [klein]; skipped")
                continue
        run_family(family, args, device, dynamic)
    RESULTS["failed"] = FAILED
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))
    print("FAILED:\n  " + "\n  ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
