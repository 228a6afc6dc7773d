"""``bonsai batch``: many prompts -> one PNG each and a ``manifest.jsonl``; resumable; one process per
device under ``accelerate launch``.

Prompts: a ``.txt`` file (one prompt a line; blank lines and ``#`` comments skipped) or ``.jsonl``
(one JSON object a line: ``prompt`` and optionally ``negative``, ``seed``, ``steps``, ``cfg``,
``width``, ``height``, ``sampler``, ``karras``, ``overlay``). Entry ``i`` (in file order) is written
as ``DIR/<i:05d>-<slug>.png`` with seed ``--seed + i`` unless it names its own.

What makes it restartable (killed at any moment, run again with the same command):

* every PNG is written to a temporary name and renamed (``checkpoint.atomic_write``), so a file
  under its final name is complete; a finished image is never rendered or written again;
* each finished (or failed) entry leaves a record ``DIR/.bonsai-batch/records/<i>.json`` (also
  atomic), written after its PNG; a PNG without a record (killed between the two) gets its record
  back from the parameters embedded in the PNG itself, without rendering;
* every record and PNG carries the entry's fingerprint (prompt, seed, settings, model, LoRAs): a
  folder that holds another batch's image under the same number is refused, never overwritten;
* ``manifest.jsonl`` (one line per entry, in file order: prompt, seed, settings, file, seconds,
  device, status and error) is written at the end, atomically, by the main process only.

Several processes (``accelerate launch -m bonsai_core batch ...``): every process reads the
prompt file and the folder between two barriers (so all see the same finished set), the
unfinished entries are split with accelerate's ``PartialState.split_between_processes`` (disjoint
by construction), each process renders its share on its own device, and after a last barrier
the main process merges the records into the manifest. Across machines the folder must be on a
shared filesystem.

Failed entries (a bad size in one line, out of memory ...) are recorded with their error and the
batch goes on; the command exits with 1 if any failed, and running it again retries just those.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BonsaiError, BonsaiRequestError

ENTRY_KEYS = {"prompt", "negative", "seed", "steps", "cfg", "width", "height", "sampler", "karras", "overlay"}
STATE_DIR = ".bonsai-batch"
MANIFEST = "manifest.jsonl"


@dataclass
class Entry:
    index: int
    prompt: str
    negative: str | None = None
    seed: int | None = None
    settings: dict = field(default_factory=dict)  # steps, cfg, width, height, sampler, karras given for it
    overlay: str | None = None

    def file_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40].strip("-") or "image"
        return f"{self.index:05d}-{slug}.png"


def read_entries(path: str | Path) -> list[Entry]:
    """The prompt file's entries, in order; a line that cannot be used is refused with its number."""
    from .validate import check_regular_file

    path = Path(path)
    check_regular_file(path, "prompt file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise BonsaiRequestError(f"{path}: prompts are read from a .txt (one a line) or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BonsaiRequestError(f"{path}: not UTF-8 text ({exc})") from None
    entries: list[Entry] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix.lower() == ".txt":
            entries.append(Entry(len(entries), line.strip()))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BonsaiRequestError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise BonsaiRequestError(f"{path}:{number}: each line is an object with a \"prompt\" string")
        unknown = sorted(set(obj) - ENTRY_KEYS)
        if unknown:
            raise BonsaiRequestError(f"{path}:{number}: unknown key(s) {unknown}; known: {sorted(ENTRY_KEYS)}")
        settings = {k: obj[k] for k in ("steps", "cfg", "width", "height", "sampler", "karras") if k in obj}
        entries.append(Entry(len(entries), obj["prompt"], obj.get("negative"), obj.get("seed"), settings,
                             obj.get("overlay")))
    if not entries:
        raise BonsaiRequestError(f"{path}: no prompts in the file")
    return entries


@dataclass
class BatchOptions:
    """What every entry shares (an entry's own settings win)."""

    model: str
    out: Path
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    loras: list = field(default_factory=list)  # (file, strength)
    seed: int = 0
    negative: str | None = None
    settings: dict = field(default_factory=dict)  # steps, cfg, width, height, sampler, karras
    guardrail: str = "warn"
    upscale: float | None = None
    overlay: str | None = None
    overlay_position: str = "bottom"


def fingerprint(entry: Entry, opts: BatchOptions) -> dict:
    """Everything that decides an entry's image; its hash names the image's provenance."""
    model = Path(opts.model)
    lora_ids = [(str(Path(f).resolve()), float(s)) for f, s in opts.loras]
    return {"prompt": entry.prompt, "negative": entry.negative if entry.negative is not None else opts.negative,
            "seed": entry.seed if entry.seed is not None else opts.seed + entry.index,
            "settings": {**opts.settings, **entry.settings},
            "model": str(model.resolve()) if model.exists() else opts.model, "loras": lora_ids,
            "upscale": opts.upscale, "overlay": entry.overlay if entry.overlay is not None else opts.overlay,
            "overlay_position": opts.overlay_position}


def digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


def _record_path(out: Path, index: int) -> Path:
    return out / STATE_DIR / "records" / f"{index:05d}.json"


def _write_record(out: Path, index: int, record: dict) -> None:
    from . import checkpoint

    checkpoint.atomic_write(_record_path(out, index), lambda tmp: tmp.write_text(json.dumps(record)))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # only ever written atomically, so unreadable means absent


def _png_batch_info(path: Path) -> dict | None:
    """The ``bonsai`` metadata a finished PNG carries (None for an unreadable file)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return json.loads(im.text.get("bonsai", "null"))
    except Exception:  # noqa: BLE001 - any unreadable file is "no info"
        return None


def scan(entries: list[Entry], opts: BatchOptions) -> tuple[list[Entry], list[str]]:
    """Unfinished entries, and notes on what was recovered. Refuses a folder that holds another
    batch's image under one of these names."""
    todo, notes = [], []
    for e in entries:
        png, rec_path = opts.out / e.file_name(), _record_path(opts.out, e.index)
        want = digest(fingerprint(e, opts))
        rec = _read_json(rec_path) if rec_path.exists() else None
        if png.exists():
            info = rec if rec and rec.get("status") == "ok" else (_png_batch_info(png) or {}).get("batch")
            if not info or info.get("fingerprint") != want:
                raise BonsaiRequestError(
                    f"{png} already exists and was not made by this batch entry (prompt, seed, settings, model or "
                    "LoRAs differ); it is never overwritten: use another --out folder, or move the file away")
            if not (rec and rec.get("status") == "ok"):
                _write_record(opts.out, e.index, info)
                notes.append(f"entry {e.index}: image was complete, its record restored from the PNG")
            continue
        todo.append(e)
    return todo, notes


def render(engine, entry: Entry, opts: BatchOptions, process: int = 0) -> dict:
    """Generate one entry, post-process it, write the PNG then the record; returns the record."""
    fp = fingerprint(entry, opts)
    s = fp["settings"]
    t0 = time.perf_counter()
    result = engine.generate(entry.prompt, fp["negative"], steps=s.get("steps"), guidance=s.get("cfg"),
                             width=s.get("width"), height=s.get("height"), sampler=s.get("sampler"),
                             karras=s.get("karras"), seed=fp["seed"], guardrail=opts.guardrail)
    image = result.images[0]
    if opts.upscale:
        from PIL import Image

        image = image.resize((round(image.width * opts.upscale), round(image.height * opts.upscale)), Image.LANCZOS)
    if fp["overlay"]:
        from .overlay import OverlayStyle, draw_text

        image = draw_text(image, fp["overlay"], OverlayStyle(position=opts.overlay_position))
    result.images[0] = image
    m = result.metadata
    record = {"index": entry.index, "status": "ok", "file": entry.file_name(), "prompt": m["prompt"],
              "negative": m["negative_prompt"], "seed": m["seed"],
              "settings": {"steps": m["steps"], "cfg": m["guidance"], "width": m["width"], "height": m["height"],
                           "sampler": m["sampler"], "karras": m["karras"], "upscale": opts.upscale,
                           "overlay": fp["overlay"]},
              "model": m["model"], "loras": m.get("loras", []), "device": m["device"], "host": socket.gethostname(),
              "process": process,
              "time_s": round(time.perf_counter() - t0, 3), "finished_at": _now(), "fingerprint": digest(fp),
              "warnings": result.warnings}
    m["batch"] = record
    result.save(opts.out / entry.file_name(), 0)  # atomic; the PNG carries its record
    _write_record(opts.out, entry.index, record)
    return record


def _failed(entry: Entry, opts: BatchOptions, exc: BaseException, device: str, process: int = 0) -> dict:
    fp = fingerprint(entry, opts)
    record = {"index": entry.index, "status": "failed", "file": None, "prompt": entry.prompt, "seed": fp["seed"],
              "settings": fp["settings"], "device": device, "host": socket.gethostname(), "process": process,
              "error": f"{type(exc).__name__}: {exc}", "finished_at": _now(), "fingerprint": digest(fp)}
    _write_record(opts.out, entry.index, record)
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(entries: list[Entry], opts: BatchOptions) -> tuple[int, int, int]:
    """``manifest.jsonl`` from the records, one line per entry in file order (atomic). Returns
    (ok, failed, missing)."""
    from . import checkpoint

    lines, counts = [], {"ok": 0, "failed": 0, "missing": 0}
    for e in entries:
        rec = _read_json(_record_path(opts.out, e.index))
        if rec is None:
            counts["missing"] += 1
            rec = {"index": e.index, "status": "missing", "prompt": e.prompt, "file": None}
        else:
            counts[rec["status"] if rec.get("status") in counts else "failed"] += 1
        lines.append(json.dumps({k: v for k, v in rec.items() if k != "warnings" or v}))
    checkpoint.atomic_write(opts.out / MANIFEST, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return counts["ok"], counts["failed"], counts["missing"]


def _cpu_only(device: str | None) -> bool:
    """Processes of this launch compute on CPUs (accelerate's --cpu, --device cpu, or no GPU here):
    accelerate then joins them with gloo instead of looking for a GPU backend."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or str(device or "").startswith("cpu") or not torch.cuda.is_available()


def _engine_device(device) -> str:
    """accelerate's device for this process as the engine spells it (cpu, cuda:N, mps)."""
    return "cpu" if device.type == "cpu" else str(device)


def _one_of_several_asked() -> bool:
    """accelerate's simple launcher set up a rendezvous for several processes but started one."""
    return "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and "LOCAL_RANK" not in os.environ


def run_batch(prompts: str | Path, opts: BatchOptions, *, state=None, log=None, progress: bool = True) -> dict:
    """Render every unfinished entry of ``prompts`` into ``opts.out``. ``state``: an accelerate
    ``PartialState`` (made here when None). Returns a summary (on every process; the counts of
    the whole batch on the main one)."""
    from accelerate import PartialState
    from tqdm import tqdm

    from .engine import BonsaiImageEngine

    log = log or (lambda m: print(m, file=sys.stderr))
    state = state or PartialState(cpu=_cpu_only(opts.device))
    if state.num_processes == 1 and _one_of_several_asked():
        log("bonsai: warning: accelerate started one process: its --cpu launcher starts several only through "
            "mpirun (MPI); without MPI, `accelerate launch --multi_gpu --num_processes N` starts N CPU processes "
            "(torchrun, gloo) on a machine without GPUs")
    entries = read_entries(prompts)
    if opts.out.exists() and not opts.out.is_dir():
        raise BonsaiRequestError(f"--out {opts.out} is a file; give a folder")
    opts.out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()  # every process reads the folder as the previous run left it...
    todo, notes = scan(entries, opts)
    state.wait_for_everyone()  # ... before any of them writes to it
    for n in notes if state.is_main_process else ():
        log(n)
    device = opts.device
    if state.num_processes > 1 and device in (None, "auto", "cuda"):  # one device per process, not all on cuda:0
        device = _engine_device(state.device)
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
    rank = state.process_index
    engine = None
    done: list[dict] = []
    t_start = time.perf_counter()
    if mine:
        engine = BonsaiImageEngine.from_pretrained(opts.model, device=device, dtype=opts.dtype,
                                                   cache_dir=opts.cache_dir)
        engine.use_loras(opts.loras)
        where = str(engine.device)
        bar = tqdm(mine, unit="image", desc=f"[{rank}] {where}", position=rank, file=sys.stderr,
                   disable=not progress, leave=True)
        for entry in bar:
            try:
                done.append(render(engine, entry, opts, rank))
            except Exception as exc:  # noqa: BLE001 - one bad entry never stops the batch
                if not isinstance(exc, BonsaiError):
                    import traceback

                    traceback.print_exc(file=sys.stderr)
                done.append(_failed(entry, opts, exc, where, rank))
                bar.write(f"bonsai: entry {entry.index} ({entry.prompt[:40]!r}) failed: {exc}", file=sys.stderr)
        bar.close()
    seconds = time.perf_counter() - t_start
    summary = {"process": rank, "processes": state.num_processes, "rendered": sum(r["status"] == "ok" for r in done),
               "failed_here": sum(r["status"] != "ok" for r in done), "seconds": round(seconds, 3),
               "skipped": len(entries) - len(todo), "entries": len(entries)}
    state.wait_for_everyone()  # every record is written
    if state.is_main_process:
        ok, failed, missing = write_manifest(entries, opts)
        summary.update(ok=ok, failed=failed, missing=missing, manifest=str(opts.out / MANIFEST))
    if engine is not None:
        engine.unload()
    return summary


# ------------------------------------------------------------------------------------------- CLI
def _cmd_batch(args) -> int:
    from .config import BonsaiConfig
    from .lora import parse_lora_arg

    config = BonsaiConfig.from_env(model=args.model, device=args.device, cache_dir=args.cache_dir)
    if config.model is None:
        raise BonsaiError("no model given: pass --model DIR_OR_REPO (or set BONSAI_MODEL)")
    if args.upscale is not None and not 1 <= args.upscale <= 8:
        raise BonsaiRequestError(f"--upscale {args.upscale}: give a factor from 1 to 8")
    settings = {k: v for k, v in (("steps", args.steps), ("cfg", args.cfg), ("width", args.width),
                                  ("height", args.height), ("sampler", args.sampler),
                                  ("karras", True if args.karras else None)) if v is not None}
    opts = BatchOptions(model=config.model, out=Path(args.out), device=args.device or None, dtype=args.dtype,
                        cache_dir=config.cache_dir, loras=[parse_lora_arg(s) for s in args.lora or ()],
                        seed=args.seed, negative=args.negative, settings=settings, guardrail=args.guardrail,
                        upscale=args.upscale, overlay=args.overlay, overlay_position=args.overlay_position)
    if opts.device is None and config.source("device") != "default":
        opts.device = config.device
    summary = run_batch(args.prompts, opts, progress=not args.no_progress)
    print(f"bonsai batch: process {summary['process']}/{summary['processes']} rendered {summary['rendered']} image(s), "
          f"{summary['failed_here']} failed, in {summary['seconds']:.1f} s", file=sys.stderr)
    if "manifest" in summary:
        print(f"{summary['ok']} of {summary['entries']} images in {opts.out} ({summary['skipped']} already there), "
              f"{summary['failed']} failed; manifest {summary['manifest']}", file=sys.stderr)
        return 1 if summary["failed"] or summary["missing"] else 0
    return 0


def add_subcommand(sub) -> None:
    from .overlay import POSITIONS

    b = sub.add_parser("batch", help="render a file of prompts into a folder of PNGs with a manifest (resumable; "
                                     "one process per device under `accelerate launch`)")
    b.add_argument("prompts", help=".txt (one prompt a line) or .jsonl (objects with prompt, negative, seed, steps, "
                                   "cfg, width, height, sampler, karras, overlay)")
    b.add_argument("--out", required=True, help="folder for the PNGs and manifest.jsonl (run again to resume)")
    b.add_argument("--model", default=None, help="Bonsai folder or Hub repo id (default: BONSAI_MODEL)")
    b.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]", help="LoRA for every image; repeatable")
    b.add_argument("--seed", type=int, default=0, help="entry i uses seed+i unless it names its own (default 0)")
    b.add_argument("-n", "--negative", default=None, help="negative prompt for entries without one")
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--cfg", type=float, default=None)
    b.add_argument("--width", type=int, default=None)
    b.add_argument("--height", type=int, default=None)
    b.add_argument("--sampler", choices=["euler", "dpmpp_2m"], default=None)
    b.add_argument("--karras", action="store_true", default=None)
    b.add_argument("--device", default=None, help="default: accelerate's device for this process, else auto")
    b.add_argument("--dtype", default=None, help="auto | fp16 | bf16 | fp32")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--guardrail", choices=["warn", "clamp", "refuse"], default="warn")
    b.add_argument("--upscale", type=float, default=None, help="resize each image by this factor (Pillow Lanczos)")
    b.add_argument("--overlay", default=None, help="text drawn on every image (an entry's own overlay wins)")
    b.add_argument("--overlay-position", choices=list(POSITIONS), default="bottom")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_batch)


__all__ = ["Entry", "BatchOptions", "read_entries", "run_batch", "scan", "write_manifest", "add_subcommand"]
