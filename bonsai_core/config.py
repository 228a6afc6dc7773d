"""Settings: the project's defaults, what the environment changes, what flags change.

Precedence, lowest to highest: the defaults below, then ``BONSAI_*`` environment variables,
then explicit overrides (CLI flags, node inputs). ``BonsaiConfig.from_env`` applies all three
and remembers where every value came from, so ``bonsai info --config`` can say it.

Per-family generation defaults (``FAMILY_DEFAULTS``) are separate: the checkpoint decides the
family, and the family decides steps, size, sampler and the guardrails' limits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from .errors import BonsaiRequestError

# The project's own 1-bit SD-family model has not been published yet, so there is nothing to
# default to: ``model`` stays None and the CLI asks for ``--model`` (or ``BONSAI_MODEL``).
# Set this to the Hub repo id once the model ships.
SHIPPED_MODEL: str | None = None

GIB = 1024**3  # a "GB" of VRAM, as GPU vendors count it

# Setting name -> environment variable that overrides it. Other settings have no variable.
ENV_VARS: dict[str, str] = {
    "model": "BONSAI_MODEL",
    "cache_dir": "BONSAI_CACHE",
    "device": "BONSAI_DEVICE",
    "max_vram_gb": "BONSAI_MAX_VRAM_GB",
}


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


@dataclass(frozen=True)
class BonsaiConfig:
    """Every user-facing default in one place. Frozen: derive a changed copy with
    ``with_overrides`` (which also records the change as coming from a flag)."""

    model: str | None = SHIPPED_MODEL  # Hub repo id or local folder; None means "--model required"
    cache_dir: str = "./models/bonsai_cache"
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    steps: int = 24
    width: int = 512
    height: int = 512
    guidance: float = 7.5
    sampler: str = "dpmpp_2m"  # or "euler"
    karras: bool = False
    max_vram_gb: float = 6.0  # the memory guardrail warns above this budget
    free_cache_on_switch: bool = True  # empty the device cache when another model is loaded
    prompt_max_tokens: int = 77
    max_side: int = 768  # a longer side is refused by default: upscale afterwards instead
    style_prefix: str = "digital painting, concept art, cinematic lighting"
    use_style_prefix: bool = False
    negative_default: str = "blurry, low quality, artifacts, watermark, deformed"
    # setting name -> "env VAR" or "flag"; settings missing here are defaults.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source("max_vram_gb")
        origin = src.removeprefix("env ") if src.startswith("env ") else "max_vram_gb"
        object.__setattr__(self, "max_vram_gb", _parse_vram_gb(self.max_vram_gb, origin))

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

    def describe(self) -> str:
        """A table of every setting, its value and where it came from (``bonsai info --config``)."""
        rows = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            shown = "(none: pass --model or set BONSAI_MODEL)" if value is None else repr(value)
            rows.append((f.name, shown, self.source(f.name)))
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


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    # SD1.5-style UNet: VAE downsamples by 8 (latents H/8 x W/8), CLIP reads 77 tokens.
    "sd_unet": FamilyDefaults(
        steps=24, guidance=7.5, width=512, height=512, max_side=768, max_tokens=77,
        sampler="dpmpp_2m", use_cfg=True, steps_advice=(20, 28), multiple_of=8,
    ),
    # FLUX.2 [klein] (Bonsai Image 4B): 4-step guidance-distilled flow model, Qwen3 prompt padded
    # to 512 tokens. A latent is H/16 x W/16 after 2x2 patching and the CUDA reference rejects
    # sizes that are not multiples of 32 (shared/BONSAI-IMAGE-4B.md section 8).
    "flux2_klein": FamilyDefaults(
        steps=4, guidance=1.0, width=1024, height=1024, max_side=2048, max_tokens=512,
        sampler="euler", use_cfg=False, steps_advice=(4, 8), multiple_of=32,
    ),
}
