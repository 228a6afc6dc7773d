"""The ``bonsai`` command: generate | convert | import | export-gguf | info.

Every ``BonsaiError`` becomes one clear line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import BonsaiError, BonsaiRequestError


def _cmd_convert(args) -> int:
    from .convert import convert_pipeline

    result = convert_pipeline(args.src, args.dst, quantize_text_encoder=args.quantize_text_encoder,
                              overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(result.table(all_rows=args.all))
    print(f"\nwrote {result.dst}")
    return 0


def _cmd_import(args) -> int:
    from .hub import resolve_model
    from .importers.assemble import import_model

    # SRC may be a Hub repo id (e.g. prism-ml/bonsai-image-binary-4B-mlx-1bit): fetched into the cache
    try:
        src = resolve_model(args.src, args.cache_dir)
    except BonsaiError as exc:  # resolve_model's advice names generate's --model; import takes SRC
        text = str(exc).replace("point --model at a local folder", "give a local folder as SRC")
        raise type(exc)(text) from exc
    result = import_model(src, args.dst, layout=args.layout, text_encoder=args.text_encoder, vae=args.vae,
                          tokenizer=args.tokenizer, scheduler=args.scheduler,
                          allow_dequantize=args.allow_dequantize, overwrite=args.overwrite,
                          log=lambda m: print(m, file=sys.stderr))
    print(result.table())
    print(f"\nwrote {result.dst}")
    return 0


def _cmd_export_gguf(args) -> int:
    from .importers.assemble import export_gguf

    out = export_gguf(args.model_dir, args.out, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}")
    return 0


def describe_model(path: Path) -> str:
    """What a Bonsai model folder or file holds: family, components, quantized layers, bytes."""
    from . import checkpoint, validate
    from .loader import check_component, family_of, read_model_index

    lines = []
    path = Path(path)
    files: list[tuple[str, Path]] = []
    if path.is_file() or (path.exists() and not path.is_dir()):
        validate.check_regular_file(path, "Bonsai file")  # a FIFO or socket is named as such, never opened
        files.append(("file", path))
    else:
        index = read_model_index(path)
        family, denoiser = family_of(index, path)
        lines.append(f"model:   {path}")
        lines.append(f"family:  {family} (denoiser: {denoiser})")
        bonsai = index.get("_bonsai")
        lines.append(f"format:  {'Bonsai v' + str(bonsai['format_version']) if bonsai else 'full precision (not converted)'}")
        for name, entry in validate.components(index).items():
            comp = path / name
            if "Tokenizer" in entry[1] or "Scheduler" in entry[1]:  # checked by read_model_index
                weights, kind = [], "files"
            else:  # the loader's own checks: config, skeleton, every header against it
                _skeleton, weights, bonsai = check_component(path, name, entry)
                kind = "Bonsai Q1_0" if bonsai else "dense"
            size = sum(p.stat().st_size for p in weights)
            lines.append(f"  {name:<14} {entry[1]:<28} {kind:<12} {size / 2**20:9.1f} MiB")
            files += [(name, p) for p in weights if checkpoint.is_bonsai_file(p)]
    for name, f in files:
        meta = checkpoint.read_header(f)  # the header says what it holds: no tensor is built
        checkpoint.check_scales(f, meta)  # ... and every Q1_0 scale is finite (memory-mapped, 2 bytes a block)
        policy = meta["policy"]
        q = {k: v for k, v in meta["tensors"].items() if v["type"] == "Q1_0"}
        q4 = {k: v for k, v in meta["tensors"].items() if v["type"] == "Q4_AFFINE"}
        dense = {k: v for k, v in meta["tensors"].items() if v["type"] not in ("Q1_0", "Q4_AFFINE")}
        by_type: dict[str, int] = {}
        for v in dense.values():
            by_type[v["type"]] = by_type.get(v["type"], 0) + 1
        lines.append(f"{name}: {f.name}  format v{meta['format_version']}, group {meta['group_size']}, "
                     f"family {meta.get('family', '')}, policy {policy.get('name', '?')}")
        lines.append(f"  Q1_0 tensors: {len(q)}   " + (f"Q4_AFFINE tensors: {len(q4)}   " if q4 else "") +
                     f"dense tensors: {len(dense)} "
                     f"({', '.join(f'{n} {t}' for t, n in sorted(by_type.items()))})")
        if policy.get("keep"):
            lines.append(f"  kept in 16-bit by pattern: {', '.join(policy['keep'])}")
    return "\n".join(lines)


def defaults_of(path: Path) -> str:
    """Which ``FAMILY_DEFAULTS`` entry a model folder runs with, read from its model_index.json alone."""
    from .loader import family_of, read_model_index

    index = read_model_index(Path(path))
    family, _ = family_of(index, Path(path))
    if family == "sd_unet" and (isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0]
                                or index.get("_class_name") == "StableDiffusionXLPipeline"):
        return "sdxl"
    return family


def _cmd_info(args) -> int:
    if args.config:
        from .config import BonsaiConfig

        family = defaults_of(Path(args.path)) if args.path is not None and Path(args.path).is_dir() else None
        print(BonsaiConfig.from_env().describe(family))
        if args.path is None:
            return 0
        print()
    if args.path is None:
        raise BonsaiError("bonsai info needs a PATH (a Bonsai folder or file), or --config")
    print(describe_model(Path(args.path)))
    return 0


def _checked_out(out: Path) -> Path:
    """``--out`` checked before any work: not a folder, a known image extension (none: .png), a
    parent that is a folder (or can be made) and can be written to."""
    import os

    from .engine import image_format

    if out.is_dir():
        raise BonsaiRequestError(f"--out {out} is a folder; give a file name such as {out / 'bonsai.png'}")
    if out.suffix == "":
        out = out.with_suffix(".png")
    image_format(out)
    parent = out.parent.resolve()
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BonsaiRequestError(f"--out {out}: {existing} is a file, not a folder; pick another path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise BonsaiRequestError(f"--out {out}: cannot write in {existing} (permission denied); pick another folder")
    return out


def _cmd_generate(args) -> int:
    from tqdm import tqdm

    from .config import BonsaiConfig
    from .engine import BonsaiImageEngine

    # flags are the top layer of the settings: defaults, then BONSAI_* variables, then these
    config = BonsaiConfig.from_env(model=args.model, device=args.device, cache_dir=args.cache_dir, steps=args.steps,
                                   width=args.width, height=args.height, guidance=args.cfg, sampler=args.sampler,
                                   karras=True if args.karras else None, schedule=args.schedule,
                                   max_vram_gb=args.max_vram)
    if config.model is None:
        raise BonsaiError("no model given: pass --model DIR_OR_REPO (or set BONSAI_MODEL)")
    out = _checked_out(Path(args.out))
    engine = BonsaiImageEngine.from_pretrained(config.model, device=config.device, dtype=args.dtype,
                                               cache_dir=config.cache_dir, config=config)
    print(f"loaded {engine.model_name} ({engine.family.name}) on {engine.choice.reason} "
          f"in {engine.load_seconds:.1f} s", file=sys.stderr)
    if args.lora:
        from .lora import parse_lora_arg

        # the attached set made exactly the list, as `bonsai batch` and the nodes make it (one file given
        # twice adds its strengths); a file with a key that fits nothing is refused as a whole
        engine.use_loras([parse_lora_arg(spec) for spec in args.lora])
        for adapter in engine.lora_set().adapters.values():
            print(f"LoRA {adapter.path.name}: {len(adapter.modules)} layers at strength {adapter.strength:g}",
                  file=sys.stderr)
    bar = tqdm(total=config.family_value("steps", engine.family.defaults), unit="step", file=sys.stderr)

    def progress(step, total, _preview):
        bar.total = total
        bar.update(step - bar.n)

    try:
        result = engine.generate(args.prompt, args.negative, seed=args.seed, batch=args.batch,
                                 guardrail=args.guardrail, style_prefix=args.style_prefix or None,
                                 default_negative=not args.no_default_negative,
                                 true_cfg=True if args.true_cfg else None, callback=progress)
    finally:
        bar.close()
    for w in result.warnings:
        print(f"bonsai: warning: {w}", file=sys.stderr)
    written = []
    for i in range(len(result.images)):
        target = out if len(result.images) == 1 else out.with_name(f"{out.stem}_{i:02d}{out.suffix or '.png'}")
        written.append(result.save(target, i))
    m = result.metadata
    peak = f", peak {m['peak_bytes'] / 2**20:.0f} MiB ({m['peak_kind']})" if m.get("peak_bytes") else ""
    tiled = f", VAE decoded in {m['vae_tile']} px tiles" if m.get("vae_tile") else ""
    print(f"{m['width']}x{m['height']}, {m['steps']} steps {m['sampler']}, seed {m['seed']}: "
          f"{m['timings']['total_s']:.1f} s{peak}{tiled}", file=sys.stderr)
    for p in written:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonsai", description="Run and convert 1-bit (Q1_0) diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("-n", "--negative", default=None, help="negative prompt (default: the config's, for CFG models)")
    g.add_argument("--model", default=None, help="Bonsai folder or Hub repo id (default: BONSAI_MODEL)")
    g.add_argument("--steps", type=int, default=None,
                   help="default: BONSAI_STEPS, else the model family's (24 SD1.5, 30 SDXL, 4 klein)")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (default: BONSAI_GUIDANCE, else the family's)")
    g.add_argument("--seed", type=int, default=None, help="default: random (printed and saved in the PNG)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--sampler", choices=["euler", "dpmpp_2m"], default=None)
    g.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (SD family; BONSAI_KARRAS)")
    g.add_argument("--schedule", choices=["auto", "euler", "dpm"], default=None,
                   help="SD sigmas: auto (the sampler's own diffusers scheduler, the default), euler (Euler's for "
                        "either sampler), dpm (DPM-Solver's); BONSAI_SCHEDULE")
    g.add_argument("--batch", type=int, default=1, help="images to make; image i uses seed+i")
    g.add_argument("--device", default=None, help="auto | cuda | cuda:N | mps | cpu (default: BONSAI_DEVICE or auto)")
    g.add_argument("--dtype", default=None, help="auto | fp16 | bf16 | fp32")
    g.add_argument("--max-vram", type=float, default=None, metavar="GB",
                   help="GPU memory budget (default: BONSAI_MAX_VRAM_GB, else 6): the text encoder stays on the "
                        "GPU only when the run fits it, measured")
    g.add_argument("--cache-dir", default=None, help="Hub download cache (default: BONSAI_CACHE)")
    g.add_argument("--guardrail", choices=["warn", "clamp", "refuse"], default="warn")
    g.add_argument("--style-prefix", action="store_true", help="prepend the config's style prefix")
    g.add_argument("--no-default-negative", action="store_true", help="leave an empty negative prompt empty")
    g.add_argument("--true-cfg", action="store_true",
                   help="classifier-free guidance with the negative prompt also for guidance-distilled models "
                        "(FLUX.2 klein; needs --cfg other than 1; two passes a step)")
    g.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                   help="attach a LoRA .safetensors (kohya or diffusers/PEFT keys) at STRENGTH (default 1); repeatable")
    g.add_argument("--out", default="bonsai.png",
                   help="image to write: .png (parameters as PNG text), .jpg or .webp (in EXIF); a batch adds _00, _01, ...")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("convert", help="turn a full-precision diffusers pipeline folder into a Bonsai folder")
    c.add_argument("src", help="diffusers pipeline folder (model_index.json, unet/ or transformer/, vae/, ...)")
    c.add_argument("dst", help="Bonsai folder to write (written atomically)")
    c.add_argument("--quantize-text-encoder", action="store_true", help="also make the text encoder 4-bit (Q4_AFFINE, group 64); "
                   "the table shows its prompt embeddings' cosine per token against the dense one")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--all", action="store_true", help="print every layer in the table")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("info", help="print what a Bonsai model holds")
    i.add_argument("path", nargs="?", help="Bonsai folder or component file")
    i.add_argument("--config", action="store_true",
                   help="print the settings in force and where each came from (for the model at PATH, if given)")
    i.set_defaults(func=_cmd_info)

    im = sub.add_parser("import", help="assemble a public Bonsai Image 4B payload (GGUF, gemlite, MLX, unpacked) "
                                       "into a Bonsai FLUX.2 [klein] folder, without re-quantizing")
    im.add_argument("src", help="public repo folder, or a single transformer file/folder (e.g. a Q1_0 .gguf)")
    im.add_argument("dst", help="Bonsai folder to write (written atomically)")
    im.add_argument("--layout", choices=["gguf_q1", "gemlite", "mlx", "unpacked"], default=None,
                    help="transformer layout (default: detected)")
    im.add_argument("--text-encoder", default=None, help="text encoder folder (dense, MLX 4-bit or HQQ 4-bit)")
    im.add_argument("--vae", default=None, help="AutoencoderKLFlux2 folder")
    im.add_argument("--tokenizer", default=None, help="Qwen tokenizer folder")
    im.add_argument("--scheduler", default=None, help="scheduler folder (default: the source's, else klein's)")
    im.add_argument("--allow-dequantize", action="store_true",
                    help="store ternary linears dense instead of refusing them (large)")
    im.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    im.add_argument("--cache-dir", default=None, help="Hub download cache when SRC is a repo id (default: BONSAI_CACHE)")
    im.set_defaults(func=_cmd_import)

    eg = sub.add_parser("export-gguf", help="write the transformer of a Bonsai FLUX.2 [klein] folder as a Q1_0 .gguf")
    eg.add_argument("model_dir", help="Bonsai FLUX.2 [klein] folder")
    eg.add_argument("out", help=".gguf file to write (BFL tensor names, Q1_0 blocks copied as they are)")
    eg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    eg.set_defaults(func=_cmd_export_gguf)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


_EXTRA_COMMANDS: list = []

from .distill import add_subcommand as _add_distill  # noqa: E402  (light: imports torch only when run)

_EXTRA_COMMANDS.append(_add_distill)

from .batch import add_subcommand as _add_batch  # noqa: E402  (light: torch, accelerate only when run)

_EXTRA_COMMANDS.append(_add_batch)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BonsaiError as exc:
        print(f"bonsai: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bonsai: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
