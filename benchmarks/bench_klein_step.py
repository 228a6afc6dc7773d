"""One sampling step of the FLUX.2 [klein] 4B transformer: bf16 eager vs Bonsai 1-bit, same run.

Issue 11's benchmark. The transformer (diffusers ``Flux2Transformer2DModel``) is built in the
klein-4B config with random weights: on the meta device first, cast to the run dtype there (no
memory), then materialised directly on the target device (``to_empty``) and filled in place, so
the 4 B parameters never exist in fp32 and never on the CPU.

  A  "bf16 eager": the model as built. At each size: one transformer forward (= one sampling step;
     1 image, 512 text tokens, ids from ``Flux2KleinPipeline``'s own static helpers), warm-up then
     the median of ``--repeats``; then a 4-step flow-matching Euler loop through
     ``bonsai_core.sampling`` (the engine's loop) with its peak memory.
  B  "Bonsai 1-bit": the same model quantized in place by
     ``quantize_model(model, default_policy("flux2_klein"))``, layer by layer on the device (each
     bf16 weight is packed and dropped before the next, so the peak is the bf16 model plus one
     layer's packing, never two models). Same measurements, plus the weight bytes held (module
     tensors, and on CUDA the allocator's own count).

Peak memory is reported twice: absolute (weights included: what the card must hold) and the
increment over what was held when the measured region began (activations and temporaries).
``--kernel reference|auto`` sets BONSAI_KERNEL (reference = dequantize every forward).

    python benchmarks/bench_klein_step.py --quick                            # tiny config, CPU, seconds
    python benchmarks/bench_klein_step.py --device cuda --json klein.json   # klein-4B, 512^2 and 1024^2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DTYPES, GIB, PeakMemory, allocated, build_random_transformer, command_line,  # noqa: E402
                    config_for, fmt_bytes, fmt_ratio, fmt_s, free_memory, header, machine_info, make_inputs,
                    pick_device, ratio, sync, table, time_fn, write_json)

import torch  # noqa: E402

# Issue 11: the reference numbers (H100, one run) and our targets.
REFERENCE_H100 = {
    "bf16_step_ms": {512: 30.1, 1024: 86.5}, "bf16_peak_gib": {512: 7.45, 1024: 7.83},
    "reference_1bit_slowdown": {512: 2.25, 1024: 1.42}, "reference_1bit_peak_gib": {512: 1.31, 1024: 1.61},
    "weights_gib": {"bf16": 7.22, "1bit": 0.89},
}
TARGETS = {"step_ratio_max": 1.0, "weights_gib_max": 0.93, "loop_peak_gib_max_512": 1.5}


def measure_size(model, config: dict, size: int, args, device: torch.device, dtype: torch.dtype,
                 graph: bool = False) -> dict:
    from bonsai_core import sampling
    from bonsai_core.cuda_graph import GraphedStep

    inp = make_inputs(config, size, args.text_tokens, device, dtype, args.seed)
    sched = sampling.flow_schedule(args.loop_steps, inp["image_seq_len"],
                                   {"use_dynamic_shifting": True, "shift": 3.0})
    hidden = inp["noise"].to(dtype)
    t_step = torch.full((1,), float(sampling.model_timestep(sched, 0)), device=device, dtype=dtype)

    def eager(hidden_states, timestep):
        return model(hidden_states=hidden_states, encoder_hidden_states=inp["encoder_hidden_states"],
                     timestep=timestep, img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=None,
                     return_dict=False)[0]

    # graph=True: the step replayed as a CUDA graph, as the klein family runs it on CUDA
    # (bonsai_core/cuda_graph.py); captured during the warm-up forwards
    replay = GraphedStep(eager) if graph else None

    def forward(x, t):
        return replay(hidden_states=x, timestep=t) if replay else eager(x, t)

    def step():
        return forward(hidden, t_step)

    def loop():
        def denoise(x, i):
            t = sampling.model_timestep(sched, i).reshape(1).to(device=device, dtype=dtype)
            return sampling.to_x0(sched, x, forward(x.to(dtype), t).float(), i)

        return sampling.sample(denoise, inp["noise"] * sampling.initial_noise_scale(sched), sched, sampler="euler")

    with torch.inference_mode():
        with PeakMemory(device) as step_mem:
            timing = time_fn(step, device, warmup=args.warmup, repeats=args.repeats)
        with PeakMemory(device) as loop_mem:
            out = loop()
        finite = bool(torch.isfinite(out).all())
        loop_timing = time_fn(loop, device, warmup=0, repeats=args.loop_repeats)
    res = {
        "size": size, "image_tokens": inp["image_seq_len"], "text_tokens": args.text_tokens,
        "step_s": timing["median_s"], "step_timing": timing,
        "loop_steps": args.loop_steps, "loop_s": loop_timing["median_s"], "loop_timing": loop_timing,
        "step_peak_bytes": step_mem.result["peak_bytes"], "step_peak_added_bytes": step_mem.result["added_bytes"],
        "loop_peak_bytes": loop_mem.result["peak_bytes"], "loop_peak_added_bytes": loop_mem.result["added_bytes"],
        "peak_kind": loop_mem.result["peak_kind"], "output_finite": finite,
    }
    print(f"    {size}x{size} ({res['image_tokens']} image + {args.text_tokens} text tokens): step "
          f"{fmt_s(res['step_s'])} (min {fmt_s(timing['min_s'])}, max {fmt_s(timing['max_s'])}), "
          f"{args.loop_steps}-step loop {fmt_s(res['loop_s'])}, loop peak {fmt_bytes(res['loop_peak_bytes'])} "
          f"(+{fmt_bytes(res['loop_peak_added_bytes'])})")
    return res  # the inputs and closures go with this frame; the caller frees the allocator cache


def held_bytes(model, device: torch.device) -> dict:
    from bonsai_core.quant.layers import module_nbytes

    free_memory(device)
    out = {"module_bytes": module_nbytes(model)}
    if device.type == "cuda":
        out["allocator_bytes"] = allocated(device)  # nothing but the model is alive between phases
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="klein-4b", choices=["klein-4b", "tiny"],
                   help="klein-4b (the real shapes) or tiny (tests/flux2_fixtures.py, for CPU smoke runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="compute dtype of both variants")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square image sides (multiples of 16)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per size and variant (median reported)")
    p.add_argument("--loop-steps", type=int, default=4, help="steps of the timed denoising loop (klein: 4)")
    p.add_argument("--loop-repeats", type=int, default=3)
    p.add_argument("--kernel", choices=["auto", "reference"], default=None, help="sets BONSAI_KERNEL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-graph", action="store_true", help="skip variant C (1-bit step replayed as a CUDA graph)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: --config tiny --device cpu --sizes 256 512 --warmup 1 --repeats 3 "
                        "--loop-repeats 3")
    p.add_argument("--json", help="write the full result as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.sizes, args.warmup, args.repeats, args.loop_repeats = "tiny", [256, 512], 1, 3, 3
        if args.device == "auto":
            args.device = "cpu"
    if args.kernel:
        os.environ["BONSAI_KERNEL"] = args.kernel
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and args.config == "klein-4b":
        print("note: the klein-4B forward on a CPU takes minutes per step; benchmarks/klein_cpu_estimate.py "
              "estimates it from per-layer timings instead")
    config = config_for(args.config)
    info = machine_info(device, dtype)
    dname = args.dtype
    print(header(f"bench_klein_step: FLUX.2 klein transformer, {dname} eager vs Bonsai 1-bit, one sampling step", info))
    print(f"model   : Flux2Transformer2DModel, config {args.config}: {config['num_layers']} double + "
          f"{config['num_single_layers']} single blocks, {config['num_attention_heads']} heads x "
          f"{config['attention_head_dim']}, joint dim {config['joint_attention_dim']}, in {config['in_channels']}; "
          "random weights")
    print(f"timing  : {args.warmup} warm-up + median of {args.repeats} forwards per size; "
          f"{args.loop_steps}-step Euler loop median of {args.loop_repeats}")

    from bonsai_core.quant.layers import quantize_model, quantized_layers
    from bonsai_core.quant.policy import default_policy

    free_memory(device)
    print("\nbuilding the transformer on the meta device, materialising on", device, "...")
    with PeakMemory(device) as build_mem:
        t0 = time.perf_counter()
        model = build_random_transformer(config, device, dtype, args.seed)
        sync(device)
        build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weights_a = held_bytes(model, device)
    print(f"  {n_params:,} parameters, {fmt_bytes(weights_a['module_bytes'])} in {dname}, built in {fmt_s(build_s)}, "
          f"build peak {fmt_bytes(build_mem.result['peak_bytes'])}")

    print(f"\nA  {dname} eager")
    a = {}
    for s in args.sizes:
        a[s] = measure_size(model, config, s, args, device, dtype)
        free_memory(device)

    print("\nquantizing in place, layer by layer on the device ...")
    with PeakMemory(device) as q_mem:
        t0 = time.perf_counter()
        report = quantize_model(model, default_policy("flux2_klein"))
        sync(device)
        quant_s = time.perf_counter() - t0
    weights_b = held_bytes(model, device)
    q = quantized_layers(model)
    from bonsai_core.quant import kernels

    layer = next(iter(q.values()))
    kernel = kernels.active(torch.zeros(1, layer.in_features, device=device, dtype=dtype), layer.weight)
    print(f"  {len(q)} layers quantized in {fmt_s(quant_s)}, peak during quantization "
          f"{fmt_bytes(q_mem.result['peak_bytes'])} (bf16 model was {fmt_bytes(weights_a['module_bytes'])}); "
          f"now holds {fmt_bytes(weights_b['module_bytes'])}; kernel: {kernel}")

    print("\nB  Bonsai 1-bit")
    b = {}
    for s in args.sizes:
        b[s] = measure_size(model, config, s, args, device, dtype)
        free_memory(device)
    c = {}
    if device.type == "cuda" and not args.no_graph:
        print("\nC  Bonsai 1-bit, step replayed as a CUDA graph (what the klein family does on CUDA)")
        for s in args.sizes:
            c[s] = measure_size(model, config, s, args, device, dtype, graph=True)
            free_memory(device)

    # ----------------------------------------------------------------------------- report
    print("\n" + "=" * 100)
    print(f"RESULTS  ({info['gpu'] or info['cpu']}, {device}, {dname}; 1 image, {args.text_tokens} text tokens; "
          f"kernel {kernel})")
    rows = []
    for s in args.sizes:
        ra, rb = a[s], b[s]
        rows.append([f"{s}^2", "step", fmt_s(ra["step_s"]), fmt_s(rb["step_s"]),
                     fmt_ratio(ratio(rb["step_s"], ra["step_s"]))])
        rows.append(["", f"{args.loop_steps}-step loop", fmt_s(ra["loop_s"]), fmt_s(rb["loop_s"]),
                     fmt_ratio(ratio(rb["loop_s"], ra["loop_s"]))])
        rows.append(["", "loop peak (abs)", fmt_bytes(ra["loop_peak_bytes"]), fmt_bytes(rb["loop_peak_bytes"]),
                     fmt_ratio(ratio(rb["loop_peak_bytes"], ra["loop_peak_bytes"]))])
        rows.append(["", "loop peak added", fmt_bytes(ra["loop_peak_added_bytes"]),
                     fmt_bytes(rb["loop_peak_added_bytes"]),
                     fmt_ratio(ratio(rb["loop_peak_added_bytes"], ra["loop_peak_added_bytes"]))])
    for s in c:
        rows.append([f"{s}^2", "step, 1-bit + CUDA graph (C)", fmt_s(a[s]["step_s"]), fmt_s(c[s]["step_s"]),
                     fmt_ratio(ratio(c[s]["step_s"], a[s]["step_s"]))])
        rows.append(["", "loop, 1-bit + CUDA graph (C)", fmt_s(a[s]["loop_s"]), fmt_s(c[s]["loop_s"]),
                     fmt_ratio(ratio(c[s]["loop_s"], a[s]["loop_s"]))])
        rows.append(["", "loop peak (abs) (C)", fmt_bytes(a[s]["loop_peak_bytes"]), fmt_bytes(c[s]["loop_peak_bytes"]),
                     fmt_ratio(ratio(c[s]["loop_peak_bytes"], a[s]["loop_peak_bytes"]))])
    rows.append(["weights", "module tensors", fmt_bytes(weights_a["module_bytes"]),
                 fmt_bytes(weights_b["module_bytes"]),
                 fmt_ratio(ratio(weights_b["module_bytes"], weights_a["module_bytes"]))])
    if "allocator_bytes" in weights_a:
        rows.append(["", "allocator held", fmt_bytes(weights_a["allocator_bytes"]),
                     fmt_bytes(weights_b["allocator_bytes"]),
                     fmt_ratio(ratio(weights_b["allocator_bytes"], weights_a["allocator_bytes"]))])
    print(table(["size", "measure", f"A {dname} eager", "B Bonsai 1-bit", "B / A"], rows, "<<>>>"))
    print(f"peak memory: {a[args.sizes[0]]['peak_kind']}"
          + ("; on a CPU it counts the whole process" if device.type == "cpu" else ""))
    print(f"outputs finite: A {all(r['output_finite'] for r in a.values())}, "
          f"B {all(r['output_finite'] for r in b.values())}")

    checks = []
    if args.config == "klein-4b":
        for s in (512, 1024):
            if s in a:
                r = ratio(b[s]["step_s"], a[s]["step_s"])
                checks.append([f"1-bit eager step <= {TARGETS['step_ratio_max']}x bf16 eager at {s}^2", fmt_ratio(r),
                               "PASS" if r <= TARGETS["step_ratio_max"] else "FAIL"])
                if s in c:
                    r = ratio(c[s]["step_s"], a[s]["step_s"])
                    checks.append([f"1-bit step as run (CUDA graph) <= {TARGETS['step_ratio_max']}x bf16 eager "
                                   f"at {s}^2", fmt_ratio(r), "PASS" if r <= TARGETS["step_ratio_max"] else "FAIL"])
        wg = weights_b["module_bytes"] / GIB
        checks.append([f"transformer weights <= {TARGETS['weights_gib_max']} GiB", f"{wg:.3f} GiB",
                       "PASS" if wg <= TARGETS["weights_gib_max"] else "FAIL"])
        if 512 in b and b[512]["loop_peak_bytes"] is not None and device.type == "cuda":
            pg = b[512]["loop_peak_bytes"] / GIB
            checks.append([f"denoising-loop peak <= {TARGETS['loop_peak_gib_max_512']} GiB at 512^2", f"{pg:.3f} GiB",
                           "PASS" if pg <= TARGETS["loop_peak_gib_max_512"] else "FAIL"])
        print("\nISSUE 11 TARGETS (GB in the issue = GiB: 7.22 is the bf16 klein-4B in GiB)")
        print(table(["target", "measured", "verdict"], checks))
        ref = REFERENCE_H100
        print("\nreference run (H100, issue 11; another machine, for context only): bf16 step "
              f"{ref['bf16_step_ms'][512]} / {ref['bf16_step_ms'][1024]} ms at 512^2 / 1024^2, peak "
              f"{ref['bf16_peak_gib'][512]} / {ref['bf16_peak_gib'][1024]} GiB; dequantize-per-forward 1-bit "
              f"{ref['reference_1bit_slowdown'][512]}x / {ref['reference_1bit_slowdown'][1024]}x slower, peak "
              f"{ref['reference_1bit_peak_gib'][512]} / {ref['reference_1bit_peak_gib'][1024]} GiB; weights "
              f"{ref['weights_gib']['bf16']} -> {ref['weights_gib']['1bit']} GiB")
    else:
        print("\n(tiny config: a smoke run of the script; the issue's targets apply to --config klein-4b)")

    write_json(args.json, {
        "benchmark": "bench_klein_step", "command": command_line(), "machine": info,
        "settings": {"config_name": args.config, "config": config, "dtype": dname, "sizes": args.sizes,
                     "text_tokens": args.text_tokens, "warmup": args.warmup, "repeats": args.repeats,
                     "loop_steps": args.loop_steps, "loop_repeats": args.loop_repeats, "kernel": kernel,
                     "quick": args.quick},
        "parameters": n_params, "build_s": build_s, "build_peak_bytes": build_mem.result["peak_bytes"],
        "quantize_s": quant_s, "quantize_peak_bytes": q_mem.result["peak_bytes"],
        "quantized_layers": len(q), "quant_report_bytes": {"before": report.bytes_before, "after": report.bytes_after},
        "weights": {"A": weights_a, "B": weights_b},
        "A": {str(s): r for s, r in a.items()}, "B": {str(s): r for s, r in b.items()},
        "C_graph": {str(s): r for s, r in c.items()},
        "ratios_B_over_A": {str(s): {"step": ratio(b[s]["step_s"], a[s]["step_s"]),
                                     "loop": ratio(b[s]["loop_s"], a[s]["loop_s"]),
                                     "loop_peak": ratio(b[s]["loop_peak_bytes"], a[s]["loop_peak_bytes"])}
                            for s in args.sizes},
        "targets": checks, "reference_h100": REFERENCE_H100,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
