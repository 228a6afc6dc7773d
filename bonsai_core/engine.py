"""``BonsaiImageEngine``: load a Bonsai (or full-precision) model and turn prompts into images.

Framework-agnostic: no ComfyUI here. The engine checks the request (guardrails), encodes prompts
(cached), draws seeded noise, runs the sampler loop from ``sampling`` over the family's denoiser,
decodes, and returns images with their metadata. Families (``families/``) own the networks.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import device as devices
from . import sampling
from .config import BonsaiConfig
from .loader import family_of, read_model_index
from .errors import BonsaiCancelledError, BonsaiCheckpointError, BonsaiMemoryError, BonsaiRequestError
from .families.base import Family
from .guardrails import (GuardrailReport, Request, apply_prompt_defaults, check_prompt_text, check_request,
                         estimate_memory_bytes)
from .hub import resolve_model

ProgressFn = Callable[[int, int, "torch.Tensor | None"], None]
#: ``free_memory(bytes_needed, device)``: the caller (ComfyUI's memory manager, say) makes room
FreeMemoryFn = Callable[[int, torch.device], None]
#: ``available_memory(device) -> bytes``: what the caller says the device has free for us
AvailableMemoryFn = Callable[[torch.device], int]
#: stages ``generate`` reports to ``on_stage``, in order
STAGES = ("encode", "sample", "decode", "done")
OUT_OF_MEMORY_PEAK = 1 << 62  # what a run that ran out of device memory counts as having measured


def _family_class(name: str) -> type[Family]:
    if name == "sd_unet":
        from .families.sd_unet import SDUNetFamily

        return SDUNetFamily
    if name == "flux2_klein":
        from .families.flux2_klein import Flux2KleinFamily

        return Flux2KleinFamily
    raise BonsaiCheckpointError(f"model family {name!r} is not supported")


@dataclass
class GenerationResult:
    images: list  # PIL.Image.Image, one per batch item
    tensor: torch.Tensor  # [B, H, W, 3] float32 in [0, 1] on the CPU (ComfyUI's IMAGE layout)
    metadata: dict
    report: GuardrailReport | None = None
    warnings: list[str] = field(default_factory=list)

    def parameters_text(self, index: int = 0) -> str:
        """The A1111/ComfyUI-style ``parameters`` text of one image (what PNG readers show)."""
        m = self.metadata
        neg = f"\nNegative prompt: {m['negative_prompt']}" if m.get("negative_prompt") else ""
        return (f"{m['prompt']}{neg}\nSteps: {m['steps']}, Sampler: {m['sampler']}"
                f"{' Karras' if m.get('karras') else ''}, CFG scale: {m['guidance']}, Seed: {m['seeds'][index]}, "
                f"Size: {m['width']}x{m['height']}, Model: {m['model']}, Family: {m['family']}, "
                f"Device: {m['device']}, Dtype: {m['dtype']}"
                + "".join(f", LoRA: {a['name']}:{a['strength']:g}" for a in m.get("loras", ())))

    def save(self, path: str | os.PathLike, index: int = 0) -> Path:
        """Write one image, atomically, in the format its extension names (``IMAGE_FORMATS``): PNG
        with the parameters embedded as text (``parameters`` and a ``bonsai`` JSON), JPEG and WebP
        with them in the EXIF user comment."""
        from .checkpoint import atomic_write

        path = Path(path)
        fmt = image_format(path)
        params = self.parameters_text(index)
        meta = json.dumps(dict(self.metadata, seed=self.metadata["seeds"][index]))
        if fmt == "PNG":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("parameters", params)
            info.add_text("bonsai", meta)
            extra = {"pnginfo": info}
        else:
            exif = self.images[index].getexif()
            exif[0x9286] = params  # UserComment
            extra = {"exif": exif, "quality": 95}
        atomic_write(path, lambda tmp: self.images[index].save(tmp, format=fmt, **extra))
        return path


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format an output file's extension names; any other extension is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise BonsaiRequestError(f"{path}: images are written as {', '.join(IMAGE_FORMATS)}; "
                                 f"{suffix or 'no extension'} is none of those: name the file e.g. bonsai.png")
    return IMAGE_FORMATS[suffix]


def check_seed(seed) -> int | None:
    """A seed is a whole number in 0..2^64-1 (or None: random). Floats, strings, bools and NaN are
    refused, never truncated: a seed that silently became another one would make another image."""
    if seed is None:
        return None
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise BonsaiRequestError(f"seed {seed!r} ({type(seed).__name__}) is not a whole number; "
                                 "give an integer from 0 to 2^64-1")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise BonsaiRequestError(f"seed {seed} is out of range 0..2^64-1")
    return seed


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(exc, (MemoryError, *oom_types)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _PeakMemory:
    """Peak memory of one generation: CUDA allocator peak, or the process's resident peak on Linux.

    On CUDA, when asked (``phases=True``: ``BonsaiImageEngine.measure_phases``), also each phase's own
    peak (``PHASES``): ``phase(name)`` closes the phase before it (its ``max_memory_allocated``) and
    resets the allocator's peak for the next; the whole run's peak is the largest of them. Those
    resets are process-wide (a meter read around ``generate`` then sees only the last phase), so
    they are off by default and the phases None; elsewhere phases are always None."""

    PHASES = ("encode", "denoise", "decode")

    def __init__(self, device: torch.device, phases: bool = False):
        self.device = device
        self.by_phase = phases and device.type == "cuda"
        self.start = None
        self.phases: dict[str, int | None] = dict.fromkeys(self.PHASES)
        self._open: str | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.start = self._status("VmRSS")
            except OSError:
                self.start = None

    def phase(self, name: str | None) -> None:
        """Phase ``name`` begins (None: the last one ended)."""
        if self.by_phase:
            if self._open is not None:
                self.phases[self._open] = int(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open = name

    @staticmethod
    def _status(key: str) -> int | None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return None

    def peak(self) -> dict:
        if self.device.type == "cuda":
            if self.by_phase:
                self.phase(None)
            seen = [v for v in self.phases.values() if v is not None]
            whole = int(torch.cuda.max_memory_allocated(self.device))
            return {"peak_bytes": max([whole, *seen]), "peak_kind": "cuda allocator",
                    "phase_peak_bytes": dict(self.phases)}
        out = {"peak_bytes": None, "peak_kind": "not measurable on " + self.device.type}
        if self.start is not None:
            hwm = self._status("VmHWM")
            if hwm is not None:
                out = {"peak_bytes": hwm, "peak_kind": "process resident (VmHWM)", "peak_added_bytes": hwm - self.start}
        return {**out, "phase_peak_bytes": dict(self.phases)}


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_allocated(device))
    if Path("/proc/meminfo").exists():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _decode_budget(config: BonsaiConfig, device: torch.device) -> int | None:
    """What an ``auto`` VAE decode's estimate must fit on CUDA: a budget the user set, never more than
    the card has, within placement's headroom (the share placement leaves for what the counts miss,
    so the decode a run chooses is the one placement estimated); None without one (then only the
    free memory read at the decode counts)."""
    from .placement import HEADROOM

    if device.type != "cuda" or config.source("max_vram_gb") == "default":
        return None
    return int(HEADROOM * min(config.max_vram_bytes, _available_memory(device)))


class BonsaiImageEngine:
    """One loaded model on one device. Create with :meth:`from_pretrained`."""

    def __init__(self, family: Family, *, source: str, folder: Path, choice: devices.DeviceChoice,
                 config: BonsaiConfig, load_seconds: float = 0.0):
        self.family = family
        self._lora_set = None  # lora.LoRASet, made on first use (lora_set)
        self.source = source
        self.folder = folder
        self.choice = choice
        self.config = config
        self.load_seconds = load_seconds
        self.available_memory: AvailableMemoryFn | None = None  # the host's count; None: the engine reads the device
        self.measure_phases = False  # CUDA: each phase's own peak in the metadata (resets the process-wide peak)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, src: str | os.PathLike | None = None, device: str | None = None,
                        dtype: str | torch.dtype | None = None, cache_dir: str | None = None,
                        config: BonsaiConfig | None = None,
                        free_memory: FreeMemoryFn | None = None,
                        available_memory: AvailableMemoryFn | None = None) -> "BonsaiImageEngine":
        """Load a Bonsai folder, a full-precision diffusers folder, or a Hub repo id of either.

        ``free_memory(bytes, device)``, when given, is called once before any weight is read, with
        the size of the model's weight files and the device they go to, so that a host application
        can make room its own way (the engine does not read that application's memory itself).
        ``available_memory(device)``, when given, is what the memory guardrail compares its estimate
        with, instead of the engine reading the device (a host that manages the device knows better)."""
        config = config or BonsaiConfig.from_env()
        src = src if src is not None else config.model
        if src is None:
            raise BonsaiRequestError("no model given: pass a Bonsai folder or Hub repo id (--model, BONSAI_MODEL)")
        t0 = time.perf_counter()
        choice = devices.pick(device if device is not None else config.device, dtype,
                              source="argument" if device is not None else config.source("device"))
        folder = resolve_model(src, cache_dir or config.cache_dir)
        if folder.is_file() or not (folder / "model_index.json").is_file():
            _refuse_unimported(folder)
        index = read_model_index(folder)
        family_name, _ = family_of(index, folder)
        family_cls = _family_class(family_name)
        if free_memory is not None:
            free_memory(weight_file_bytes(folder), choice.device)
        if (dtype is None or str(dtype).lower() == "auto") and choice.device.type == "cuda" \
                and family_cls.cuda_dtype != choice.dtype and devices._bf16_supported(choice.device):
            name = str(family_cls.cuda_dtype).replace("torch.", "")
            choice = devices.DeviceChoice(choice.device, family_cls.cuda_dtype,
                                          f"{choice.device} / {name} (the {family_name} family's dtype on CUDA)")
        try:
            family = family_cls(folder, index, choice.device, choice.dtype)
        except BaseException as exc:
            devices.free_cache(choice.device)
            if _is_oom(exc):
                raise BonsaiMemoryError(
                    f"{choice.device} ran out of memory loading {src}; close other programs, or use device cpu"
                ) from exc
            raise
        # what an ``auto`` VAE decode must fit (CUDA): 95 % of a budget the user set (--max-vram,
        # BONSAI_MAX_VRAM_GB), never more than the card has; without one (the default budget does not tile: a tiled decode blends
        # overlapping tiles, so its pixels differ a little from a whole one) only the card's free memory,
        # read when the decode starts (Family.vae_decode)
        family.decode_budget_bytes = _decode_budget(config, choice.device)
        place = getattr(family, "place_text_encoder", None)
        if place is not None:  # the text encoder on the device when it fits the budget (placement.py)
            d = family.defaults
            place(config.max_vram_bytes, lambda: estimate_memory_bytes(  # a run without the text encoder's weights
                family.memory_model(cfg=False, text_encoder=False), width=config.family_value("width", d),
                height=config.family_value("height", d), batch=1))
        engine = cls(family, source=str(src), folder=folder, choice=choice, config=config,
                     load_seconds=time.perf_counter() - t0)
        engine.available_memory = available_memory
        return engine

    def _observe_peak(self, fam, peak_bytes: int | None) -> str | None:
        """A CUDA run's measured peak to the family (``observe_peak``: the text encoder's placement
        follows it); the warning to show when the text encoder was moved off the device, else None."""
        observe = getattr(fam, "observe_peak", None)
        return observe(peak_bytes) if observe is not None and self.device.type == "cuda" else None

    @property
    def device(self) -> torch.device:
        return self.choice.device

    @property
    def dtype(self) -> torch.dtype:
        return self.choice.dtype

    @property
    def model_name(self) -> str:
        return Path(str(self.source)).name or str(self.source)

    def unload(self) -> None:
        """Release every module and give cached device memory back."""
        self._lora_set = None
        if self.family is not None:
            self.family.release()
            self.family = None
        devices.free_cache(self.choice.device)

    # ------------------------------------------------------------------ LoRA adapters
    def lora_set(self):
        """The adapters attached to this model (``lora.LoRASet``)."""
        from .lora import LoRASet

        if self._lora_set is None:  # made once per loaded model: unload() drops it with the model
            self._lora_set = LoRASet(self._family())
        return self._lora_set

    def load_lora(self, path: str | os.PathLike, strength: float = 1.0, name: str | None = None,
                  strict: bool = True):
        """Attach a LoRA file as side branches (see ``lora.py``); returns the ``lora.Adapter``."""
        return self.lora_set().load(path, strength, name=name, strict=strict)

    def unload_lora(self, name: str) -> None:
        """Detach adapter ``name`` (the model is then exactly as before it) and free the device cache."""
        self.lora_set().unload(name)
        devices.free_cache(self.device)

    def set_lora_strength(self, name: str, strength: float) -> None:
        self.lora_set().set_strength(name, strength)

    def use_loras(self, loras=()) -> None:
        """Make the attached adapters exactly ``loras`` (``(file, strength)`` pairs)."""
        adapters = self.lora_set()
        before = adapters.names()
        adapters.use(list(loras))
        if set(before) - set(adapters.names()):
            devices.free_cache(self.device)

    # ------------------------------------------------------------------ generating
    def check(self, prompt: str, negative_prompt: str | None = None, *, steps: int | None = None,
              guidance: float | None = None, width: int | None = None, height: int | None = None,
              batch: int = 1, mode: str = "warn", max_side: int | None = None,
              cfg: bool | None = None) -> GuardrailReport:
        """Run the guardrails on a request with this model's tokenizer, limits and memory
        (``cfg``: two network rows per image; None follows the family and the guidance)."""
        fam = self._family()
        d = fam.defaults
        pick = self._setting
        req = Request(prompt=prompt, negative_prompt=negative_prompt or "", width=pick("width", width),
                      height=pick("height", height), steps=pick("steps", steps), guidance=pick("guidance", guidance),
                      batch=batch)
        max_side = pick("max_side", max_side)
        cfg = d.use_cfg and req.guidance != 1.0 if cfg is None else cfg
        model = fam.memory_model(cfg=cfg)
        available = self.available_memory(self.device) if self.available_memory else _available_memory(self.device)
        if self.device.type == "cuda":
            available = min(available, self.config.max_vram_bytes) if available else self.config.max_vram_bytes
        elif available is not None:  # the estimate counts the weights, which are in this memory already
            available += fam.loaded_bytes()

        def estimate(r: Request) -> int:
            return estimate_memory_bytes(model, width=r.width, height=r.height, batch=r.batch)

        return check_request(req, family=d, mode=mode, max_side=max_side, count_tokens=fam.count_tokens,
                             tokenizer=fam.tokenizer(), memory_estimate_bytes=estimate,
                             memory_available_bytes=available, memory_hard=self.device.type != "cuda")

    def _setting(self, name: str, value):
        """An argument given to the call, else the config's value (environment, flag), else the family's."""
        return self.config.family_value(name, self._family().defaults) if value is None else value

    def generate(self, prompt: str, negative_prompt: str | None = None, *, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None,
                 seed: int | None = None, sampler: str | None = None, karras: bool | None = None,
                 schedule: str | None = None, batch: int = 1,
                 guardrail: str = "warn", max_side: int | None = None, style_prefix: bool | None = None,
                 default_negative: bool = True, true_cfg: bool | None = None, callback: ProgressFn | None = None,
                 cancel: Callable[[], bool] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate ``batch`` images. Image ``i`` starts from the noise of seed ``seed + i`` made
        alone (the pixels then agree to within one level: batched arithmetic rounds differently). ``callback(step, total, preview)`` runs after every step and
        ``cancel()`` before every step (True raises ``BonsaiCancelledError``). ``on_stage(name)``
        runs as each stage of ``STAGES`` begins: "encode" (prompts), "sample" (the first step),
        "decode" (the VAE) and "done"; like ``callback``, its exceptions propagate untouched, so
        a host can stop the run there too.

        A setting left at None comes from the engine's ``BonsaiConfig`` (``BONSAI_STEPS``, ...),
        and where that has none, from the model family's defaults.

        ``schedule`` (SD family): whose sigmas the sampler walks. ``auto`` (default) takes the
        sampler's own diffusers scheduler (Euler: ``EulerDiscreteScheduler``; DPM++ 2M:
        ``DPMSolverMultistepScheduler``), so that each sampler gives what diffusers' pipeline with
        that scheduler gives; ``euler`` runs either sampler on Euler's sigmas (the same sigmas for
        both, as k-diffusion does); ``dpm`` on DPM-Solver's.

        ``true_cfg``: classifier-free guidance with the negative prompt (two network passes a step).
        None follows the family: on for SD UNets, off for guidance-distilled FLUX.2 [klein], where
        asking for it (with ``guidance`` != 1) runs real CFG on top of the distilled model."""
        fam = self._family()
        d = fam.defaults
        cfg_wanted = d.use_cfg if true_cfg is None else bool(true_cfg)
        t_start = time.perf_counter()
        sampler = self._setting("sampler", sampler)
        if sampler not in sampling.SAMPLERS:
            raise BonsaiRequestError(f"unknown sampler {sampler!r}: choose one of {', '.join(sampling.SAMPLERS)}")
        karras = bool(self._setting("karras", karras))
        schedule = self.config.schedule if schedule is None else schedule
        if schedule not in ("auto", *sampling.SD_SCHEDULES):
            raise BonsaiRequestError(f"unknown schedule {schedule!r}: choose auto, {', '.join(sampling.SD_SCHEDULES)}")
        check_prompt_text(prompt, negative_prompt or "", max_tokens=d.max_tokens)
        prompt, negative = apply_prompt_defaults(prompt, negative_prompt or "", config=self.config,
                                                 use_style_prefix=style_prefix,
                                                 use_default_negative=default_negative and cfg_wanted)
        report = self.check(prompt, negative, steps=steps, guidance=guidance, width=width, height=height,
                            batch=batch, mode=guardrail, max_side=max_side,
                            cfg=cfg_wanted and self._setting("guidance", guidance) != 1.0)
        r = report.request
        m = d.multiple_of
        if r.width % m or r.height % m:  # warn mode lets these through: make the image at the size we report
            w, h = r.width - r.width % m, r.height - r.height % m
            if w < m or h < m:
                raise BonsaiRequestError(f"{r.width}x{r.height} is smaller than one {m}-pixel tile of this model; "
                                         f"use at least {m}x{m}")
            report.warnings.append(f"{r.width}x{r.height} is not a multiple of {m}: the image is made at {w}x{h}")
            r.width, r.height = w, h
        seed = check_seed(seed)
        seed = random.randint(0, 2**32 - 1) if seed is None else seed
        seeds = [(seed + i) % 2**64 for i in range(r.batch)]
        use_cfg = cfg_wanted and r.guidance != 1.0
        peak = _PeakMemory(self.device, phases=self.measure_phases)
        stage = on_stage or (lambda name: None)
        try:
            stage("encode")
            peak.phase("encode")
            t0 = time.perf_counter()
            cond = fam.encode([r.prompt] * r.batch)
            uncond = fam.encode_negative([r.negative_prompt] * r.batch) if use_cfg else None
            t_encode = time.perf_counter() - t0

            sigmas = fam.schedule(r.steps, r.width, r.height, karras, sampler=sampler, kind=schedule)
            shape = fam.latent_shape(r.width, r.height)
            noise = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))
                                 for s in seeds])
            x = (noise * sampling.initial_noise_scale(sigmas)).to(self.device)
            denoise = fam.denoiser(cond, uncond, r.guidance, sigmas, r.width, r.height)

            def on_step(i: int, n: int, x0: torch.Tensor) -> None:
                if callback is not None:
                    callback(i + 1, n, x0)

            stage("sample")
            peak.phase("denoise")
            t0 = time.perf_counter()
            with torch.inference_mode():
                latents = sampling.sample(denoise, x, sigmas, sampler=sampler, callback=on_step, cancel=cancel)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t_denoise = time.perf_counter() - t0
                stage("decode")
                peak.phase("decode")
                t0 = time.perf_counter()
                images = fam.decode(latents, r.width, r.height)
            t_decode = time.perf_counter() - t0
            stage("done")
        except BonsaiCancelledError:
            devices.free_cache(self.device)
            raise
        except BaseException as exc:
            if _is_oom(exc):
                devices.free_cache(self.device)
                moved_off = self._observe_peak(fam, OUT_OF_MEMORY_PEAK)  # a resident text encoder leaves the card
                raise BonsaiMemoryError(
                    f"{self.device} ran out of memory generating {r.batch} image(s) of {r.width}x{r.height}: "
                    "try a smaller size (upscale afterwards), fewer images per batch"
                    + (", or device cpu" if self.device.type != "cpu" else ", or close other programs")
                    + (f" ({moved_off})" if moved_off else "")) from exc
            raise
        measured = peak.peak()
        placed = getattr(getattr(fam, "te_placement", None), "where", None)  # as this run had it
        moved_off = self._observe_peak(fam, measured.get("peak_bytes"))
        if moved_off:
            report.warnings.append(moved_off)
        tensor = images.permute(0, 2, 3, 1).contiguous()
        pil = [_to_pil(t) for t in tensor]
        metadata = {
            "model": self.model_name, "source": self.source, "family": fam.name,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "prompt": r.prompt, "negative_prompt": r.negative_prompt if use_cfg else "",
            "prompt_tokens": report.prompt_tokens, "max_tokens": d.max_tokens,
            "steps": r.steps, "guidance": r.guidance, "cfg": use_cfg, "sampler": sampler, "karras": karras,
            "schedule": schedule,
            "seed": seed, "seeds": seeds, "width": r.width, "height": r.height, "batch": r.batch,
            "timings": {"load_s": round(self.load_seconds, 3), "encode_s": round(t_encode, 3),
                        "denoise_s": round(t_denoise, 3), "decode_s": round(t_decode, 3),
                        "total_s": round(time.perf_counter() - t_start, 3),
                        "per_step_s": round(t_denoise / max(r.steps, 1), 4)},
            **measured,
            "text_encoder_placement": placed,
            "vae_tile": fam.last_vae_tile,
            "estimate_bytes": estimate_memory_bytes(fam.memory_model(cfg=use_cfg), width=r.width, height=r.height,
                                                    batch=r.batch),
            "guardrail": {"mode": report.mode, "warnings": report.warnings, "notes": report.notes},
            "loras": [{"name": a.path.name, "strength": a.strength} for a in self.lora_set().adapters.values()],
            "bonsai_version": _version(),
        }
        return GenerationResult(pil, tensor, metadata, report, list(report.warnings))

    def preview(self, x0: torch.Tensor, max_side: int = 512) -> list:
        """PIL previews of a step's data prediction ``x0 [B, C, h, w]`` (what ``callback`` gets):
        the family's latent->RGB map, scaled up to the image's size or ``max_side``, whichever is
        smaller. Cheap: no VAE decode after the first call, which fits the map once."""
        from PIL import Image

        fam = self._family()
        rgb = fam.preview(x0)
        out = []
        for t in rgb:
            img = _to_pil(t)
            h, w = t.shape[:2]
            scale = min(fam.pixels_per_latent(), max_side / max(h, w))
            if scale > 1:
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            out.append(img)
        return out

    def _family(self) -> Family:
        if self.family is None:
            raise BonsaiRequestError("this engine was unloaded; load the model again")
        return self.family


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the weight files under a model folder (``.safetensors``, ``.gguf``, ``.bin``): what
    loading it will put in memory, near enough for making room."""
    return sum(p.stat().st_size for ext in ("*.safetensors", "*.gguf", "*.bin") for p in Path(folder).rglob(ext)
               if p.is_file())


def _refuse_unimported(path: Path) -> None:
    """A file, or a folder without model_index.json: say what it is and how to make it loadable."""
    from .importers import detect_layout

    try:
        layout = detect_layout(path)
    except BonsaiCheckpointError:
        layout = None
    if layout and layout != "bonsai":
        raise BonsaiCheckpointError(
            f"{path} is a Bonsai Image 4B payload in the public {layout!r} layout; import it once into a model "
            f"folder (no re-quantization): bonsai import {path} models/bonsai/<name>")
    raise BonsaiCheckpointError(
        f"{path}: the engine loads a model folder with a model_index.json (a Bonsai folder from `bonsai convert` "
        "or `bonsai import`, or a diffusers pipeline folder)")


def _to_pil(image_hwc: torch.Tensor):
    from PIL import Image

    arr = (image_hwc.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------- one loaded model at a time
_CURRENT: dict = {"key": None, "engine": None}


def load_engine(src, device: str | None = None, dtype=None, cache_dir: str | None = None,
                config: BonsaiConfig | None = None, free_memory: FreeMemoryFn | None = None,
                available_memory: AvailableMemoryFn | None = None) -> BonsaiImageEngine:
    """Load (or reuse) the engine for ``src``. Asking for another model unloads the previous one
    first and frees its device memory, so two models never sit on a small card together; then
    ``free_memory`` (see ``BonsaiImageEngine.from_pretrained``) makes room for the new one.
    ``available_memory`` is (re)attached to the engine returned."""
    config = config or BonsaiConfig.from_env()
    key = (str(src), str(device), str(dtype), str(cache_dir))
    engine = _CURRENT["engine"]
    if _CURRENT["key"] != key or engine is None or engine.family is None:
        unload_current(free=config.free_cache_on_switch)
        engine = BonsaiImageEngine.from_pretrained(src, device=device, dtype=dtype, cache_dir=cache_dir,
                                                   config=config, free_memory=free_memory)
        _CURRENT.update(key=key, engine=engine)
    if available_memory is not None:
        engine.available_memory = available_memory
    return engine


def unload_current(free: bool = True) -> None:
    engine = _CURRENT.get("engine")
    _CURRENT.update(key=None, engine=None)
    if engine is not None:
        if free:
            engine.unload()
        else:
            engine.family = None
