"""Settings: the project's defaults, what the environment changes, what flags change.

Precedence, lowest to highest: the defaults below, then ``BONSAI_*`` environment variables,
then explicit overrides (CLI flags, node inputs). ``BonsaiConfig.from_env`` applies all three
and remembers where every value came from, so ``bonsai info --config`` can say it.

Per-family generation defaults (``FAMILY_DEFAULTS``) are what a generation setting left at None
means: the checkpoint decides the family, and the family decides steps, size, sampler and the
guardrails' limits unless the environment or a flag sets one (``BONSAI_STEPS=30``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from .errors import BonsaiRequestError
from .shipped import SHIPPED_NAME, shipped_model

# The default model: the project's own 1-bit SD-family model, installed inside the package
# (bonsai_core/assets/bonsai-shapes, see shipped.py), by its name, which ``hub.resolve_model`` maps
# to that folder. None only in an install that carries no model: then ``--model`` is required.
SHIPPED_MODEL: str | None = SHIPPED_NAME if shipped_model() is not None else None

GIB = 1024**3  # a "GB" of VRAM, as GPU vendors count it

# Setting name -> environment variable that overrides it. Other settings have no variable.
ENV_VARS: dict[str, str] = {
    "model": "BONSAI_MODEL",
    "cache_dir": "BONSAI_CACHE",
    "device": "BONSAI_DEVICE",
    "max_vram_gb": "BONSAI_MAX_VRAM_GB",
    "steps": "BONSAI_STEPS",
    "width": "BONSAI_WIDTH",
    "height": "BONSAI_HEIGHT",
    "guidance": "BONSAI_GUIDANCE",
    "sampler": "BONSAI_SAMPLER",
    "schedule": "BONSAI_SCHEDULE",
    "karras": "BONSAI_KARRAS",
    "max_side": "BONSAI_MAX_SIDE",
}

#: Generation settings whose default (None) means "the model family's" (``FAMILY_DEFAULTS``):
#: which family that is, only the checkpoint says, so the config cannot hold one number for all.
FAMILY_SETTINGS = ("steps", "width", "height", "guidance", "sampler", "karras", "max_side")

SAMPLER_CHOICES = ("euler", "dpmpp_2m")
SCHEDULE_CHOICES = ("auto", "euler", "dpm")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_vram_gb(value: object, origin: str) -> float:
    """A positive, finite number of gigabytes; ``origin`` names where the value came from."""
    try:
        gb = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        gb = math.nan
    if not math.isfinite(gb) or gb <= 0:
        raise BonsaiRequestError(
            f"{origin}={value!r} is not a usable VRAM budget: it must be a positive number of "
            f"gigabytes, such as 6 or 5.5. Fix it, or leave it unset to use the default "
            f"{BonsaiConfig.max_vram_gb}."
        )
    return gb


def _parse_setting(name: str, value: object, origin: str) -> object:
    """A generation setting from a string (environment) or a value (flag), checked for its type;
    range checks are the guardrails' (they know the family)."""
    if value is None:
        return None
    what = ""
    try:
        if name in ("steps", "width", "height", "max_side"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            n = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
            if n < 1:
                raise ValueError
            return n
        if name == "guidance":
            g = float(value)  # type: ignore[arg-type]
            if not math.isfinite(g):
                raise ValueError
            return g
        if name == "karras":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            what = "on or off (1/0, true/false, yes/no)"
            raise ValueError
        if name in ("sampler", "schedule"):
            choices = SAMPLER_CHOICES if name == "sampler" else SCHEDULE_CHOICES
            text = str(value).strip().lower()
            if text not in choices:
                what = "one of " + ", ".join(choices)
                raise ValueError
            return text
    except (TypeError, ValueError):
        what = what or ("a whole number of at least 1" if name != "guidance" else "a number, such as 7.5")
        raise BonsaiRequestError(
            f"{origin}={value!r} is not a usable {name}: it must be {what}. Fix it, or leave it unset "
            f"to use the model family's default.") from None
    return value


@dataclass(frozen=True)
class BonsaiConfig:
    """Every user-facing default in one place. Frozen: derive a changed copy with
    ``with_overrides`` (which also records the change as coming from a flag)."""

    model: str | None = SHIPPED_MODEL  # the shipped model's name, a Hub repo id or a local folder; None: required
    cache_dir: str = "./models/bonsai_cache"
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    # Generation defaults. None: the model family's (FAMILY_DEFAULTS: SD1.5 24 steps 512² CFG 7.5
    # dpmpp_2m; SDXL 1024²; klein 4 steps 1024² euler, no CFG). A value here (from the environment
    # or a flag) is used for every model; an argument to generate() beats it.
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    sampler: str | None = None  # "euler" or "dpmpp_2m"
    schedule: str = "auto"  # SD sigmas: auto (the sampler's own diffusers scheduler), euler or dpm
    karras: bool | None = None  # Karras sigmas (SD family)
    max_side: int | None = None  # longest side the size guardrail allows (upscale afterwards instead)
    max_vram_gb: float = 6.0  # the memory guardrail warns above this budget
    free_cache_on_switch: bool = True  # empty the device cache when another model is loaded
    style_prefix: str = "digital painting, concept art, cinematic lighting"
    use_style_prefix: bool = False
    negative_default: str = "blurry, low quality, artifacts, watermark, deformed"
    # setting name -> "env VAR" or "flag"; settings missing here are defaults.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source("max_vram_gb")
        origin = src.removeprefix("env ") if src.startswith("env ") else "max_vram_gb"
        object.__setattr__(self, "max_vram_gb", _parse_vram_gb(self.max_vram_gb, origin))
        for name in (*FAMILY_SETTINGS, "schedule"):
            src = self.source(name)
            origin = src.removeprefix("env ") if src.startswith("env ") else name
            object.__setattr__(self, name, _parse_setting(name, getattr(self, name), origin))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> BonsaiConfig:
        """Defaults, then ``BONSAI_*`` variables from ``environ`` (``os.environ`` if None), then
        ``overrides``. An override of None means "not given"; an empty variable counts as unset.
        Raises BonsaiRequestError for a variable whose value can't be used."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        sources: dict[str, str] = {}
        for name, var in ENV_VARS.items():
            raw = environ.get(var)
            if raw is None or not raw.strip():
                continue
            values[name] = raw.strip()
            sources[name] = f"env {var}"
        return cls(**values, sources=sources).with_overrides(**overrides)

    def with_overrides(self, **overrides: object) -> BonsaiConfig:
        """A copy with the given settings changed and marked as coming from a flag.
        None values are skipped (the flag was not given); unknown names are a TypeError."""
        known = {f.name for f in fields(self)} - {"sources"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown BonsaiConfig setting(s) {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        return replace(self, **given, sources={**self.sources, **dict.fromkeys(given, "flag")})

    @property
    def max_vram_bytes(self) -> int:
        return int(self.max_vram_gb * GIB)

    def source(self, name: str) -> str:
        """Where a setting's value came from: "default", "env BONSAI_…" or "flag"."""
        return self.sources.get(name, "default")

    def family_value(self, name: str, family: "FamilyDefaults") -> object:
        """The setting in force for a model of ``family``: this config's value, else the family's."""
        value = getattr(self, name)
        return getattr(family, name) if value is None else value

    def describe(self, family: str | None = None) -> str:
        """A table of every setting in force, its value and where it came from (``bonsai info
        --config``). Generation settings left to the model family show that family's values when
        ``family`` names one, else say that the model decides (with each family's value)."""
        fam = FAMILY_DEFAULTS[family] if family is not None else None
        rows = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            source = self.source(f.name)
            if f.name == "model" and value is None:
                shown = "(none: pass --model or set BONSAI_MODEL)"
            elif f.name in FAMILY_SETTINGS and value is None:
                if fam is not None:
                    shown, source = repr(getattr(fam, f.name)), f"{family} family default"
                else:
                    per = ", ".join(f"{k} {getattr(v, f.name)!r}" for k, v in FAMILY_DEFAULTS.items())
                    shown, source = f"(the model's family: {per})", "family default"
            else:
                shown = repr(value)
            rows.append((f.name, shown, source))
        w0 = max(len("setting"), *(len(r[0]) for r in rows))
        w1 = max(len("value"), *(len(r[1]) for r in rows))
        lines = [f"{'setting':<{w0}}  {'value':<{w1}}  from", f"{'-' * w0}  {'-' * w1}  ----"]
        lines += [f"{n:<{w0}}  {v:<{w1}}  {s}" for n, v, s in rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class FamilyDefaults:
    """Generation defaults and guardrail limits of one model family."""

    steps: int
    guidance: float
    width: int
    height: int
    max_side: int  # longest side the guardrail allows by default
    max_tokens: int  # prompt length the text encoder reads, special tokens included
    sampler: str
    use_cfg: bool  # False: guidance-distilled, one forward per step, no negative prompt
    steps_advice: tuple[int, int]  # steps outside this range get a warning
    multiple_of: int  # width and height must be multiples of this
    karras: bool = False


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    # SD1.5-style UNet: VAE downsamples by 8 (latents H/8 x W/8), CLIP reads 77 tokens.
    "sd_unet": FamilyDefaults(
        steps=24, guidance=7.5, width=512, height=512, max_side=768, max_tokens=77,
        sampler="dpmpp_2m", use_cfg=True, steps_advice=(20, 28), multiple_of=8,
    ),
    # SDXL-style UNet (two CLIP text encoders, size conditioning): native 1024², VAE downsamples by
    # 8; diffusers' StableDiffusionXLPipeline defaults to guidance 5.0. Over 1536 a side is refused
    # by default, as over 768 for SD1.5 (1.5x native: larger images repeat themselves).
    "sdxl": FamilyDefaults(
        steps=30, guidance=5.0, width=1024, height=1024, max_side=1536, max_tokens=77,
        sampler="dpmpp_2m", use_cfg=True, steps_advice=(20, 40), multiple_of=8,
    ),
    # FLUX.2 [klein] (Bonsai Image 4B): 4-step guidance-distilled flow model, Qwen3 prompt padded
    # to 512 tokens. A latent is H/16 x W/16 after 2x2 patching and the CUDA reference rejects
    # sizes that are not multiples of 32 (PrismML's reference pipeline).
    "flux2_klein": FamilyDefaults(
        steps=4, guidance=1.0, width=1024, height=1024, max_side=2048, max_tokens=512,
        sampler="euler", use_cfg=False, steps_advice=(4, 8), multiple_of=32,
    ),
}
