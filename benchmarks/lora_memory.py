"""Memory over many generations with model and LoRA switches: does it stay flat?

Renders ``--generations`` images, switching the model every ``--switch-every`` images (between the
``--model`` folders given, through ``engine.load_engine``, which unloads the previous one and
frees the device cache) and the attached LoRA set every image (none, A, B, A+B, cycling; synthetic
LoRAs of rank ``--lora-rank`` on every attention / feed-forward layer unless ``--lora`` files are
given). After each image it records, on CUDA, ``torch.cuda.memory_allocated`` (what live tensors
hold) and ``memory_reserved`` (what the caching allocator keeps), on a CPU the process's resident
memory. Flat means: after the first round (every model and LoRA set seen once), the allocated
memory at the same point of the cycle returns to the same value, and the maximum does not creep.

    python benchmarks/lora_memory.py --model models/bonsai/a --model models/bonsai/b --generations 50
    python benchmarks/lora_memory.py --tiny --generations 50 --size 64 --steps 2      # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _malloc_trim, header, machine_info, table, write_json  # noqa: E402

import torch  # noqa: E402


def rss() -> int:
    import psutil

    _malloc_trim()  # freed heap pages back to the system, so resident memory counts what is live
    return psutil.Process().memory_info().rss


def main() -> int:
    from batch_throughput import synthetic_lora

    from bonsai_core.engine import load_engine, unload_current

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="Bonsai folder (give two to switch models)")
    p.add_argument("--tiny", action="store_true", help="two test-sized SD models (CPU smoke run)")
    p.add_argument("--lora", action="append", default=[], help="LoRA files A and B (default: synthetic)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--generations", type=int, default=50)
    p.add_argument("--switch-every", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bonsai-lora-memory-"))
    if args.tiny and not args.model:
        from bonsai_core.convert import convert_pipeline
        from tests.sd_fixtures import make_tiny_sd_pipeline

        args.model = [str(convert_pipeline(make_tiny_sd_pipeline(work / f"fp{i}", seed=i), work / f"m{i}",
                                           log=lambda m: None).dst) for i in range(2)]
    if not args.model:
        p.error("give --model (twice to switch models) or --tiny")
    engine = load_engine(args.model[0], device=args.device, dtype=args.dtype)
    device = engine.device
    loras = args.lora or [str(synthetic_lora(engine, work / f"lora{i}.safetensors", args.lora_rank, seed=i)[0])
                          for i in range(2)]
    plans = [[], [(loras[0], 1.0)], [(loras[1], 1.0)], [(loras[0], 0.7), (loras[1], 0.3)]]
    info = machine_info(device)
    print(header("memory over generations with model and LoRA switches", info))
    rows = []
    for i in range(args.generations):
        model = args.model[(i // args.switch_every) % len(args.model)]
        engine = load_engine(model, device=args.device, dtype=args.dtype)
        engine.use_loras(plans[i % len(plans)])
        engine.generate("a bonsai tree", steps=args.steps, width=args.size, height=args.size, seed=i)
        gc.collect()
        row = {"i": i, "model": Path(model).name, "loras": len(plans[i % len(plans)])}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row |= {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
                    "peak": torch.cuda.max_memory_allocated(device)}
            torch.cuda.reset_peak_memory_stats(device)
        else:
            row |= {"rss": rss()}
        rows.append(row)
    unload_current()
    key = "allocated" if device.type == "cuda" else "rss"
    warm = len(plans) * len(args.model) * max(1, args.switch_every // len(plans))
    warm = min(warm, len(rows) // 2)
    after = [r[key] for r in rows[warm:]]
    first_round = {(r["model"], r["i"] % len(plans)): r[key] for r in rows[:warm]}
    drift = max(abs(r[key] - first_round[(r["model"], r["i"] % len(plans))]) for r in rows[warm:]
                if (r["model"], r["i"] % len(plans)) in first_round) if rows[warm:] else 0
    mib = 2**20
    print(table(["image", "model", "LoRAs", f"{key} MiB"] + (["reserved MiB", "peak MiB"] if key == "allocated" else []),
                [[r["i"], r["model"], r["loras"], f"{r[key] / mib:.1f}"]
                 + ([f"{r['reserved'] / mib:.1f}", f"{r['peak'] / mib:.1f}"] if key == "allocated" else [])
                 for r in rows]))
    print(f"\nafter the first {warm} images: {key} {min(after) / mib:.1f}..{max(after) / mib:.1f} MiB; largest "
          f"difference from the same model and LoRA set in the first round: {drift / mib:.2f} MiB")
    write_json(args.json, {"machine": info, "rows": rows, "warm_up": warm, "drift_bytes": drift,
                           "max_after_warm_up": max(after), "min_after_warm_up": min(after)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
