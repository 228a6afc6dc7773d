"""Write the shipped model's card from what the runs measured.

    python training/make_card.py MODEL_DIR eval.json [--ablate eval_ablate.json] [--teacher-log teacher_log.jsonl ...] [--notes notes.md]

Writes ``MODEL_DIR/MODEL_CARD.md``: training data, what the model can draw, how it was made, the
held-out scores of the teacher, the distilled 1-bit student and the naive 1-bit, size, licence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bonsai_core import scenes as S  # noqa: E402

ATTRS = ("shape", "colour", "background", "position", "overall")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def score_table(ev: dict) -> str:
    rows = ["| model | " + " | ".join(ATTRS) + " |", "| --- |" + " --- |" * len(ATTRS)]
    for name, s in ev["models"].items():
        rows.append(f"| {name} | " + " | ".join(_pct(s.get(a)) for a in ATTRS) + " |")
    if "teacher" in ev["models"]:
        rows.append("")
        rows.append("Share of the teacher's accuracy:")
        rows.append("")
        rows.append("| model | " + " | ".join(ATTRS) + " |")
        rows.append("| --- |" + " --- |" * len(ATTRS))
        for name, s in ev["models"].items():
            if name != "teacher":
                rows.append(f"| {name} | " + " | ".join(_pct(s["share_of_teacher"].get(a)) for a in ATTRS) + " |")
    return "\n".join(rows)


def card(model: Path, ev: dict, ablate: dict | None, teacher_log: list[dict], notes: str = "") -> str:
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file() and p.name != "MODEL_CARD.md")
    distilled = json.loads((model / "distill.json").read_text()) if (model / "distill.json").is_file() else {}
    vae_steps = max([r["step"] for r in teacher_log if r.get("stage") == "vae" and "step" in r] or [0])
    unet_steps = max([r["step"] for r in teacher_log if r.get("stage") == "unet" and "step" in r] or [0])
    ruler = ev.get("classifier_on_renders", {})
    g = ev.get("generation", {})
    how = (f"{g.get('size', '?')}x{g.get('size', '?')}, {g.get('steps', '?')} steps {g.get('sampler', '?')}, "
           f"CFG {g.get('guidance', '?')}, the default negative")
    parts = [
        "# bonsai-shapes: a 1-bit text-to-image model of simple scenes",
        "",
        "ComfyUI-Bonsai's own model, shipped inside the package so that `bonsai generate \"a red circle on a white "
        "background\"` works offline on a CPU. A Stable-Diffusion-layout pipeline (diffusers `UNet2DConditionModel`, "
        "`AutoencoderKL`, CLIP text encoder and tokenizer, SD1.5 scheduler config), native 512x512, whose UNet is "
        "1-bit (GGUF Q1_0: one sign bit a weight and one fp16 scale per 128) under the project's default SD "
        "precision policy; text encoder and VAE fp16.",
        "",
        f"Size: {size / 1e6:.1f} MB.  Licence: Apache-2.0 (the project's); trained only on procedurally rendered "
        "images, no external data or weights.",
        "",
        "## What it can draw",
        "",
        "One or two flat shapes on a flat background, as the scene renderer (`bonsai_core/scenes.py`) makes them:",
        "",
        f"* shapes: {', '.join(S.SHAPES)}",
        f"* colours: {', '.join(S.COLOURS)}; backgrounds: {', '.join(S.BACKGROUNDS)}",
        f"* sizes: {', '.join(S.SIZES)} (no word: medium)",
        f"* positions: {', '.join(S.POSITIONS)} (no word: center)",
        "",
        "Prompts are plain English in the renderer's grammar: \"a small red star on a blue background, top left\", "
        "\"a red square on the left and a blue circle on the right on a white background\". Anything else "
        "(people, objects, styles, text) it cannot draw: it has never seen it.",
        "",
        "## Training data",
        "",
        "Scenes rendered on the fly from seeds (`bonsai_core.scenes`), unlimited. A tenth of the (shape, colour, "
        "background, position) combinations is held out and never rendered for training; the scores below are on "
        "those.",
        "",
        "## How it was made",
        "",
        f"1. Teacher, full precision: the VAE ({vae_steps} steps), then the text encoder and UNet together "
        f"({unet_steps} steps, epsilon loss with min-SNR-5, offset noise 0.1, 10 % caption dropout to \"\" or the "
        "default negative, EMA) (`training/train_teacher.py`).",
        f"2. Student: `bonsai distill` ({distilled.get('steps', '?')} steps): quantization-aware training of the "
        "teacher's UNet with the 1-bit weights in the forward, on the teacher's own samples only (no images), "
        "loss = teacher-output matching + block-output feature matching; packed bit-exactly.",
        "3. Baseline: the naive 1-bit model, `bonsai convert` of the teacher (packed with no training).",
        "",
        "## Scores",
        "",
        f"{ev['prompts']} held-out prompts, one image each with the engine's defaults ({how}), seed = prompt "
        "number; a classifier trained on renders reads "
        "the four attributes (its own accuracy on clean held-out renders: "
        + ", ".join(f"{k} {_pct(v)}" for k, v in ruler.items()) + ").",
        "",
        score_table(ev),
        "",
    ]
    if ablate:
        parts += ["Ablation, output matching only (no feature matching), same time budget:", "",
                  score_table(ablate), ""]
    parts += ["Command: `" + ev.get("command", "python training/evaluate.py score ...") + "`", ""]
    if notes:
        parts += [notes.rstrip(), ""]
    return "\n".join(parts)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("eval")
    ap.add_argument("--ablate", default=None)
    ap.add_argument("--teacher-log", action="append", default=[],
                    help="teacher log.jsonl (repeatable: a VAE from one run, the UNet from another)")
    ap.add_argument("--notes", default=None, help="a Markdown file appended to the card (limitations, history)")
    args = ap.parse_args(argv)
    model = Path(args.model)
    ev = json.loads(Path(args.eval).read_text())
    ablate = json.loads(Path(args.ablate).read_text()) if args.ablate else None
    log = [json.loads(ln) for f in args.teacher_log for ln in Path(f).read_text().splitlines() if ln.strip()]
    notes = Path(args.notes).read_text() if args.notes else ""
    out = model / "MODEL_CARD.md"
    out.write_text(card(model, ev, ablate, log, notes))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
