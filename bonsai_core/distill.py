"""``bonsai distill TEACHER DST``: a 1-bit student UNet distilled from a full-precision SD teacher.

The student starts as the teacher's UNet with a fake quantizer on every weight the default SD
policy makes Q1_0 (``quant.qat.prepare_qat``: the forward sees exactly the packed weight, the
gradient reaches the float weight straight through). It learns to give the teacher's outputs:

* **data**: the teacher's own samples, no images (as 1.58-bit FLUX trains on its teacher's outputs):
  a pool of latents the teacher generates from the prompts (CFG, DPM++ 2M, ``--sample-steps``),
  renewed in part every ``--refresh-every`` steps; each training input is one of them noised to a
  random timestep of the teacher's training schedule;
* **loss**: teacher-output matching, ``|student(x_t, t, c) - teacher(x_t, t, c)|^2``, for the prompt
  and (``--uncond`` of the time) for CFG's unconditional inputs, the empty prompt and the default
  negative; plus **feature matching** at every block output (down blocks, mid block, up blocks), each
  a mean squared error normalised by the teacher feature's mean square (BinaryDM and BiDM both
  distil intermediate features, not only the output); ``--feature-weight 0`` turns it off.

Prompts come from a file (one a line) or, by default, from the scene renderer's training captions.
Resumable: ``--work`` holds the checkpoint (student, optimizer, step) and ``log.jsonl``; every call
continues to ``--steps`` or stops before ``--max-seconds``, and ends by writing ``DST``: the Bonsai
folder (``convert_qat`` packs the trained weights; the checkpoint writer stores them as ``bonsai
convert`` does; text encoder and VAE in fp16, tokenizer and scheduler copied). The naive 1-bit
baseline, the teacher packed with no training, is ``bonsai convert TEACHER DST``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BonsaiCheckpointError, BonsaiRequestError


@dataclass
class DistillOptions:
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-4
    max_seconds: float = 540.0
    feature_weight: float = 1.0
    uncond: float = 0.2
    pool: int = 1024
    refresh: int = 256
    refresh_every: int = 250
    sample_steps: int = 20
    guidance: float | None = None  # None: the SD family's default
    ckpt_every: int = 250
    log_every: int = 25
    seed: int = 0
    device: str = "auto"
    prompts: list[str] | None = None


@dataclass
class DistillResult:
    dst: Path
    step: int
    done: bool
    last_loss: float | None
    log: list[dict] = field(default_factory=list)


def _log(work: Path, record: dict, echo) -> dict:
    record = {"time": round(time.time(), 1), **record}
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    echo(json.dumps(record))
    return record


def read_prompts(path: str | os.PathLike) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise BonsaiRequestError(f"{path}: no prompts (one a line; lines starting with # are skipped)")
    return prompts


class _Prompts:
    """Prompt number k: from the list (cycled) or the renderer's k-th training caption."""

    def __init__(self, prompts: list[str] | None, seed: int):
        self.prompts, self.seed = prompts, seed

    def __getitem__(self, k: int) -> str:
        if self.prompts:
            return self.prompts[k % len(self.prompts)]
        from .scenes import scene

        return scene(self.seed, k, "train").caption


class _Features:
    """Forward hooks on a UNet's block outputs; ``take()`` returns and clears what they saw."""

    def __init__(self, unet):
        self.out: list = []
        self.active = True  # off while the teacher samples the pool: nothing is kept then
        self.handles = []
        blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
        for b in blocks:
            if b is not None:
                self.handles.append(b.register_forward_hook(self._hook))

    def _hook(self, module, args, output):
        if self.active:
            self.out.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list:
        out, self.out = self.out, []
        return out


def _load_teacher(folder: Path, device):
    import torch

    from .families.sd_unet import load_tokenizer, read_scheduler_config
    from .loader import component_class, family_of, is_bonsai_component, read_model_index

    index = read_model_index(folder)
    family, denoiser = family_of(index, folder)
    if family != "sd_unet":
        raise BonsaiRequestError(f"{folder}: bonsai distill takes an SD-family teacher (a UNet), not {family}")
    for comp in ("unet", "text_encoder"):
        if is_bonsai_component(folder / comp):
            raise BonsaiRequestError(f"{folder}/{comp} is already a Bonsai (1-bit) component; the teacher must "
                                     "be the full-precision diffusers folder")
    tok = load_tokenizer(folder, index.get("tokenizer", ["transformers", "CLIPTokenizer"]))
    mods = {}
    for comp in ("text_encoder", "unet"):
        cls = component_class(*index[comp])
        try:
            mods[comp] = cls.from_pretrained(folder / comp, torch_dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as exc:
            raise BonsaiCheckpointError(f"{folder / comp}: cannot load {index[comp][1]} ({exc})") from exc
        mods[comp].requires_grad_(False)
    return index, tok, mods["text_encoder"], mods["unet"], read_scheduler_config(folder)


def distill(teacher: str | os.PathLike, dst: str | os.PathLike, opts: DistillOptions | None = None, *,
            work: str | os.PathLike | None = None, overwrite: bool = False, echo=print) -> DistillResult:
    """Distil (or go on distilling) a 1-bit student of ``teacher`` into the Bonsai folder ``dst``."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from . import sampling
    from .config import FAMILY_DEFAULTS, BonsaiConfig
    from .quant.policy import default_policy
    from .quant.qat import prepare_qat

    opts = opts or DistillOptions()
    teacher, dst = Path(teacher), Path(dst)
    work = Path(work) if work else dst.with_name(dst.name + ".distill-work")
    ckpt_path = work / "distill.pt"
    if dst.exists() and not ckpt_path.exists() and not overwrite:
        raise BonsaiRequestError(f"{dst} already exists and {work} holds no distillation to resume; pick another "
                                 "destination or pass --overwrite")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if opts.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(opts.device)
    use_bf16 = device.type == "cuda"
    if use_bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    index, tok, te, t_unet, sched_cfg = _load_teacher(teacher, device)
    student = copy.deepcopy(t_unet).train().requires_grad_(True)
    policy = default_policy("sd_unet")
    qat_names = prepare_qat(student, policy)
    opt = torch.optim.AdamW(student.parameters(), lr=opts.lr, weight_decay=0.0)
    step, cursor = 0, 0
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if ck:
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["opt"])
        step, cursor = ck["step"], ck["cursor"]
        if ck.get("teacher") != str(teacher.resolve()):
            echo(f"note: {work} was started from teacher {ck.get('teacher')}, continuing with {teacher}")
    prompts = _Prompts(opts.prompts, opts.seed)
    negative = BonsaiConfig().negative_default
    guidance = FAMILY_DEFAULTS["sd_unet"].guidance if opts.guidance is None else opts.guidance
    alphas = torch.as_tensor(DDPMScheduler.from_config(sched_cfg).alphas_cumprod, dtype=torch.float32).to(device)
    schedule = sampling.sd_schedule(opts.sample_steps, sched_cfg)
    latent_hw = int(t_unet.config.sample_size)  # the teacher's native latent size

    @torch.no_grad()
    def encode(texts: list[str]):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        with autocast():
            return te(ids)[0].float()

    @torch.no_grad()
    def teacher_samples(first: int, count: int):
        """Latents the teacher makes for prompts first..first+count (seeded by prompt number)."""
        t_feats.active = False
        try:
            return _teacher_samples(first, count)
        finally:
            t_feats.active = True

    @torch.no_grad()
    def _teacher_samples(first: int, count: int):
        zs, caps = [], []
        u_all = encode([negative])
        for k in range(first, first + count, 64):
            ks = list(range(k, min(k + 64, first + count)))
            caps_k = [prompts[j] for j in ks]
            cond = encode(caps_k)
            ctx = torch.cat([u_all.expand(len(ks), -1, -1), cond])
            noise = torch.stack([torch.randn(t_unet.config.in_channels, latent_hw, latent_hw,
                                             generator=torch.Generator().manual_seed(opts.seed * 1_000_003 + j))
                                 for j in ks]).to(device)
            x = noise * sampling.initial_noise_scale(schedule)

            def denoise(x, i):
                x_in = x * sampling.model_input_scale(schedule, i)
                t = sampling.model_timestep(schedule, i).to(device)
                with autocast():
                    out = t_unet(torch.cat([x_in, x_in]), t, ctx).sample.float()
                out_u, out_c = out.chunk(2)
                return sampling.to_x0(schedule, x, out_u + guidance * (out_c - out_u), i)

            zs.append(sampling.sample(denoise, x, schedule, sampler="dpmpp_2m").float())
            caps += caps_k
        return torch.cat(zs), caps

    # the pool holds the samples of prompts [cursor - pool, cursor); a resumed run rebuilds it exactly
    pool_n = max(opts.pool, 1)
    if cursor == 0:
        cursor = pool_n
    t_feats, s_feats = _Features(t_unet), _Features(student)
    pool_z, pool_c = teacher_samples(cursor - pool_n, pool_n)
    gen = torch.Generator().manual_seed(opts.seed + step)
    uncond_ctx = encode(["", negative])
    last_loss, per_step, records = None, None, []
    if not ck:
        _log(work, {"event": "start", "teacher": str(teacher), "qat_layers": len(qat_names), "pool": pool_n,
                    "options": {k: v for k, v in opts.__dict__.items() if k != "prompts"},
                    "prompts": "file" if opts.prompts else "scene captions"}, echo)
    while step < opts.steps:
        elapsed = time.perf_counter() - t_start
        if per_step is not None and elapsed + 3 * per_step + 30 > opts.max_seconds:
            break
        t0 = time.perf_counter()
        if step and step % opts.refresh_every == 0 and opts.refresh:
            n = min(opts.refresh, pool_n)
            z_new, c_new = teacher_samples(cursor, n)
            slots = [(cursor + i) % pool_n for i in range(n)]
            pool_z[torch.tensor(slots, device=pool_z.device)] = z_new
            for s_, c_ in zip(slots, c_new):
                pool_c[s_] = c_
            cursor += n
        idx = torch.randint(0, pool_n, (opts.batch,), generator=gen)
        z0 = pool_z[idx.to(pool_z.device)]
        ctx = encode([pool_c[i] for i in idx.tolist()])
        drop = torch.rand(opts.batch, generator=gen) < opts.uncond
        if drop.any():
            which = torch.randint(0, 2, (int(drop.sum()),), generator=gen)
            ctx[drop.to(device)] = uncond_ctx[which.to(device)]
        t = torch.randint(0, alphas.numel(), (opts.batch,), generator=gen).to(device)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad(), autocast():
            target = t_unet(zt, t, ctx).sample.float()
        tf = [f.float() for f in t_feats.take()]
        with autocast():
            pred = student(zt, t, ctx).sample.float()
        sf = s_feats.take()
        out_loss = F.mse_loss(pred, target)
        feat_loss = torch.zeros((), device=device)
        if opts.feature_weight:
            for s_, t_ in zip(sf, tf):
                feat_loss = feat_loss + F.mse_loss(s_.float(), t_) / (t_.pow(2).mean() + 1e-6)
            feat_loss = feat_loss / max(len(tf), 1)
        loss = out_loss + opts.feature_weight * feat_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        last_loss = loss.item()
        dt = time.perf_counter() - t0
        per_step = dt if per_step is None else 0.9 * per_step + 0.1 * dt
        if step % opts.log_every == 0 or step == opts.steps:
            records.append(_log(work, {"step": step, "loss": round(last_loss, 6), "output": round(out_loss.item(), 6),
                                       "feature": round(feat_loss.item(), 6), "s_per_step": round(per_step, 4),
                                       "elapsed": round(time.perf_counter() - t_start, 1)}, echo))
        if step % opts.ckpt_every == 0:
            _save_ckpt(ckpt_path, student, opt, step, cursor, teacher)
    _save_ckpt(ckpt_path, student, opt, step, cursor, teacher)
    write_student(teacher, dst, student, index, info={"steps": step, "done": step >= opts.steps,
                                                      "last_loss": last_loss, "teacher": str(teacher),
                                                      "options": {k: v for k, v in opts.__dict__.items()
                                                                  if k != "prompts"}})
    records.append(_log(work, {"event": "wrote", "dst": str(dst), "step": step, "done": step >= opts.steps,
                               "elapsed": round(time.perf_counter() - t_start, 1)}, echo))
    return DistillResult(dst, step, step >= opts.steps, last_loss, records)


def _save_ckpt(path: Path, student, opt, step: int, cursor: int, teacher: Path) -> None:
    import torch

    tmp = path.with_suffix(".partial")
    torch.save({"student": student.state_dict(), "opt": opt.state_dict(), "step": step, "cursor": cursor,
                "teacher": str(teacher.resolve())}, tmp)
    os.replace(tmp, path)


def write_student(teacher: Path, dst: Path, student, index: dict, info: dict) -> Path:
    """The Bonsai folder: the student packed (``convert_qat``), the teacher's other parts as ``bonsai
    convert`` writes them (text encoder and VAE fp16, tokenizer and scheduler copied)."""
    import torch

    from . import checkpoint
    from .convert import BONSAI_INDEX_KEY
    from .loader import component_class
    from .quant.qat import convert_qat

    model = copy.deepcopy(student).cpu().float().eval().requires_grad_(False)
    policy = getattr(model, "_bonsai_qat_policy")
    convert_qat(model)
    model.to(torch.float16)
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise BonsaiCheckpointError("a kept tensor of the student is not finite in fp16: the distillation "
                                        "diverged; resume from an earlier checkpoint with a lower --lr")
    tensors, reasons = checkpoint.model_tensors(model)
    with checkpoint.staged_dir(dst) as tmp:
        new_index = dict(index)
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
                continue
            if name in ("safety_checker", "feature_extractor"):
                new_index[name] = [None, None]
                continue
            if name == "unet":
                (tmp / name).mkdir()
                checkpoint.save_tensors(tmp / name / checkpoint.WEIGHTS_NAME, tensors, family="sd_unet",
                                        component="unet", policy=policy.to_dict(), reasons=reasons,
                                        tied=checkpoint.tied_names(model),
                                        extra={"distilled": {k: v for k, v in info.items() if k != "options"}})
                for f in (teacher / name).glob("*.json"):
                    shutil.copy2(f, tmp / name / f.name)
            elif entry[0] in ("diffusers", "transformers") and "Scheduler" not in entry[1] and "Tokenizer" not in entry[1]:
                m = component_class(*entry).from_pretrained(teacher / name, torch_dtype=torch.float32)
                m.to(torch.float16).save_pretrained(tmp / name, safe_serialization=True)
            else:
                shutil.copytree(teacher / name, tmp / name)
        new_index[BONSAI_INDEX_KEY] = {"format_version": checkpoint.FORMAT_VERSION, "family": "sd_unet",
                                       "quantized": ["unet"]}
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2))
        (tmp / "distill.json").write_text(json.dumps(info, indent=2))
    return dst


# ------------------------------------------------------------------------------ the subcommand
def add_subcommand(sub) -> None:
    """``bonsai distill`` (registered by ``cli.py``)."""
    d = DistillOptions()
    p = sub.add_parser("distill", help="distil a 1-bit (Q1_0) student from a full-precision SD-family teacher")
    p.add_argument("teacher", help="full-precision diffusers SD pipeline folder")
    p.add_argument("dst", help="Bonsai folder to write (rewritten, atomically, at the end of every call)")
    p.add_argument("--prompts", default=None, help="prompt file, one a line (default: the scene renderer's captions)")
    p.add_argument("--work", default=None, help="checkpoint and log folder, resumed from (default: DST.distill-work)")
    p.add_argument("--steps", type=int, default=d.steps, help="total training steps (a resumed run continues to it)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help="stop, checkpoint and write DST before this many seconds")
    p.add_argument("--feature-weight", type=float, default=d.feature_weight,
                   help="weight of block-output feature matching (0: output matching only)")
    p.add_argument("--uncond", type=float, default=d.uncond, help="share of inputs with CFG's unconditional prompt")
    p.add_argument("--pool", type=int, default=d.pool, help="teacher samples kept to train on")
    p.add_argument("--refresh", type=int, default=d.refresh, help="teacher samples renewed each --refresh-every steps")
    p.add_argument("--refresh-every", type=int, default=d.refresh_every)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="teacher sampling steps for the pool")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale for the pool (default: the family's)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cuda | cpu")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and nothing is resumed")
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args) -> int:
    fields = {k: getattr(args, k) for k in DistillOptions.__dataclass_fields__ if k != "prompts" and hasattr(args, k)}
    opts = DistillOptions(**fields, prompts=read_prompts(args.prompts) if args.prompts else None)
    r = distill(args.teacher, args.dst, opts, work=args.work, overwrite=args.overwrite,
                echo=lambda m: print(m, file=sys.stderr))
    print(f"{'finished' if r.done else 'paused'} at step {r.step} of {opts.steps} (loss {r.last_loss}); wrote {r.dst}"
          + ("" if r.done else "; run the same command again to continue"))
    return 0
