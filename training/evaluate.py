"""Score models on held-out prompts with a classifier trained on rendered scenes (issue 19's numbers).

    python training/evaluate.py classifier --out W/classifier.pt [--steps 1500] [--device auto]
    python training/evaluate.py score --classifier W/classifier.pt --model teacher=W/teacher \\
        --model distilled=W/student --model naive=W/naive [--prompts 200] [--json W/eval.json] [--grid W/grid.png]
    python training/evaluate.py sample --model W/teacher --grid grid.png   # a look at 16 images
    python training/evaluate.py smoke            # CPU: tiny random models, a few prompts, seconds

The classifier (a small CNN on 96x96 copies of the images) reads four attributes of a one-object
scene: shape, colour, background and position (the 3x3 cell). It trains on renderer images of every
combination, with noise and blur so it tolerates a generator's artefacts, and its accuracy on fresh
renders is reported beside the models' (it is the ruler; it should be near 100 %).

Each model generates one image per held-out prompt (``scenes.held_out_prompts``: combinations of
shape, colour, background and position no training scene had), with the engine's defaults (steps,
size, sampler, CFG, default negative), seed = prompt number. Images of a batch go through the very
calls ``BonsaiImageEngine.generate`` makes (the family's encode, denoiser, sampler and decode), many
prompts at once. The score is the share of images whose attribute the classifier reads as the prompt
says, per attribute and for all four together; with a ``teacher`` model, each is also given as a
share of the teacher's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bonsai_core import scenes as S  # noqa: E402

ATTRS = {"shape": list(S.SHAPES), "colour": list(S.COLOURS), "background": list(S.BACKGROUNDS),
         "position": list(S.POSITIONS)}
SIDE = 96


def labels_of(scene: S.Scene) -> dict[str, int]:
    o = scene.objects[0]
    return {"shape": ATTRS["shape"].index(o.shape), "colour": ATTRS["colour"].index(o.colour),
            "background": ATTRS["background"].index(scene.background), "position": ATTRS["position"].index(o.position)}


class Classifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        layers, c = [], 3
        for out in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, stride=2, padding=1), nn.SiLU()]
            c = out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * (SIDE // 16) ** 2, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in ATTRS.items()})

    def forward(self, x):  # x: [B, 3, SIDE, SIDE] in [0, 1]
        h = self.body(x * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}


def to_side(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, SIDE, SIDE] by area averaging (what the classifier reads)."""
    return F.interpolate(images, size=(SIDE, SIDE), mode="area") if images.shape[-1] != SIDE else images


def _render_pool(n: int, device) -> tuple[torch.Tensor, dict]:
    """``n`` one-object scenes of every combination, rendered once (uint8 on ``device``), with labels."""
    xs, ys = [], {k: [] for k in ATTRS}
    for k in range(0, n, 256):
        sc = S.scenes(7, min(256, n - k), "any", start=k, two_objects=0.0)
        xs.append((to_side(S.render_batch(sc, 2 * SIDE, device)) * 255).round().byte())
        for s in sc:
            for a, v in labels_of(s).items():
                ys[a].append(v)
    return torch.cat(xs), {a: torch.tensor(v, device=device) for a, v in ys.items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A generator's images are not clean renders: blur some, add noise, shift colours a little."""
    n, dev = x.shape[0], x.device
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).to(dev)
    x = torch.where(pick, blurred, x)
    x = x + torch.randn(x.shape, generator=gen).to(dev) * 0.04 + (torch.rand(n, 3, 1, 1, generator=gen).to(dev) - 0.5) * 0.08
    return x.clamp(0, 1)


def train_classifier(out: Path, steps: int, batch: int, device, log=print, pool: int = 20000) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    images, labels = _render_pool(max(pool, batch), device)
    log(json.dumps({"classifier_pool": images.shape[0], "render_s": round(time.perf_counter() - t0, 1)}))
    model = Classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen).to(device)
        x = _augment(images[idx].float() / 255, gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in ATTRS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(steps // 10, 1) == 0:
            log(json.dumps({"classifier_step": step + 1, "loss": round(loss.item(), 4),
                            "elapsed": round(time.perf_counter() - t0, 1)}))
    acc = ruler_accuracy(model, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "accuracy_on_renders": acc}, out)
    log(json.dumps({"classifier": str(out), "accuracy_on_held_out_renders": acc}))
    return acc


@torch.no_grad()
def ruler_accuracy(model, device, n: int = 256) -> dict:
    """The classifier on clean renders of held-out prompts: how good the ruler is."""
    model.eval()
    prompts = S.held_out_prompts(n)
    x = to_side(S.render_batch(prompts, 2 * SIDE, device))
    return score_images(model, x, prompts)


def load_classifier(path: Path, device) -> Classifier:
    model = Classifier().to(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return model.eval()


@torch.no_grad()
def score_images(model, images: torch.Tensor, prompts: list[S.Scene]) -> dict:
    logits = model(to_side(images.to(next(model.parameters()).device)))
    ok = {}
    for k in ATTRS:
        want = torch.tensor([labels_of(s)[k] for s in prompts], device=logits[k].device)
        ok[k] = logits[k].argmax(-1) == want
    allk = torch.stack(list(ok.values())).all(0)
    out = {k: round(v.float().mean().item(), 4) for k, v in ok.items()}
    out["overall"] = round(allk.float().mean().item(), 4)
    return out


@torch.no_grad()
def generate(engine, prompts: list[str], seeds: list[int], *, steps=None, size=None, batch: int = 50) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] for many prompts, through the calls ``engine.generate`` makes
    with its defaults (default negative, CFG, the family's sampler and schedule)."""
    from bonsai_core import sampling
    from bonsai_core.guardrails import apply_prompt_defaults

    fam = engine.family
    d = fam.defaults
    steps, width = steps or d.steps, size or d.width
    out = []
    for k in range(0, len(prompts), batch):
        ps, ss = prompts[k:k + batch], seeds[k:k + batch]
        pairs = [apply_prompt_defaults(p, "", config=engine.config, use_style_prefix=None,
                                       use_default_negative=d.use_cfg) for p in ps]
        cond = fam.encode([p for p, _ in pairs])
        uncond = fam.encode([n for _, n in pairs]) if d.use_cfg and d.guidance != 1.0 else None
        schedule = fam.schedule(steps, width, width, False)
        shape = fam.latent_shape(width, width)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in ss])
        x = (noise * sampling.initial_noise_scale(schedule)).to(engine.device)
        denoise = fam.denoiser(cond, uncond, d.guidance, schedule, width, width)
        with torch.inference_mode():
            lat = sampling.sample(denoise, x, schedule, sampler=d.sampler)
            out.append(fam.decode(lat, width, width))
    return torch.cat(out)


def score_models(classifier: Path, models: dict[str, str], n_prompts: int, device, *, steps=None, size=None,
                 batch: int = 50, grid: Path | None = None, log=print) -> dict:
    from bonsai_core.engine import BonsaiImageEngine

    clf = load_classifier(classifier, device)
    prompts = S.held_out_prompts(n_prompts)
    texts, seeds = [p.caption for p in prompts], list(range(n_prompts))
    result = {"prompts": n_prompts, "held_out": True, "classifier_on_renders": ruler_accuracy(clf, device),
              "models": {}}
    grids = []
    for name, folder in models.items():
        t0 = time.perf_counter()
        eng = BonsaiImageEngine.from_pretrained(folder, device=str(device))
        d = eng.family.defaults
        result.setdefault("generation", {"steps": steps or d.steps, "size": size or d.width, "sampler": d.sampler,
                                         "guidance": d.guidance, "cfg": d.use_cfg, "default_negative": True,
                                         "device": str(device)})
        images = generate(eng, texts, seeds, steps=steps, size=size, batch=batch)
        scores = score_images(clf, images, prompts)
        scores["seconds"] = round(time.perf_counter() - t0, 1)
        scores["folder"] = str(folder)
        result["models"][name] = scores
        log(json.dumps({name: scores}))
        grids.append(to_side(images[:16]).cpu())
        eng.unload()
    if "teacher" in result["models"]:
        t = result["models"]["teacher"]
        for name, s in result["models"].items():
            s["share_of_teacher"] = {k: (round(s[k] / t[k], 4) if t[k] else None) for k in list(ATTRS) + ["overall"]}
    result["prompt_examples"] = texts[:16]
    if grid is not None:
        save_grid(grid, grids, list(models))
    return result


def save_grid(path: Path, grids: list[torch.Tensor], names: list[str]) -> None:
    """One row per model: its first 16 held-out images, 96x96 each."""
    from PIL import Image

    rows = [torch.cat(list(g), dim=-1) for g in grids]
    arr = (torch.cat(rows, dim=-2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
    (path.with_suffix(".txt")).write_text("rows: " + ", ".join(names) + "\n")


SAMPLE_PROMPTS = ["a red circle on a white background", "a small blue star on a yellow background, top left",
                  "a large green triangle on a black background, bottom right", "purple stripes on a white background",
                  "a yellow ring on a blue background, right", "an orange cross on a gray background, top",
                  "a white diamond on a red background, bottom left",
                  "a red square on the left and a blue circle on the right on a white background"]


def sample(folder: str, grid: Path, device, steps=None, size=None, side: int = 128) -> Path:
    """A quick look: the engine's default images for 8 set prompts and 8 held-out ones, one grid."""
    from PIL import Image

    from bonsai_core.engine import BonsaiImageEngine

    eng = BonsaiImageEngine.from_pretrained(folder, device=str(device))
    texts = SAMPLE_PROMPTS + [p.caption for p in S.held_out_prompts(8)]
    images = generate(eng, texts, list(range(len(texts))), steps=steps, size=size, batch=16)
    small = F.interpolate(images, size=(side, side), mode="area")
    rows = [torch.cat(list(small[i:i + 8]), dim=-1) for i in range(0, len(texts), 8)]
    arr = (torch.cat(rows, dim=-2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(grid)
    grid.with_suffix(".txt").write_text("\n".join(texts) + "\n")
    print(f"wrote {grid} (prompts in {grid.with_suffix('.txt').name})")
    return grid


def smoke(log=print) -> dict:
    """The whole path on a CPU in seconds: tiny random models, a briefly trained classifier."""
    import tempfile

    from bonsai_core.convert import convert_pipeline
    from training.tiny_sd import make_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clf = tmp / "classifier.pt"
        train_classifier(clf, steps=3, batch=8, device=torch.device("cpu"), log=log, pool=16)
        teacher = make_pipeline(tmp / "teacher", "tiny")
        convert_pipeline(teacher, tmp / "naive", log=lambda m: None)
        return score_models(clf, {"teacher": str(teacher), "naive": str(tmp / "naive")}, 4, torch.device("cpu"),
                            steps=2, size=64, batch=2, grid=tmp / "grid.png", log=log)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classifier")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, default=1500)
    c.add_argument("--batch", type=int, default=128)
    c.add_argument("--pool", type=int, default=20000, help="scenes rendered once and trained on, augmented")
    c.add_argument("--device", default="auto")
    s = sub.add_parser("score")
    s.add_argument("--classifier", required=True)
    s.add_argument("--model", action="append", required=True, help="NAME=FOLDER (name 'teacher' gives the ratios)")
    s.add_argument("--prompts", type=int, default=200)
    s.add_argument("--steps", type=int, default=None, help="default: the engine's")
    s.add_argument("--size", type=int, default=None, help="default: the engine's")
    s.add_argument("--batch", type=int, default=50)
    s.add_argument("--device", default="auto")
    s.add_argument("--json", default=None)
    s.add_argument("--grid", default=None, help="PNG of the first 16 images of every model")
    g = sub.add_parser("sample")
    g.add_argument("--model", required=True)
    g.add_argument("--grid", required=True)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--size", type=int, default=None)
    g.add_argument("--device", default="auto")
    sub.add_parser("smoke")
    args = ap.parse_args(argv)
    if args.cmd == "smoke":
        out = smoke()
        print(json.dumps(out, indent=2))
        return out
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.cmd == "sample":
        return {"grid": str(sample(args.model, Path(args.grid), device, args.steps, args.size))}
    if args.cmd == "classifier":
        return train_classifier(Path(args.out), args.steps, args.batch, device, pool=args.pool)
    models = dict(m.split("=", 1) for m in args.model)
    out = score_models(Path(args.classifier), models, args.prompts, device, steps=args.steps, size=args.size,
                       batch=args.batch, grid=Path(args.grid) if args.grid else None)
    out["command"] = " ".join(sys.argv)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
