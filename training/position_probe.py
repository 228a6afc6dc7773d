"""What makes a tiny SD-layout model learn POSITION words fast: a bounded CPU probe (issue 19).

    OMP_NUM_THREADS=2 python training/position_probe.py --steps 1500 --variants a b c [--out DIR]

Every teacher so far learnt colours and backgrounds but ignored "top left" / "bottom right": at a
fixed seed every position word gave the same picture. This trains, from scratch and on the CPU, a
miniature of the teacher on PIXELS (one-object scenes rendered at 128 px, averaged down to 32x32,
3 channels in [-1, 1]; no VAE, so a variant costs minutes), once per variant with the same seed,
data order and steps, and measures where the generated object lands.

The recipe is the teacher's (``train_teacher.train_unet``): epsilon prediction on SD's schedule
(``_sd_alphas``), min-SNR-5, 10 % caption dropout (``_drop``), offset noise 0.1, AdamW 5e-4 with
200 warm-up steps, weight decay 0.01, clip 1, EMA 0.999; a CLIPTextModel trained jointly from
scratch on the project's tokenizer (``tiny_sd.write_tokenizer``); a UNet2DConditionModel laid out
like ``tiny_sd.UNET`` (one resnet a level, cross-attention only at the two lowest resolutions),
smaller: channels 16 / 32 / 64 with 4-group norms (4 channels a group, as tiny_sd's note on colours
asks; 32 / 64 / 128 took 0.95 s a step of 32 on the shared 2-core CPU, this 0.5 s). Variants:

* ``a``: offset noise 0.1 (the current recipe without pyramid noise);
* ``b``: a + pyramid noise 0.6 (``train_teacher.pyramid_noise``);
* ``c``: b + half the batch's timesteps drawn from the noisiest 40 % (t >= 600). Where an object
  goes is decided at high noise, where the epsilon loss carries least of the image (its x0 error
  is weighted by the SNR); with uniform t few samples, and little gradient, land there;
* ``d``: b + cross-attention also at the full 32x32 level (the caption reaches every pixel
  directly, not only through the 16x16 / 8x8 maps);
* ``e``: b + learning rate 1e-3;
* ``f``: b predicting v (SD 2's parameterization, ``v = sqrt(a) noise - sqrt(1 - a) x0``), each sample
  weighted so that its error on x0 counts min(SNR + 1, 5). min-SNR-5 on epsilon (the teacher's
  recipe) weights the x0 error by min(SNR, 5): about 0.005 at t = 999 and 0.05 at t = 800 on SD's
  schedule, where an object's place is decided, so the loss hardly asks for a layout at all; here
  those steps count 1, 200x and 20x more (min-SNR's cap still keeps the nearly clean steps from
  dominating). Sampled with the same DDIM set to ``v_prediction``;
* ``g``: b still predicting epsilon (SD1.5's parameterization, what ComfyUI assumes of an SD1.5
  layout), weighted as ``f``: the x0 error counts min(SNR + 1, 5), so the epsilon MSE is weighted
  min(SNR + 1, 5) / SNR (213 at t = 999). Same optimum as b; only the weighting differs from b and
  only the parameterization from f;
* ``h``: f on SD's schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise
  Schedules and Sample Steps are Flawed", Algorithm 1: sqrt(alpha_bar) shifted so its last value is
  0 and scaled so its first is kept), sampled with DDIM's trailing timesteps from t = 999. On SD's
  own schedule sqrt(alpha_bar) at t = 999 is 0.068: in training the noisiest input still shows where
  the object is (summed over an object's pixels, well above the noise), so the model can learn to
  read the place from x_t instead of from the caption, and at sampling it reads it from the starting
  noise: one cell per seed, whatever the words. With zero terminal SNR the noisiest input holds
  nothing of the image and the place can only come from the caption;
* ``i``: h without pyramid noise (a zero-SNR schedule no longer needs coarse noise to hide the image's
  coarse signal; the offset noise of every variant stays);
* ``j``: h with two coordinate channels (x and y in [-1, 1]) joined to the UNet's input: a
  diagnostic only (an SD layout takes 4 latent channels, so no shipped model can do this). If it
  learns position where h does not, what h lacks is absolute position in its features;
* ``k``: h with half of each batch's timesteps drawn from t >= 900. On the zero-SNR schedule
  sqrt(alpha_bar) is under 0.055 there (0 at t = 999), so an object's place is barely in x_t and must
  come from the caption; with uniform t only 10 % of the samples are such (and at zero SNR the first
  sampling step is exactly the model's guess from the caption alone);
* ``p``: i trained on scenes where only the position varies (a medium red circle on white, the
  first eval pair, at any of the nine places): whether position is learnable at all at this budget
  when it is the only thing to learn (a diagnostic).

Measurement (no learnt model involved): for two prompts ("a red circle on a white background,
<position>", "a blue square on a yellow background, <position>"), the 9 positions x 4 seeds are
sampled with diffusers' DDIM (SD1.5 scheduler config, 25 steps, CFG 4, "" as unconditional); the
object is every pixel farther than 0.3 (RGB in [0, 1]) from the known background colour, its
centroid gives the 3x3 cell. Reported: position accuracy (chance 11 %), "same-seed sensitivity"
(fraction of (prompt, seed) pairs whose 9 position prompts give at least 3 distinct cells; a model
that places objects by the noise gives 1), object-colour accuracy (the mask's mean colour nearest to
the asked colour among the palette) and background accuracy. The same measurement on ground-truth
renders of the same captions is printed first: it must read 100 %.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bonsai_core import scenes as S  # noqa: E402
from training import tiny_sd  # noqa: E402
from training import train_teacher as T  # noqa: E402

RES, RENDER = 32, 128
EVAL_PAIRS = (("circle", "red", "white"), ("square", "blue", "yellow"))
EVAL_SEEDS = (0, 1, 2, 3)
DEV = torch.device("cpu")  # --device: where the variants train and sample (draws stay on the CPU generator)
VARIANTS = {
    "a": dict(pyramid=0.0),
    "b": dict(pyramid=0.6),
    "c": dict(pyramid=0.6, high_t=0.5),
    "d": dict(pyramid=0.6, full_res_attention=True),
    "e": dict(pyramid=0.6, lr=1e-3),
    "f": dict(pyramid=0.6, prediction="v_prediction"),
    "g": dict(pyramid=0.6, x0_weight="snr+1"),
    "h": dict(pyramid=0.6, prediction="v_prediction", zero_snr=True),
    "i": dict(pyramid=0.0, prediction="v_prediction", zero_snr=True),
    "j": dict(pyramid=0.6, prediction="v_prediction", zero_snr=True, coords=True),
    "k": dict(pyramid=0.6, prediction="v_prediction", zero_snr=True, high_t=0.5, high_t_from=900),
    "p": dict(pyramid=0.0, prediction="v_prediction", zero_snr=True, only_position=True),
    # curricula on i: p's data (only the position varies) for the first 800 steps, then the full pool (q);
    # half of every batch from p's data throughout (r). Pair 2 (blue square on yellow) is outside p's data:
    # its position says whether what p's data taught carries over to the full task.
    "q": dict(pyramid=0.0, prediction="v_prediction", zero_snr=True, position_first=800),
    "r": dict(pyramid=0.0, prediction="v_prediction", zero_snr=True, position_share=0.5),
    # h with the loss on the pixels an object covers weighted 5x (each sample's weights normalised
    # to mean 1): objects are a few percent of a scene, so plain MSE is mostly the background
    "s": dict(pyramid=0.6, prediction="v_prediction", zero_snr=True, object_weight=5.0),
    # i with both emphases on what the first sampling steps must do (place an object from the caption
    # alone): half of each batch from t >= 900, the object's pixels weighted 5x
    "t": dict(pyramid=0.0, prediction="v_prediction", zero_snr=True, high_t=0.5, high_t_from=900, object_weight=5.0),
}


def with_coords(x: torch.Tensor, on: bool) -> torch.Tensor:
    """``x`` with two channels of its pixels' x and y in [-1, 1] joined (variant j), else ``x``."""
    if not on:
        return x
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, x.shape[-2], device=x.device),
                            torch.linspace(-1, 1, x.shape[-1], device=x.device), indexing="ij")
    grid = torch.stack([xs, ys]).to(x.dtype).expand(x.shape[0], -1, -1, -1)
    return torch.cat([x, grid], 1)


def build(variant: dict, tok_dir: Path, seed: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd.write_tokenizer(tok_dir, tiny_sd.vocabulary()))
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, projection_dim=128))
    top = "CrossAttn" if variant.get("full_res_attention") else ""
    unet = UNet2DConditionModel(
        sample_size=RES, in_channels=5 if variant.get("coords") else 3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
        norm_num_groups=4, cross_attention_dim=128, attention_head_dim=4,
        down_block_types=(f"{top}DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", f"{top}UpBlock2D"))
    return tok, te, unet.to(memory_format=torch.channels_last)  # mkldnn's convolutions run faster so


def pixels(scenes_) -> torch.Tensor:
    """Scenes rendered at RENDER, averaged down to RES, in [-1, 1] (256 at a time)."""
    return torch.cat([F.avg_pool2d(S.render_batch(scenes_[k:k + 256], RENDER, "cpu"), RENDER // RES) * 2 - 1
                      for k in range(0, len(scenes_), 256)])


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    sc = S.scenes(seed, n, "train", two_objects=0.0)
    x = pixels(sc)
    return x, [s.caption for s in sc], T.object_cover(sc, x)


def position_only_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Variant p's data: a medium red circle on white at a random one of the nine places (jittered as the
    renderer jitters), captioned as the renderer captions it."""
    rng = np.random.default_rng(seed)
    scenes_ = []
    for _ in range(n):
        o = S._place(rng, "circle", "red", "medium", str(rng.choice(list(S.POSITIONS))))
        scenes_.append(S.Scene((o,), "white", S.caption_of((o,), "white", rng)))
    x = pixels(scenes_)
    return x, [sc.caption for sc in scenes_], T.object_cover(scenes_, x)


def eval_captions() -> list[tuple[str, str, str, str]]:
    """(caption, colour, background, position) for every eval pair x position, positions in grid order."""
    out = []
    for shape, colour, bg in EVAL_PAIRS:
        for pos in S.POSITIONS:
            where = "in the center" if pos == "center" else pos
            out.append((f"a {colour} {shape} on a {bg} background, {where}", colour, bg, pos))
    return out


def _nearest(rgb: torch.Tensor, names) -> str:
    pal = torch.tensor([S.PALETTE[n] for n in names], dtype=torch.float32) / 255
    return names[int(((pal - rgb) ** 2).sum(1).argmin())]


def read_images(images: torch.Tensor, rows, smooth: int = 1, by: str = "centroid") -> list[dict]:
    """images [N, 3, H, W] in [0, 1]; rows as eval_captions(). The object: pixels > 0.3 from the
    known background; its centroid's 3x3 cell; colours by the nearest palette entry. ``smooth`` > 1
    averages each image over smooth x smooth pixels first (an undertrained model leaves speckle
    noise that a single pixel would count as the object). ``by="cell"``: the cell is the one whose
    mean distance from the background is largest (over 0.1), the colour read inside it."""
    found_in = images
    if by == "median3":  # isolated speckle pixels go, an object of a few pixels across stays; colours too
        b, c, h, w = images.shape
        patches = F.unfold(F.pad(images, [1] * 4, mode="replicate"), 3).view(b, c, 9, h, w)
        images = found_in = patches.median(dim=2).values
        by = "centroid"
    elif smooth > 1:  # the mask from the smoothed image, the colours from the pixels themselves
        found_in = F.avg_pool2d(F.pad(images, [smooth // 2] * 4, mode="replicate"), smooth, stride=1)
    out = []
    h, w = images.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for img, seen, (_, colour, bg, pos) in zip(images, found_in, rows):
        bg_rgb = torch.tensor(S.PALETTE[bg], dtype=torch.float32).view(3, 1, 1) / 255
        dist = (seen - bg_rgb).norm(dim=0)
        mask = dist > 0.3
        frac = mask.float().mean().item()
        found = 2 <= mask.sum().item() and frac < 0.5
        cell = None
        got_colour = None
        if by == "cell":  # the 3x3 cell farthest from the background on average: speckle spreads over all
            cells = F.adaptive_avg_pool2d(dist[None, None], 3).flatten()
            k = int(cells.argmax())
            found = cells[k].item() > 0.1
            if found:
                cell = (k % 3, k // 3)
                gx, gy = cell
                mask = mask & (xx * 3 // w == gx) & (yy * 3 // h == gy)
                found = bool(mask.any())
        elif found:
            cx, cy = xx[mask].mean().item() / w, yy[mask].mean().item() / h
            cell = (min(2, int(cx * 3)), min(2, int(cy * 3)))
        if found:
            core = mask & ((img - bg_rgb).norm(dim=0) > 0.3)  # not the smoothed mask's blended rim
            got_colour = _nearest(img[:, core if core.any() else mask].mean(1), S.COLOURS)
        rest = img[:, ~mask] if (~mask).any() else img.flatten(1)
        got_bg = _nearest(rest.median(1).values, S.BACKGROUNDS)
        out.append({"cell": cell, "pos_ok": cell == S.POSITIONS[pos], "colour_ok": got_colour == colour,
                    "bg_ok": got_bg == bg, "area": round(frac, 3)})
    return out


def summarise(reads: list[dict], n_seeds: int) -> dict:
    n_pos = len(S.POSITIONS)
    distinct = []
    for p in range(len(EVAL_PAIRS)):
        for s in range(n_seeds):
            cells = {reads[(p * n_seeds + s) * n_pos + i]["cell"] for i in range(n_pos)}
            distinct.append(len(cells - {None}))
    per_pair = [float(np.mean([r["pos_ok"] for r in reads[p * n_seeds * n_pos:(p + 1) * n_seeds * n_pos]]))
                for p in range(len(EVAL_PAIRS))]
    return {"position_acc": round(float(np.mean([r["pos_ok"] for r in reads])), 3),
            "position_acc_per_pair": [round(a, 3) for a in per_pair],
            "sensitivity": round(float(np.mean([d >= 3 for d in distinct])), 3),
            "mean_distinct_cells": round(float(np.mean(distinct)), 2),
            "colour_acc": round(float(np.mean([r["colour_ok"] for r in reads])), 3),
            "background_acc": round(float(np.mean([r["bg_ok"] for r in reads])), 3),
            "found": round(float(np.mean([r["cell"] is not None for r in reads])), 3)}


@torch.no_grad()
def sample(unet, te, tok, captions: list[str], seeds, variant: dict, steps: int = 25, cfg: float = 4.0) -> torch.Tensor:
    """DDIM with SD1.5's scheduler config and CFG, as ``variant`` predicts (with ``zero_snr``: rescaled,
    trailing timesteps, as Lin et al. sample); ordered seed-major (seed, caption). [0, 1] images."""
    from diffusers import DDIMScheduler

    prediction, zero_snr = variant.get("prediction", "epsilon"), variant.get("zero_snr", False)
    extra = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}
    sch = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=0 if zero_snr else 1,
                        prediction_type=prediction, **extra)
    sch.set_timesteps(steps)
    caps = [c for _ in seeds for c in captions]
    # one starting noise per seed, shared by all its captions: the same-seed test
    x = torch.cat([torch.randn(1, 3, RES, RES, generator=torch.Generator().manual_seed(s)).expand(len(captions), -1, -1, -1)
                   for s in seeds]).contiguous().to(DEV)

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids.to(DEV))[0]

    ctx = torch.cat([encode([""] * len(caps)), encode(caps)])
    for t in sch.timesteps:
        e_u, e_c = unet(with_coords(torch.cat([x, x]), variant.get("coords", False)), t, ctx).sample.chunk(2)
        x = sch.step(e_u + cfg * (e_c - e_u), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def evaluate(unet, te, tok, variant: dict) -> dict:
    rows = eval_captions()
    n_pos = len(S.POSITIONS)
    imgs = []
    for p in range(len(EVAL_PAIRS)):  # order: pair, seed, position (summarise reads it so)
        imgs.append(sample(unet, te, tok, [r[0] for r in rows[p * n_pos:(p + 1) * n_pos]], EVAL_SEEDS, variant))
    imgs = torch.cat(imgs)
    ordered = [rows[p * n_pos + i] for p in range(len(EVAL_PAIRS)) for _ in EVAL_SEEDS for i in range(n_pos)]
    res = summarise(read_images(imgs, ordered), len(EVAL_SEEDS))
    res["smooth3"] = summarise(read_images(imgs, ordered, smooth=3), len(EVAL_SEEDS))
    res["cellmax"] = summarise(read_images(imgs, ordered, by="cell"), len(EVAL_SEEDS))
    res["median3"] = summarise(read_images(imgs, ordered, by="median3"), len(EVAL_SEEDS))
    return res, imgs


def check_measurement() -> dict:
    """The reader on ground-truth renders of the eval captions (medium size, cell centres): must be 100 %."""
    rows = eval_captions()
    scenes_ = []
    for shape, colour, bg in EVAL_PAIRS:
        for pos in S.POSITIONS:
            gx, gy = S.POSITIONS[pos]
            o = S.SceneObject(shape, colour, "medium", pos, S._GRID[gx], S._GRID[gy], S.SIZES["medium"])
            scenes_.append(S.Scene((o,), bg, ""))
    imgs = F.avg_pool2d(S.render_batch(scenes_, RENDER, "cpu"), RENDER // RES)
    ordered = [r for r in rows for _ in EVAL_SEEDS]  # not seed-major; only the accuracies are read
    imgs = imgs.repeat_interleave(len(EVAL_SEEDS), 0)
    out = {}
    for name, kw in (("centroid", {}), ("smooth3", dict(smooth=3)), ("cellmax", dict(by="cell")),
                     ("median3", dict(by="median3"))):
        reads = read_images(imgs, ordered, **kw)
        out[name] = {k: float(np.mean([r[k + "_ok"] for r in reads])) for k in ("pos", "colour", "bg")}
    return out


def reread(paths: list[str], smooth: int) -> None:
    """Read saved sample grids (``save_grid``) again, e.g. with ``--smooth 3``."""
    from PIL import Image

    rows = eval_captions()
    n_pos = len(S.POSITIONS)
    ordered = [rows[p * n_pos + i] for p in range(len(EVAL_PAIRS)) for _ in EVAL_SEEDS for i in range(n_pos)]
    for path in paths:
        a = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        a = a[:, ::2, ::2]  # save_grid doubled every pixel
        imgs = torch.stack([a[:, r * RES:(r + 1) * RES, c * RES:(c + 1) * RES]
                            for r in range(a.shape[1] // RES) for c in range(n_pos)])
        print(path, f"smooth {smooth}:", json.dumps(summarise(read_images(imgs, ordered, smooth), len(EVAL_SEEDS))))
        for by in ("cell", "median3"):
            print(path, f"{by}:", json.dumps(summarise(read_images(imgs, ordered, by=by), len(EVAL_SEEDS))))


def eps_loss_x0_weighted(pred: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, gamma: float) -> torch.Tensor:
    """The epsilon MSE weighted min(SNR + 1, gamma) / SNR: its x0 error counts min(SNR + 1, gamma), as
    ``v_loss``'s does (the epsilon error is SNR x the x0 error's square)."""
    snr = a.view(-1) / (1 - a.view(-1))
    w = torch.clamp(snr + 1, max=gamma) / snr
    return (w * ((pred.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))).mean()


def train_variant(name: str, args, pool, tok_dir: Path, out: Path) -> dict:
    v = VARIANTS[name]
    if v.get("only_position"):
        pool = position_only_pool(len(pool[0]), seed=404)
    pool_x, pool_c, pool_m = pool
    pos_x, pos_c, pos_m = (position_only_pool(len(pool_x), seed=404) if v.get("position_first") or v.get("position_share")
                           else pool)
    tok, te, unet = build(v, tok_dir, seed=1)
    te, unet = te.to(DEV).train(), unet.to(DEV).train()
    params = list(unet.parameters()) + list(te.parameters())
    lr0 = v.get("lr", args.lr)
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=0.01)
    ema_u, ema_t = copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(te).eval().requires_grad_(False)
    alphas = T._sd_alphas("cpu", v.get("zero_snr", False))
    gen = torch.Generator().manual_seed(args.seed)  # same data order, timesteps and noise draws per variant
    t0 = time.perf_counter()
    losses, record = [], {"variant": name, "settings": v, "evals": []}
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(pool_x), (args.batch,), generator=gen)
        # q, r: a batch's first `share` samples come from p's pool (same indices, so the same draws)
        share = 1.0 if step <= v.get("position_first", 0) else v.get("position_share", 0.0)
        k = round(share * args.batch)
        x0 = torch.cat([pos_x[idx[:k]], pool_x[idx[k:]]]) if k else pool_x[idx]
        m = torch.cat([pos_m[idx[:k]], pool_m[idx[k:]]]) if k else pool_m[idx]
        caps = [pos_c[i] for i in idx[:k].tolist()] + [pool_c[i] for i in idx[k:].tolist()]
        caps = T._drop(caps, gen, 0.1)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        hi = torch.randint(v.get("high_t_from", 600), 1000, (args.batch,), generator=gen)
        pick = torch.rand(args.batch, generator=gen) < v.get("high_t", 0.0)
        t = torch.where(pick, hi, t)
        noise = torch.randn(x0.shape, generator=gen)
        # the same draws in every variant; pyramid_noise consumes the generator only when on,
        # so the offset draw below comes from a generator of its own
        noise = T.pyramid_noise(noise, torch.Generator().manual_seed(args.seed * 100003 + step), v["pyramid"])
        noise = noise + 0.1 * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1).to(DEV)
        x0, noise = x0.to(DEV), noise.to(DEV)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(with_coords(xt, v.get("coords", False)), t.to(DEV), te(ids.to(DEV))[0]).sample
        if v.get("prediction") == "v_prediction":
            loss = T.v_loss(pred, x0, noise, a, 5.0, T.object_weights(m.to(DEV), v.get("object_weight", 1.0)))
        elif v.get("x0_weight") == "snr+1":
            loss = eps_loss_x0_weighted(pred, noise, a, 5.0)
        else:
            loss = T.min_snr_loss(pred, noise, a, 5.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr0 * min(1.0, step / 200)
        opt.step()
        T.ema_update(((ema_u, unet), (ema_t, te)), step, 0.999)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"[{name}] step {step} loss(avg 100) {np.mean(losses[-100:]):.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        if step in args.eval_at or step == args.steps or step == v.get("position_first"):
            te_e = time.perf_counter()
            res, imgs = evaluate(ema_u, ema_t, tok, v)
            res.update(step=step, weights="ema", eval_s=round(time.perf_counter() - te_e, 1))
            save_grid(imgs, out / f"samples_{name}_{step}.png")
            if step == args.steps:
                raw, _ = evaluate(unet.eval(), te.eval(), tok, v)
                res["raw_weights"] = raw
                save_grid(imgs, out / f"samples_{name}.png")
            print(f"[{name}] eval {json.dumps(res)}", flush=True)
            record["evals"].append(res)
            if args.save:  # the EMA weights at the latest eval, for --first-step
                save_weights(ema_u, ema_t, out / f"model_{name}.safetensors", name, step)
    record.update(steps=args.steps, final_loss_avg100=round(float(np.mean(losses[-100:])), 4),
                  seconds=round(time.perf_counter() - t0, 1))
    return record


def save_weights(unet, te, path: Path, name: str, step: int) -> None:
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().cpu().contiguous().clone() for k, v in unet.state_dict().items()}
    tensors.update({f"te.{k}": v.detach().cpu().contiguous().clone() for k, v in te.state_dict().items()})
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"variant": name, "step": str(step)})
    tmp.replace(path)


@torch.no_grad()
def first_step(path: Path, out: Path, cfg: float = 4.0) -> dict:
    """What a saved probe model predicts at the first sampling step (t = 999; on the zero-SNR schedule
    the input holds nothing of the image, so the prediction comes from the caption alone): x0 for each
    eval caption, read like the samples (object cell, colour), cond and with CFG, averaged over the eval
    seeds' noises. A model that learnt position puts the nine words' predictions in nine cells here,
    before the noise has any say."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        name, tensors = f.metadata()["variant"], {k: f.get_tensor(k) for k in f.keys()}
    v = VARIANTS[name]
    if not v.get("zero_snr") or v.get("prediction") != "v_prediction":
        raise SystemExit(f"{path}: variant {name} is not on the zero-SNR v recipe; its first step sees the image")
    with tempfile.TemporaryDirectory(prefix="bonsai-probe-tok-") as tok_dir:
        tok, te, unet = build(v, Path(tok_dir), seed=1)
        unet.load_state_dict({k[5:]: t for k, t in tensors.items() if k.startswith("unet.")})
        te.load_state_dict({k[3:]: t for k, t in tensors.items() if k.startswith("te.")})
        unet, te = unet.eval(), te.eval()
        rows = eval_captions()
        caps = [r[0] for r in rows]
        ids = tok(caps + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        ctx = te(ids)[0]
        t = torch.full((len(caps),), 999)
        pairs = []  # (v cond, v uncond) per seed, combined below at each guidance scale
        for s_ in EVAL_SEEDS:
            x = with_coords(torch.randn(1, 3, RES, RES, generator=torch.Generator().manual_seed(s_))
                            .expand(len(caps), -1, -1, -1), v.get("coords", False))
            pairs.append((unet(x, t, ctx[:-1]).sample, unet(x, t, ctx[-1:].expand(len(caps), -1, -1)).sample))
        results, grids = {}, []
        for label, scale in (("cond", 1.0), ("cfg", cfg)):
            # alpha_bar = 0: x0 = -v
            x0 = ((torch.stack([-(v_u + scale * (v_c - v_u)) for v_c, v_u in pairs]).mean(0) + 1) / 2).clamp(0, 1)
            results[label] = {"centroid": summarise(read_images(x0, rows), 1),
                              "cellmax": summarise(read_images(x0, rows, by="cell"), 1)}
            grids.append(x0)
        save_grid(torch.cat(grids), out / f"first_step_{name}.png")
    print(json.dumps(results), flush=True)
    return results


def save_grid(imgs: torch.Tensor, path: Path) -> None:
    """Rows: (pair, seed); columns: the 9 positions in grid order."""
    from PIL import Image

    n_pos = len(S.POSITIONS)
    a = S.to_uint8(F.interpolate(imgs, scale_factor=2, mode="nearest"))
    rows = [np.concatenate(list(a[r * n_pos:(r + 1) * n_pos]), axis=1) for r in range(len(a) // n_pos)]
    tmp = path.with_suffix(".partial.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    tmp.replace(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["a", "b", "c"], choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-at", type=int, nargs="*", default=[])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--pool", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda to answer with more steps in minutes")
    p.add_argument("--out", default="benchmarks/results/cpu/position_probe")
    p.add_argument("--reread", nargs="+", metavar="PNG", help="only read saved sample grids again (no training)")
    p.add_argument("--smooth", type=int, default=3, help="with --reread: box filter before reading")
    p.add_argument("--save", action="store_true", help="keep each variant's EMA weights (model_NAME.safetensors "
                   "in --out, rewritten at every eval)")
    p.add_argument("--first-step", metavar="SAFETENSORS", help="only read what a saved model predicts at t = 999 "
                   "for the eval captions (no training)")
    args = p.parse_args(argv)
    if args.reread:
        return reread(args.reread, args.smooth)
    if args.first_step:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return first_step(Path(args.first_step), Path(args.out))
    torch.set_num_threads(args.threads)
    global DEV
    DEV = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("measurement on ground-truth renders:", check_measurement(), flush=True)
    t = time.perf_counter()
    pool = render_pool(args.pool, seed=303)
    print(f"pool of {len(pool[0])} scenes rendered in {time.perf_counter() - t:.0f}s", flush=True)
    results = {"command": " ".join(sys.argv), "steps": args.steps, "batch": args.batch, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bonsai-probe-tok-") as tok_dir:
        for name in args.variants:
            results["runs"].append(train_variant(name, args, pool, Path(tok_dir), out))
            tmp = out / "results.partial.json"
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out / "results.json")
    for r in results["runs"]:
        e = r["evals"][-1]
        print(f"{r['variant']}: pos {e['position_acc']:.0%} sens {e['sensitivity']:.0%} colour {e['colour_acc']:.0%} "
              f"bg {e['background_acc']:.0%} | raw pos {e['raw_weights']['position_acc']:.0%} "
              f"sens {e['raw_weights']['sensitivity']:.0%} | loss {r['final_loss_avg100']} | {r['seconds']}s")
    return results


if __name__ == "__main__":
    main()
