"""Train the full-precision teacher of the shipped model: VAE, then text encoder + UNet together.

    python training/train_teacher.py vae  --work W [--steps 3000] [--batch 32] [--max-seconds 540]
    python training/train_teacher.py unet --work W [--steps 6000] [--batch 128] [--max-seconds 540] [--resolution 256]

Every call resumes from ``W``'s last checkpoint, stops at ``--steps`` or when ``--max-seconds`` is
spent (whichever comes first), writes a checkpoint every ``--ckpt-every`` steps and at the end, and
logs the loss to ``W/log.jsonl``. The ``unet`` stage also writes the teacher as a diffusers
StableDiffusionPipeline folder, ``W/teacher/`` (EMA weights), at the end of every call, so any call
leaves a usable teacher behind.

Data: scenes from ``bonsai_core.scenes``, rendered on the training device; scene ``k`` of the
stream is the same on every call, so resuming repeats nothing and skips nothing.
* VAE: random 256x256 crops of 512x512 scenes (the VAE is convolutional; a crop has the pixel
  statistics of the full image at a quarter of the cost); L1 + MSE + a KL of 1e-6 (SD's weight).
  At the end the latent ``scaling_factor`` is measured (1 / std of latents) and stored in its config.
* UNet + text encoder: epsilon prediction on the SD schedule (scaled_linear, 0.00085-0.012, 1000
  steps); min-SNR-5 loss weighting (Hang et al. 2023: converges several times faster); 10 % of
  captions dropped to "" or to the engine's default negative prompt (what CFG's unconditional branch
  reads at generation time); offset noise (0.1: a constant per channel added to the noise, so flat
  background colours can be made); optionally pyramid noise (``--pyramid-noise``: coarse noise, so
  placement follows the caption); EMA of the weights (0.999). Latents come from a pool that is refreshed
  by ``--fresh`` newly rendered scenes a step, so the VAE encoder does not run on every sample.
* ``--resolution N`` trains the UNet + text encoder on scenes rendered at N (latents N/8), e.g. 256
  before 512 as Stable Diffusion itself was trained: a scene is the same at any size (positions and
  sizes are fractions of the side; captions never depend on it) and the UNet and VAE are
  convolutional, so a step at 256 costs about a quarter of one at 512. Any call may change N: the
  pool is rendered anew at N every call anyway, the step counter and the optimizer carry on, and
  every log record says its ``res``. The exported teacher stays a model of the config's resolution
  (its UNet ``sample_size`` is the config's), whatever N its last steps used.

Runs on a CPU too (``--device cpu --config tiny``: what the tests do for a few steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bonsai_core import scenes as S  # noqa: E402
from training import tiny_sd  # noqa: E402

SEED_VAE, SEED_UNET = 101, 202


# ------------------------------------------------------------------------------ shared helpers
def log_line(work: Path, record: dict, quiet: bool = False) -> None:
    record = {"time": round(time.time(), 1), **record}
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if not quiet:
        print(json.dumps(record), flush=True)


def save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev


def render(seed: int, start: int, count: int, size: int, device, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    return render_scenes(S.scenes(seed, count, split, start=start), size, device)


def render_scenes(batch: list, size: int, device) -> tuple[torch.Tensor, list[str]]:
    """The scenes' images in [-1, 1] and their captions."""
    return S.render_batch(batch, size, device) * 2 - 1, [s.caption for s in batch]


def object_cover(scenes_: list, x: torch.Tensor, factor: int = 1) -> torch.Tensor:
    """``[B, 1, H / factor, W / factor]``: the share of each (latent) pixel's ``factor``² image pixels
    that an object covers: a pixel of ``x`` (the scenes' images in [-1, 1]) that is not its scene's
    background colour."""
    bg = torch.stack([S._rgb(s.background, x.device, torch.float32) for s in scenes_])
    on = ((x.float() - (bg * 2 - 1)).abs().amax(1, keepdim=True) > 0.05).float()
    return F.avg_pool2d(on, factor)


class Clock:
    def __init__(self, max_seconds: float):
        self.t0 = time.perf_counter()
        self.max_seconds = max_seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, margin: float) -> bool:
        return self.elapsed() + margin > self.max_seconds


# ------------------------------------------------------------------------------ VAE
def train_vae(args) -> dict:
    from diffusers import AutoencoderKL

    work, dev = Path(args.work), pick_device(args.device)
    work.mkdir(parents=True, exist_ok=True)
    cfg = tiny_sd.CONFIGS[args.config]
    res = cfg["resolution"]
    crop = args.crop or max(res // 2, 64)
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg["vae"]).to(dev)
    if dev.type == "cuda":
        vae.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    ck = load_ckpt(work / "vae.pt")
    step = 0
    if ck:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    clock = Clock(args.max_seconds)
    per_step = None
    while step < args.steps:
        if per_step is not None and clock.out_of_time(margin=3 * per_step + 20):
            break
        t_step = time.perf_counter()
        x, _ = render(SEED_VAE, step * args.batch, args.batch, res, dev)
        if crop < res:
            g = torch.Generator().manual_seed(step)
            i, j = (int(v) for v in torch.randint(0, res - crop + 1, (2,), generator=g))
            x = x[:, :, i:i + crop, j:j + crop]
        with autocast(dev):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        l1, l2 = F.l1_loss(rec, x), F.mse_loss(rec, x)
        # SD's weight: 1e-6 on the KL summed over a latent, beside a reconstruction summed over pixels
        loss = l1 + l2 + args.kl * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)  # 100 steps of warm-up
        opt.step()
        step += 1
        per_step = time.perf_counter() - t_step if per_step is None else 0.9 * per_step + 0.1 * (time.perf_counter() - t_step)
        if step % args.log_every == 0 or step == args.steps:
            log_line(work, {"stage": "vae", "step": step, "loss": round(loss.item(), 5), "l1": round(l1.item(), 5),
                            "s_per_step": round(per_step, 4), "elapsed": round(clock.elapsed(), 1)})
        if step % args.ckpt_every == 0:
            save_ckpt(work / "vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    # the latent scale SD stores in the VAE config: 1 / std of latents over fresh scenes
    with torch.no_grad(), autocast(dev):
        x, _ = render(SEED_VAE + 1, 0, min(32, max(args.batch, 4)), res, dev)
        z = vae.encode(x).latent_dist.sample().float()
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    save_ckpt(work / "vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                "scaling_factor": scaling})
    vae.save_pretrained(work / "vae", safe_serialization=True)
    rec_err = _vae_eval(vae, dev, res)
    out = {"stage": "vae", "step": step, "done": step >= args.steps, "scaling_factor": round(scaling, 5),
           "eval_l1": round(rec_err, 5), "elapsed": round(clock.elapsed(), 1)}
    log_line(work, out)
    return out


@torch.no_grad()
def _vae_eval(vae, dev, res) -> float:
    x, _ = render(SEED_VAE + 2, 0, 4, res, dev)
    with autocast(dev):
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    return F.l1_loss(rec, x).item()


# ------------------------------------------------------------------------------ UNet + text encoder
def _drop(captions: list[str], gen: torch.Generator, p: float) -> list[str]:
    from bonsai_core.config import BonsaiConfig

    neg = BonsaiConfig().negative_default
    out = []
    for c in captions:
        u = torch.rand((), generator=gen).item()
        out.append(c if u >= p else ("" if u < p / 2 else neg))
    return out


def _sd_alphas(device, zero_snr: bool = False) -> torch.Tensor:
    """alpha_bar of SD's schedule (scaled_linear 0.00085..0.012, 1000 steps); ``zero_snr``: rescaled
    to zero terminal SNR (``zero_snr_alphas``)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    alphas = torch.cumprod(1 - betas, 0)
    return (zero_snr_alphas(alphas) if zero_snr else alphas).float().to(device)


def zero_snr_alphas(alphas: torch.Tensor) -> torch.Tensor:
    """alpha_bar rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): sqrt(alpha_bar) shifted so that its last value is 0 and
    scaled so that its first is kept. On SD's own schedule sqrt(alpha_bar) at t = 999 is 0.068: the
    noisiest training input still shows where an object is, so a model can learn to read the place
    from x_t rather than from the caption, and at sampling reads it from the starting noise."""
    s = alphas.double().sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * first / (first - last)
    return (s ** 2).to(alphas.dtype)


def train_unet(args) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    work, dev = Path(args.work), pick_device(args.device)
    clock = Clock(args.max_seconds)  # the budget includes loading and filling the pool
    if not (work / "vae").is_dir():
        raise SystemExit(f"{work}/vae is missing: run the vae stage first")
    cfg = tiny_sd.CONFIGS[args.config]
    res = training_resolution(args.resolution, cfg)
    vae = AutoencoderKL.from_pretrained(work / "vae").to(dev).eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    if res != cfg["resolution"]:
        print(f"training at {res}x{res} (latents {res // 8}x{res // 8}); the exported teacher stays "
              f"{cfg['resolution']}x{cfg['resolution']}", flush=True)
    tok_dir = tiny_sd.write_tokenizer(work / "tokenizer", tiny_sd.vocabulary())
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    _, te, unet, _ = tiny_sd.build_components(args.config, seed=1, tokenizer_dir=work / "tokenizer")
    te, unet = te.to(dev).train(), unet.to(dev).train()
    if dev.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(te).eval().requires_grad_(False)
    ck = load_ckpt(work / "unet.pt")
    step = 0
    if ck:
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    elif args.init_from:
        step = init_from_teacher(Path(args.init_from), unet, te, ema_unet, ema_te)
    start = 0 if ck else step  # the learning-rate warm-up counts from a fresh optimizer's first step
    if args.zero_snr and args.prediction != "v_prediction":
        raise SystemExit("--zero-snr needs --prediction v_prediction: at zero SNR a noise prediction is empty")
    if args.object_weight != 1.0 and args.prediction != "v_prediction":
        raise SystemExit("--object-weight needs --prediction v_prediction (it weights the v loss)")
    alphas = _sd_alphas(dev, args.zero_snr)
    pool_n = max(args.pool, args.batch)
    fresh = max(1, min(args.fresh, pool_n))

    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode_images(start, count):
        zs, caps, covers = [], [], []
        for k in range(0, count, 64):
            n = min(64, count - k)
            batch = S.scenes(SEED_UNET, n, "train", start=start + k)
            x, c = render_scenes(batch, res, dev)
            with torch.no_grad(), autocast(dev):
                zs.append(vae.encode(x).latent_dist.sample().float() * sf)
            covers.append(object_cover(batch, x, factor) if args.object_weight != 1.0 else
                          torch.zeros(n, 1, 1, 1, device=x.device))
            caps += c
        return torch.cat(zs), caps, torch.cat(covers)

    # the pool holds scenes [cursor - pool_n, cursor); resuming rebuilds exactly that window, rendered at
    # this call's resolution (so a call at another --resolution never mixes latent sizes)
    cursor = pool_n + step * fresh
    pool_z, pool_c, pool_m = encode_images(cursor - pool_n, pool_n)
    gen = torch.Generator().manual_seed(step)
    per_step = None
    while step < args.steps:
        if per_step is not None and clock.out_of_time(margin=3 * per_step + 30):
            break
        t_step = time.perf_counter()
        z_new, c_new, m_new = encode_images(cursor, fresh)
        slot = torch.arange(cursor, cursor + fresh) % pool_n
        pool_z[slot.to(pool_z.device)] = z_new
        pool_m[slot.to(pool_m.device)] = m_new
        for s_, c_ in zip(slot.tolist(), c_new):
            pool_c[s_] = c_
        cursor += fresh
        idx = torch.randint(0, pool_n, (args.batch,), generator=gen)
        z0 = pool_z[idx.to(pool_z.device)]
        caps = _drop([pool_c[i] for i in idx.tolist()], gen, args.drop)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(dev)
        noise = torch.randn(z0.shape, generator=gen)
        if args.pyramid_noise:  # coarse noise on top: see --pyramid-noise
            noise = pyramid_noise(noise, gen, args.pyramid_noise)
        if args.offset_noise:  # a per-image, per-channel constant: see --offset-noise
            noise = noise + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, generator=gen)
        noise = noise.to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with autocast(dev):
            ctx = te(ids)[0]
            pred = unet(zt, t, ctx).sample
        if args.prediction == "v_prediction":
            loss = v_loss(pred, z0, noise, a, args.min_snr,
                          object_weights(pool_m[idx.to(pool_m.device)], args.object_weight))
        else:
            loss = min_snr_loss(pred, noise, a, args.min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = args.lr * min(1.0, (step - start + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        step += 1
        ema_update(((ema_unet, unet), (ema_te, te)), step, args.ema)
        dt = time.perf_counter() - t_step
        per_step = dt if per_step is None else 0.9 * per_step + 0.1 * dt
        if step % args.log_every == 0 or step == args.steps:
            log_line(work, {"stage": "unet", "step": step, "res": res, "prediction": args.prediction,
                            "zero_snr": args.zero_snr, "object_weight": args.object_weight, "loss": round(loss.item(), 5), "lr": lr,
                            "s_per_step": round(per_step, 4), "elapsed": round(clock.elapsed(), 1)})
        if step % args.ckpt_every == 0:
            _save_unet(work, unet, te, ema_unet, ema_te, opt, step)
    _save_unet(work, unet, te, ema_unet, ema_te, opt, step)
    teacher = export_teacher(work, tok, ema_te, ema_unet, scheduler_for(args))
    out = {"stage": "unet", "step": step, "res": res, "done": step >= args.steps, "teacher": str(teacher),
           "elapsed": round(clock.elapsed(), 1)}
    log_line(work, out)
    return out


def training_resolution(asked: int | None, cfg: dict) -> int:
    """The side scenes are rendered at: ``asked`` (``--resolution``), else the config's. A multiple of
    the VAE's factor (8), so the latents are exactly N/8 (the UNet itself takes any latent size)."""
    res = cfg["resolution"] if asked is None else asked
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    if res < factor or res % factor:
        raise SystemExit(f"--resolution {res}: must be a positive multiple of {factor} (the VAE's downsampling), "
                         f"e.g. {cfg['resolution'] // 2} or {cfg['resolution']}")
    return res


def v_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, gamma: float,
           pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The v-prediction MSE (``v = sqrt(a) noise - sqrt(1 - a) x0``, SD 2's parameterization), each
    sample weighted min(SNR + 1, gamma) / (SNR + 1), so that its error on x0 counts min(SNR + 1, gamma)
    (min-SNR-gamma for v, Hang et al. 2023); finite at zero SNR (weight 1 there). ``pixel_weight``
    (``object_weights``), broadcast over channels, weights each pixel's squared error."""
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    snr1 = a.view(-1) / (1 - a.view(-1)) + 1
    w = torch.clamp(snr1, max=gamma) / snr1
    err = (pred.float() - target.float()) ** 2
    if pixel_weight is not None:
        err = err * pixel_weight
    return err.mean(dim=(1, 2, 3)).mul(w).mean()


def object_weights(cover: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Per-pixel loss weights from ``cover`` (``[B, 1, H, W]`` in [0, 1]: how much of each pixel an
    object covers): 1 + (weight - 1) * cover, scaled so that each sample's weights average 1 (the loss
    keeps its scale; the objects' pixels count ``weight`` times the background's). None for weight 1."""
    if weight == 1.0:
        return None
    raw = 1 + (weight - 1) * cover.float()
    return raw / raw.mean(dim=(1, 2, 3), keepdim=True)


def min_snr_loss(pred: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, gamma: float) -> torch.Tensor:
    """The epsilon-prediction MSE, each sample weighted min(SNR, gamma) / SNR (min-SNR-gamma, Hang et
    al. 2023); ``a`` is alpha-bar of each sample's timestep, shaped to broadcast over the sample."""
    snr = a.view(-1) / (1 - a.view(-1))
    w = torch.clamp(snr, max=gamma) / snr
    return (w * ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def ema_update(pairs, step: int, ema: float) -> None:
    """Move each (EMA copy, model) pair's EMA weights towards the model's after optimizer step
    ``step`` (counted from 1), with the decay warmed up as min(ema, (1 + step) / (10 + step))."""
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for m_ema, m in pairs:
            torch._foreach_lerp_(list(m_ema.parameters()), [p.detach() for p in m.parameters()], 1 - decay)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, discount: float) -> torch.Tensor:
    """``noise`` plus Gaussian noise drawn at 1/2, 1/4, ... of its side (down to 2x2), each upsampled
    (bilinear) and weighted ``discount ** level``, the sum scaled to unit standard deviation ("multi-resolution"
    or pyramid noise). SD's schedule keeps about 7 % of the image at its last step, enough for a model
    to read where an object is from the starting noise; it then places objects where the noise says,
    whatever the caption says (the first teachers drew the same picture for every position word at a
    given seed). Coarse noise hides that coarse signal in training, so placement must come from the
    caption. ``discount`` 0 returns ``noise`` unchanged."""
    import torch.nn.functional as F

    if discount <= 0:
        return noise
    b, c, h, w = noise.shape
    out, level = noise.clone(), 1
    while min(h, w) >> level >= 2:
        coarse = torch.randn(b, c, h >> level, w >> level, generator=gen)
        out += discount ** level * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        level += 1
    return out / out.std()


def init_from_teacher(folder: Path, unet, te, ema_unet, ema_te) -> int:
    """Start from a teacher folder's weights (its EMA weights, as exported), both the trained and the
    EMA copies, with a fresh optimizer: how training goes on across machines, since the checkpoint
    with Adam's state is too big to travel. Returns the step the teacher's log reached (0 if none)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    u = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).state_dict()
    t = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).state_dict()
    for m, sd in ((unet, u), (ema_unet, u), (te, t), (ema_te, t)):
        m.load_state_dict(sd)
    step = 0
    log = folder / "training_log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
                if row.get("stage") == "unet":  # the VAE stage logs its own steps in the same file
                    step = max(step, int(row.get("step", 0)))
            except (ValueError, AttributeError, TypeError):
                continue
    print(f"initialised from {folder} (step {step}), fresh optimizer")
    return step


def _save_unet(work, unet, te, ema_unet, ema_te, opt, step):
    save_ckpt(work / "unet.pt", {"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                                 "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "step": step})


def scheduler_for(args) -> dict:
    """The exported scheduler config's changes from SD1.5's for this recipe: v-prediction, and with
    zero terminal SNR the rescaled schedule sampled from t = 999 (trailing timesteps, as Lin et al.)."""
    if args.prediction != "v_prediction":
        return {}
    out = {"prediction_type": "v_prediction"}
    if args.zero_snr:
        out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    return out


def export_teacher(work: Path, tok, te, unet, scheduler: dict | None = None) -> Path:
    """Write ``work/teacher`` (a full-precision diffusers folder), replacing an older one whole;
    ``scheduler``: changes to SD1.5's scheduler config (``scheduler_for``)."""
    import shutil

    from diffusers import AutoencoderKL

    from bonsai_core.checkpoint import staged_dir

    vae = AutoencoderKL.from_pretrained(work / "vae")
    te_cpu, unet_cpu = copy.deepcopy(te).float().cpu(), copy.deepcopy(unet).float().cpu()
    with staged_dir(work / "teacher") as tmp:
        tiny_sd.save_pipeline(tmp, tok, te_cpu, unet_cpu, vae, scheduler=scheduler)
        if (work / "log.jsonl").is_file():  # a call that logged nothing yet (started from a teacher) has none
            shutil.copy2(work / "log.jsonl", tmp / "training_log.jsonl")
    return work / "teacher"


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name, defaults in (("vae", dict(steps=3000, batch=32, lr=4e-4)),
                           ("unet", dict(steps=6000, batch=128, lr=5e-4))):
        s = sub.add_parser(name)
        s.add_argument("--work", required=True, help="folder for checkpoints, log and outputs (resumed from)")
        s.add_argument("--config", default="shipped", choices=sorted(tiny_sd.CONFIGS))
        s.add_argument("--device", default="auto")
        s.add_argument("--steps", type=int, default=defaults["steps"], help="total steps (a resumed run continues to it)")
        s.add_argument("--batch", type=int, default=defaults["batch"])
        s.add_argument("--lr", type=float, default=defaults["lr"])
        s.add_argument("--max-seconds", type=float, default=540.0, help="stop (with a checkpoint) before this")
        s.add_argument("--ckpt-every", type=int, default=500)
        s.add_argument("--log-every", type=int, default=50)
        if name == "vae":
            s.add_argument("--crop", type=int, default=None, help="training crop (default: half the resolution)")
            s.add_argument("--kl", type=float, default=1e-6)
        else:
            s.add_argument("--pool", type=int, default=8192, help="latents kept for sampling batches")
            s.add_argument("--fresh", type=int, default=16, help="new scenes rendered and encoded a step")
            s.add_argument("--drop", type=float, default=0.1, help="caption dropout (CFG)")
            s.add_argument("--min-snr", type=float, default=5.0)
            s.add_argument("--offset-noise", type=float, default=0.1,
                           help="std of a constant per-channel term added to the training noise. SD's schedule "
                                "never reaches zero SNR, so without it the model keeps the starting noise's mean "
                                "and cannot make flat, saturated backgrounds (the first teacher drew every "
                                "background grey); 0 turns it off")
            s.add_argument("--pyramid-noise", type=float, default=0.0, metavar="DISCOUNT",
                           help="add coarse noise at every halved side, weighted DISCOUNT**level (e.g. 0.4), so "
                                "that object placement is learnt from the caption, not read from the starting "
                                "noise; 0 (default) is plain noise")
            s.add_argument("--init-from", metavar="TEACHER", help="with no checkpoint in --work: start from this "
                           "teacher folder's weights (fresh optimizer), e.g. one carried from an earlier machine")
            s.add_argument("--resolution", type=int, default=None, metavar="N",
                           help="render the training scenes at NxN (latents N/8), e.g. 256 to pretrain "
                                "cheaply before the config's resolution; any call may change it (the "
                                "checkpoint carries on); the exported teacher keeps the config's size. "
                                "Default: the config's resolution (512; tiny 64)")
            s.add_argument("--prediction", default="epsilon", choices=("epsilon", "v_prediction"),
                           help="what the UNet predicts: epsilon (SD1.5's; min-SNR weighted) or v (SD 2's; its x0 "
                                "error weighted min(SNR + 1, --min-snr)); the exported scheduler config says which. "
                                "A run may switch (SD 2 was fine-tuned from epsilon to v)")
            s.add_argument("--zero-snr", action="store_true",
                           help="train on SD's schedule rescaled to zero terminal SNR (needs --prediction "
                                "v_prediction), so that the noisiest input holds nothing of the image and object "
                                "placement must come from the caption; the exported config says "
                                "rescale_betas_zero_snr and trailing timesteps")
            s.add_argument("--object-weight", type=float, default=1.0, metavar="W",
                           help="with --prediction v_prediction: weight the loss on the latent pixels the "
                                "scene's objects cover W times the background's (each sample's weights "
                                "averaging 1). Objects are 2 to 15 %% of a scene, so the plain loss is mostly "
                                "background; 1 (default) is the plain loss")
            s.add_argument("--ema", type=float, default=0.999)
            s.add_argument("--warmup", type=int, default=200)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    return train_vae(args) if args.stage == "vae" else train_unet(args)


if __name__ == "__main__":
    main()
