"""Estimate a full-size FLUX.2 [klein] 4B step on this CPU from per-layer timings, without ever
allocating the 4 B-parameter model.

Method (printed with the results):
  1. The layer inventory comes from the real module tree: ``Flux2Transformer2DModel`` in the
     klein-4B config is built on the meta device (no memory), every ``Linear`` is classified by the
     tokens it sees in one step (double blocks: image-stream linears see the image tokens, text-stream
     ones the 512 text tokens; single blocks see both; modulation and time embedders see one row),
     and by the Bonsai policy (``default_policy("flux2_klein")``: Q1_0 or kept 16-bit).
  2. Each distinct (shape, tokens) is timed on ONE layer instance, built, timed and freed before the
     next: fp32 dense, bf16 dense, and Bonsai 1-bit (``BonsaiLinear``, fp32 compute, the kernel that
     BONSAI_KERNEL selects: ``reference`` by default = dequantize then matmul). Kept 16-bit layers run
     dense in the compute dtype in a Bonsai model, so their Bonsai time is their fp32 time.
  3. Attention: ``torch.nn.functional.scaled_dot_product_attention`` on [1, 24, L, 128] with L = image
     + text tokens (25 calls a step: 5 double + 20 single blocks), fp32 and bf16.
  4. Everything else (LayerNorm, modulation, RMSNorm of q/k, RoPE, SwiGLU, residual gates, concat)
     is measured, not guessed: a model of the real widths with 1 double + 1 single block (~0.56 B
     parameters) is run in each variant, each block timed by hooks, and "other ops" of a block is its
     measured time minus its linears and its attention. The same mini model gives a second,
     independent estimate: step = top level + 5 x double block + 20 x single block.
  5. step = sum(count x layer time) + 25 x attention + 5 x other(double) + 20 x other(single)
     + other(top level); image = steps x step (4 for klein). Transformer only: the Qwen3-4B text
     encoder (run once per prompt) and the FLUX.2 VAE decode are NOT included.

Weight memory: fp32 / bf16 = parameters x 4 / 2 bytes; Bonsai = Q1_0 (18 bytes per 128 weights)
+ kept layers in the compute dtype (fp32 on a CPU; the bf16 figure is what a file or GPU holds),
plus the reference path's transient: the largest dequantized weight (measured as the resident
increment of one forward of the largest layer).

    python benchmarks/klein_cpu_estimate.py --quick          # 256^2, ~1-2 min on 2 cores
    python benchmarks/klein_cpu_estimate.py --sizes 256 512  # both sizes, more repeats
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (KLEIN_4B_CONFIG, PeakMemory, build_random_transformer, command_line,  # noqa: E402
                    fmt_bytes, fmt_ratio, fmt_s, free_memory, header, machine_info, make_inputs, ratio,
                    table, time_fn, write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CPU = torch.device("cpu")
VARIANTS = ("fp32", "bf16", "bonsai")  # bonsai = Q1_0 weights, fp32 compute
VARIANT_NAMES = {"fp32": "fp32 dense", "bf16": "bf16 dense", "bonsai": "Bonsai 1-bit (fp32 compute)"}


# ------------------------------------------------------------------------------- the inventory
def tokens_of(name: str, n_img: int, n_txt: int) -> tuple[str, int]:
    """Which tokens a linear of the klein transformer sees in one step: (stream label, count)."""
    if name.startswith("transformer_blocks."):
        txt = any(k in name for k in (".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out", ".ff_context."))
        return ("txt", n_txt) if txt else ("img", n_img)
    if name.startswith("single_transformer_blocks."):
        return "img+txt", n_img + n_txt
    if name in ("x_embedder", "proj_out"):
        return "img", n_img
    if name == "context_embedder":
        return "txt", n_txt
    return "1 row", 1  # time embedder, modulation, norm_out: computed once from the timestep embedding


def group_of(name: str) -> str:
    if name.startswith("transformer_blocks."):
        return "double"
    if name.startswith("single_transformer_blocks."):
        return "single"
    return "top"


def short_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
        return ".".join(parts[2:])
    return name


def inventory(config: dict, n_img: int, n_txt: int) -> list[dict]:
    """One row per distinct (group, shape, tokens, quantized) with how many times a step runs it."""
    from diffusers import Flux2Transformer2DModel

    from bonsai_core.quant.policy import default_policy

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    policy = default_policy("flux2_klein")
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        out_f, in_f = m.out_features, m.in_features
        stream, tokens = tokens_of(name, n_img, n_txt)
        dec = policy.decide(name, m)
        key = (group_of(name), out_f, in_f, tokens, dec.quantize)
        row = rows.setdefault(key, {"group": key[0], "out": out_f, "in": in_f, "tokens": tokens, "stream": stream,
                                    "quantized": dec.quantize, "count": 0, "names": []})
        row["count"] += 1
        if short_name(name) not in row["names"]:
            row["names"].append(short_name(name))
    params = sum(p.numel() for p in model.parameters())
    return list(rows.values()), params, model


# ------------------------------------------------------------------------------- timing one layer
def time_linear(out_f: int, in_f: int, tokens: int, quantized: bool, args, cache: dict) -> dict:
    """Time one [out_f, in_f] linear on ``tokens`` rows in each variant; one instance, freed after."""
    key = (out_f, in_f, tokens, quantized)
    if key in cache:
        return cache[key]
    from bonsai_core.quant.layers import BonsaiLinear

    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0.0, in_f ** -0.5, generator=gen)
    x = torch.randn(1, tokens, in_f, generator=gen)
    res = {}
    stat = args.stat + "_s"
    with torch.inference_mode():
        res["fp32"] = time_fn(partial(F.linear, x, lin.weight), CPU, args.warmup, args.repeats)[stat]
        res["bf16"] = time_fn(partial(F.linear, x.to(torch.bfloat16), lin.weight.to(torch.bfloat16)), CPU,
                              args.warmup, args.repeats)[stat]
        if quantized:
            q = BonsaiLinear.from_linear(lin)
            lin.weight = None  # only the packed layer is left
            free_memory(CPU)
            q(x)  # first call outside the measured region (lookup tables, allocator growth)
            free_memory(CPU)
            with PeakMemory(CPU) as pm:
                q(x)
            res["bonsai_transient_bytes"] = pm.result["added_bytes"]
            res["bonsai"] = time_fn(partial(q, x), CPU, args.warmup, args.repeats)[stat]
            if args.bonsai_bf16:
                res["bonsai_bf16"] = time_fn(partial(q, x.to(torch.bfloat16)), CPU, args.warmup, args.repeats)[stat]
            del q
        else:
            res["bonsai"] = res["fp32"]  # kept 16-bit: dense in the compute dtype
            if args.bonsai_bf16:
                res["bonsai_bf16"] = res["bf16"]
    del lin, x
    free_memory(CPU)
    cache[key] = res
    return res


def time_attention(seq: int, heads: int, head_dim: int, args) -> dict:
    gen = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(1, heads, seq, head_dim, generator=gen) for _ in range(3))
    out = {}
    stat = args.stat + "_s"
    sdpa = F.scaled_dot_product_attention
    with torch.inference_mode():
        out["fp32"] = time_fn(partial(sdpa, q, k, v), CPU, args.warmup, args.repeats)[stat]
        out["bf16"] = time_fn(partial(sdpa, q.bfloat16(), k.bfloat16(), v.bfloat16()), CPU, args.warmup,
                              args.repeats)[stat]
    out["bonsai"] = out["fp32"]
    if args.bonsai_bf16:
        out["bonsai_bf16"] = out["bf16"]
    return out


# ------------------------------------------------------------------------------- the 1+1-block model
class _Stub(torch.nn.Module):
    """Stands in for a linear: returns a cached tensor of the right shape at ~zero cost, so a block run
    with stubs costs its norms, modulation, RoPE, SwiGLU, residuals and attention only."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.cache: dict = {}

    def forward(self, x):
        key = (tuple(x.shape[:-1]), x.dtype)
        out = self.cache.get(key)
        if out is None:
            out = torch.randn(*key[0], self.out_features, dtype=x.dtype) * 0.1
            self.cache[key] = out
        return out


def _swap_linears(model, make) -> dict:
    """Replace every linear of ``model`` by ``make(module)``; returns {name: original} to restore."""
    from bonsai_core.quant.layers import BonsaiLinear

    originals = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, (torch.nn.Linear, BonsaiLinear)):
            originals[name] = m
    for name, m in originals.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, make(m))
    return originals


def time_mini_model(size: int, n_txt: int, args) -> dict:
    """A klein model of the real widths with 1 double + 1 single block (~0.56 B parameters).

    ``blocks``: per variant, the measured time of the whole forward, of each block (forward hooks;
    CPU ops are synchronous) and of the top level (the rest). ``stubbed``: the same with every
    linear replaced by a ~free stub, per compute dtype: what norms, modulation, RoPE, SwiGLU,
    residuals and attention cost on their own.
    """
    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import default_policy

    config = dict(KLEIN_4B_CONFIG, num_layers=1, num_single_layers=1)
    model = build_random_transformer(config, CPU, torch.float32, seed=1)
    stamps: dict[str, list[float]] = {"double": [], "single": []}
    starts: dict[str, float] = {}

    def pre(label):
        return lambda mod, inp: starts.__setitem__(label, time.perf_counter())

    def post(label):
        return lambda mod, inp, out: stamps[label].append(time.perf_counter() - starts[label])

    for label, block in (("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])):
        block.register_forward_pre_hook(pre(label))
        block.register_forward_hook(post(label))

    def run(dtype, repeats) -> dict:
        inp = make_inputs(config, size, n_txt, CPU, dtype, seed=0)
        hidden = inp["noise"].to(dtype)
        t = torch.full((1,), 0.9, dtype=dtype)

        def fwd():
            return model(hidden_states=hidden, encoder_hidden_states=inp["encoder_hidden_states"], timestep=t,
                         img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=None, return_dict=False)[0]

        with torch.inference_mode():
            for _ in range(args.warmup):
                fwd()
            for v in stamps.values():
                v.clear()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fwd()
                times.append(time.perf_counter() - t0)
        med = min if args.stat == "min" else (lambda xs: sorted(xs)[len(xs) // 2])  # noqa: E731
        r = {"model_s": med(times), "double_s": med(stamps["double"]), "single_s": med(stamps["single"])}
        r["top_s"] = r["model_s"] - r["double_s"] - r["single_s"]
        return r

    blocks, stubbed = {}, {}
    blocks["fp32"] = run(torch.float32, args.block_repeats)
    originals = _swap_linears(model, lambda m: _Stub(m.out_features))
    stubbed["fp32"] = run(torch.float32, max(args.repeats, 3))
    model.to(torch.bfloat16)  # norm weights in bf16 too, so bf16 runs the fused kernels it would
    stubbed["bf16"] = run(torch.bfloat16, max(args.repeats, 3))
    for name, m in originals.items():  # put the real layers back (the stubs and their caches go)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, m)
    del originals
    model.to(torch.bfloat16)  # the restored layers are still fp32
    blocks["bf16"] = run(torch.bfloat16, args.block_repeats)
    model.to(torch.float32)
    quantize_model(model, default_policy("flux2_klein"))
    free_memory(CPU)
    blocks["bonsai"] = run(torch.float32, args.block_repeats)
    stubbed["bonsai"] = stubbed["fp32"]  # fp32 compute: the same elementwise work
    if args.bonsai_bf16:
        model.to(torch.bfloat16)
        blocks["bonsai_bf16"] = run(torch.bfloat16, args.block_repeats)
        stubbed["bonsai_bf16"] = stubbed["bf16"]
    return {"blocks": blocks, "stubbed": stubbed}  # the model goes with this frame


# ------------------------------------------------------------------------------- one size
def estimate_size(size: int, args, config: dict, variants: tuple[str, ...], cache: dict) -> dict:
    n_img, n_txt = (size // 16) ** 2, args.text_tokens
    seq = n_img + n_txt
    rows, params, _ = inventory(config, n_img, n_txt)
    print(f"\n--- {size}x{size}: {n_img} image + {n_txt} text tokens (attention over {seq})")
    t0 = time.perf_counter()
    for r in rows:
        r["time"] = time_linear(r["out"], r["in"], r["tokens"], r["quantized"], args, cache)
        print(f"    timed {r['group']:<6} [{r['out']}, {r['in']}] x {r['tokens']} tokens "
              f"({'Q1_0' if r['quantized'] else 'kept'}): "
              + ", ".join(f"{v} {fmt_s(r['time'][v])}" for v in variants))
    attn = time_attention(seq, config["num_attention_heads"], config["attention_head_dim"], args)
    print(f"    timed attention SDPA [1, {config['num_attention_heads']}, {seq}, {config['attention_head_dim']}]: "
          + ", ".join(f"{v} {fmt_s(attn[v])}" for v in variants))
    mini = None
    if not args.no_block_check:
        print("    timing the 1 double + 1 single block model of the real widths (linears stubbed; then fp32, "
              "bf16, Bonsai) ...")
        mini = time_mini_model(size, n_txt, args)
        free_memory(CPU)
        for v in variants:
            m, st = mini["blocks"][v], mini["stubbed"][v]
            print(f"      {v:<11} double block {fmt_s(m['double_s'])} (without linears {fmt_s(st['double_s'])}), "
                  f"single block {fmt_s(m['single_s'])} (without linears {fmt_s(st['single_s'])}), "
                  f"top level {fmt_s(m['top_s'])} (without linears {fmt_s(st['top_s'])})")
    print(f"    ({fmt_s(time.perf_counter() - t0)})")

    n_double, n_single = config["num_layers"], config["num_single_layers"]
    totals = {}
    for v in variants:
        lin = {g: sum(r["count"] * r["time"][v] for r in rows if r["group"] == g) for g in ("double", "single", "top")}
        t = {"linears_s": sum(lin.values()), "linears_by_group_s": lin,
             "attention_s": (n_double + n_single) * attn[v]}
        if mini:
            st, bl = mini["stubbed"][v], mini["blocks"][v]
            # elementwise work of a block = the block with its linears stubbed, minus its attention call
            t["other_per_double_s"] = max(st["double_s"] - attn[v], 0.0)
            t["other_per_single_s"] = max(st["single_s"] - attn[v], 0.0)
            t["other_top_s"] = max(st["top_s"], 0.0)
            t["other_s"] = n_double * t["other_per_double_s"] + n_single * t["other_per_single_s"] + t["other_top_s"]
            t["block_method_step_s"] = bl["top_s"] + n_double * bl["double_s"] + n_single * bl["single_s"]
        else:
            t["other_s"] = 0.0
        t["step_s"] = t["linears_s"] + t["attention_s"] + t["other_s"]
        t["image_s"] = args.image_steps * t["step_s"]
        totals[v] = t
    return {"size": size, "image_tokens": n_img, "text_tokens": n_txt, "seq": seq, "params": params,
            "rows": rows, "attention": attn, "mini_model": mini, "totals": totals}


def print_size(res: dict, args, variants: tuple[str, ...]) -> None:
    size = res["size"]
    print(f"\nPER LAYER, {size}x{size} (ms per call; 'per step' = count x per call; Bonsai = fp32 compute)")
    heads = ["group", "layer(s)", "[out, in]", "tokens", "Q1_0", "count"]
    heads += [f"{v} /call" for v in variants] + ["bonsai/fp32", "bonsai/bf16"] + [f"{v} /step" for v in variants]
    rows = []
    for r in res["rows"]:
        t = r["time"]
        names = ", ".join(n.replace("time_guidance_embed.timestep_embedder.", "time_embedder.") for n in r["names"])
        rows.append([r["group"], names[:52], f"[{r['out']}, {r['in']}]", r["tokens"],
                     "yes" if r["quantized"] else "kept",
                     r["count"], *[f"{t[v] * 1000:.2f}" for v in variants],
                     fmt_ratio(ratio(t["bonsai"], t["fp32"])), fmt_ratio(ratio(t["bonsai"], t["bf16"])),
                     *[fmt_s(r["count"] * t[v]) for v in variants]])
    a = res["attention"]
    n_att = len(args.config_blocks)
    rows.append(["attn", "SDPA, 24 heads x 128", "-", res["seq"], "-", n_att, *[f"{a[v] * 1000:.2f}" for v in variants],
                 fmt_ratio(ratio(a["bonsai"], a["fp32"])), fmt_ratio(ratio(a["bonsai"], a["bf16"])),
                 *[fmt_s(n_att * a[v]) for v in variants]])
    tot = res["totals"]
    if res["mini_model"]:
        for key, count, what in (("other_per_double_s", args.n_double, "norms/mod/RoPE/SwiGLU/residual, double block"),
                                 ("other_per_single_s", args.n_single, "norms/mod/RoPE/SwiGLU/residual, single block"),
                                 ("other_top_s", 1, "top level: timestep embed, RoPE tables, concat")):
            rows.append(["other", what, "-", "-", "-", count, *[f"{tot[v][key] * 1000:.2f}" for v in variants],
                         "-", "-", *[fmt_s(count * tot[v][key]) for v in variants]])
    print(table(heads, rows, "<<<>>>" + ">" * (3 * len(variants) + 2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sides")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--image-steps", type=int, default=4, help="sampling steps of one image (klein: 4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per layer and variant (median)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the repeats (min resists other jobs on shared cores; median is the default)")
    p.add_argument("--block-repeats", type=int, default=3, help="timed forwards of the 1+1-block model")
    p.add_argument("--no-block-check", action="store_true",
                   help="skip the 1+1-block model (then norms/modulation/RoPE are left out of the estimate)")
    p.add_argument("--bonsai-bf16", action="store_true", help="also time Bonsai 1-bit with bf16 compute")
    p.add_argument("--kernel", choices=["reference", "auto"], default="reference",
                   help="BONSAI_KERNEL for the Bonsai layers (default reference: dequantize, then matmul)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="--sizes 256 --repeats 2 --block-repeats 1 (~1-2 min)")
    p.add_argument("--json", help="write the full result as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.block_repeats = [256], 2, 1
    os.environ["BONSAI_KERNEL"] = args.kernel
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = VARIANTS + (("bonsai_bf16",) if args.bonsai_bf16 else ())
    config = dict(KLEIN_4B_CONFIG)
    args.n_double, args.n_single = config["num_layers"], config["num_single_layers"]
    args.config_blocks = range(args.n_double + args.n_single)
    info = machine_info(CPU, torch.float32)
    print(header("klein_cpu_estimate: FLUX.2 klein 4B step time on this CPU, estimated from per-layer timings", info))
    print("method  : each distinct linear (shape x tokens) timed on one instance at a time, times its count in a\n"
          "          step; + 25 x SDPA attention; + norms/modulation/RoPE/SwiGLU measured on a 1 double + 1 single\n"
          "          block model of the real widths with its linears stubbed out (minus attention). Check: the\n"
          "          same blocks timed whole with real layers, x 5 / x 20.\n"
          f"          Bonsai = Q1_0 BonsaiLinear, BONSAI_KERNEL={args.kernel}, fp32 compute; kept layers dense fp32.\n"
          f"          Image = {args.image_steps} steps of the transformer only: text encoder (Qwen3-4B) and VAE "
          "NOT included.")
    print(f"timing  : warm-up {args.warmup}, {args.stat} of {args.repeats} per layer, {args.block_repeats} per "
          "block-model forward")

    t_start = time.perf_counter()
    cache: dict = {}
    results = [estimate_size(s, args, config, variants, cache) for s in args.sizes]

    # weight memory (shapes only: the meta model)
    from bonsai_core.quant.layers import plan_report
    from bonsai_core.quant.policy import default_policy

    _, params, meta_model = inventory(config, 1, 1)
    pol = default_policy("flux2_klein")
    plan32 = plan_report(meta_model, pol, reference_dtype=torch.float32)
    plan16 = plan_report(meta_model, pol, reference_dtype=torch.bfloat16)
    transient = max((r["time"].get("bonsai_transient_bytes") or 0) for res in results for r in res["rows"])
    weights = {"fp32": params * 4, "bf16": params * 2, "bonsai": plan32.bytes_after,
               "bonsai_kept_bf16": plan16.bytes_after, "bonsai_reference_transient": transient}
    if args.bonsai_bf16:
        weights["bonsai_bf16"] = plan16.bytes_after

    for res in results:
        print_size(res, args, variants)
    print("\n" + "=" * 100)
    print(f"ESTIMATED FULL-SIZE klein-4B ({params / 1e9:.2f} B parameters) ON THIS CPU "
          f"({info['cpu']}, {info['torch_threads']} threads) — transformer only, no text encoder, no VAE")
    rows = []
    for res in results:
        tot = res["totals"]
        s = res["size"]
        for v in variants:
            t = tot[v]
            rows.append([f"{s}^2", VARIANT_NAMES.get(v, "Bonsai 1-bit (bf16 compute)"), fmt_s(t["linears_s"]),
                         fmt_s(t["attention_s"]), fmt_s(t["other_s"]) if res["mini_model"] else "not measured",
                         fmt_s(t["step_s"]), fmt_s(t.get("block_method_step_s")),
                         "n/a" if "block_method_step_s" not in t else
                         f"{100 * (t['step_s'] / t['block_method_step_s'] - 1):+.0f}%", fmt_s(t["image_s"]),
                         fmt_ratio(ratio(t["step_s"], tot["fp32"]["step_s"])),
                         fmt_ratio(ratio(t["step_s"], tot["bf16"]["step_s"]))])
    print(table(["size", "variant", "linears", "attention", "other ops", "step (sum)", "step (block check)",
                 "sum vs check", f"{args.image_steps}-step image", "vs fp32", "vs bf16"], rows, "<<>>>>>>>>>"))
    print("'step (sum)' = the estimate: per-layer linears + attention + other ops (each measured alone).\n"
          "'step (block check)' = an independent second estimate: top level + 5 x double + 20 x single block, each\n"
          "block timed whole inside the 1+1-block model; the two agree to the '%' shown when timings are clean.")
    print("\nWEIGHT MEMORY (held by the transformer; activations not included)")
    wrows = [["fp32 dense", fmt_bytes(weights["fp32"]), "1.000x"],
             ["bf16 dense", fmt_bytes(weights["bf16"]), fmt_ratio(weights["bf16"] / weights["fp32"])],
             ["Bonsai 1-bit, kept layers fp32 (CPU compute)", fmt_bytes(weights["bonsai"]),
              fmt_ratio(weights["bonsai"] / weights["fp32"])],
             ["Bonsai 1-bit, kept layers bf16 (file / GPU)", fmt_bytes(weights["bonsai_kept_bf16"]),
              fmt_ratio(weights["bonsai_kept_bf16"] / weights["fp32"])],
             ["  + reference-path transient (largest layer dequantized, measured)", fmt_bytes(transient), ""],
             ["  = Bonsai peak weight memory on this CPU", fmt_bytes(weights["bonsai"] + transient),
              fmt_ratio((weights["bonsai"] + transient) / weights["fp32"])]]
    print(table(["variant", "bytes", "vs fp32"], wrows, "<>>"))
    print(f"\nQ1_0 layers: {sum(1 for l in plan16.layers if l.quantized)} of {len(plan16.layers)} linears; "
          f"ran in {fmt_s(time.perf_counter() - t_start)}")
    print("caveats: one layer instance is re-used across repeats, so small weights may sit in cache (the real model "
          "streams 25 blocks of different weights); the CPU is shared if the load average above is high.")

    write_json(args.json, {
        "benchmark": "klein_cpu_estimate", "command": command_line(), "machine": info,
        "settings": {"sizes": args.sizes, "text_tokens": args.text_tokens, "image_steps": args.image_steps,
                     "warmup": args.warmup, "repeats": args.repeats, "block_repeats": args.block_repeats,
                     "stat": args.stat,
                     "kernel": args.kernel, "quick": args.quick, "config": config},
        "method": __doc__.split("Method (printed with the results):")[1].split("Weight memory:")[0].strip(),
        "excluded": ["text encoder (Qwen3-4B, 4-bit in Bonsai Image 4B)", "VAE decode", "scheduler (negligible)"],
        "parameters": params, "weights_bytes": weights,
        "sizes": [{k: v for k, v in r.items()} for r in results],
        "ratios": {str(r["size"]): {f"bonsai_over_{base}": ratio(r["totals"]["bonsai"]["step_s"],
                                                                 r["totals"][base]["step_s"])
                                    for base in ("fp32", "bf16")}
                   for r in results},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
