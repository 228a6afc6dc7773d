"""Guardrails: check a generation request before any compute is spent on it.

Each rule runs in one of three modes:

* ``warn``   — keep the value and add a warning to the report;
* ``clamp``  — change the value to the nearest allowed one and add a note saying so;
* ``refuse`` — raise ``BonsaiRequestError`` (``BonsaiMemoryError`` for memory) naming the value,
  the allowed range and what to do instead.

Some values are nonsense in every mode (0 steps, negative sizes, guidance 1000, batch 0) and are
always refused. Problems are collected first so that one error lists all of them.

These checks are our own code because no library knows our families' limits; token counting
uses the model's own tokenizer so that "too long" means what the text encoder will cut.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .config import FAMILY_DEFAULTS, GIB, BonsaiConfig, FamilyDefaults
from .errors import BonsaiMemoryError, BonsaiRequestError

MODES = ("warn", "clamp", "refuse")
STEPS_RANGE = (1, 150)  # hard limits, any mode
GUIDANCE_RANGE = (0.0, 30.0)
BATCH_RANGE = (1, 16)
_SHOWN_CUT_WORDS = 8  # how many of the cut words a warning quotes


@dataclass
class Request:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 24
    guidance: float = 7.5
    batch: int = 1


@dataclass
class GuardrailReport:
    request: Request  # the checked values, clamped where the mode said so
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was clamped, from what to what
    prompt_tokens: int | None = None  # of the checked prompt; None when no tokenizer was given
    mode: str = "warn"

    def text(self) -> str:
        r = self.request
        tokens = "" if self.prompt_tokens is None else f", prompt {self.prompt_tokens} tokens"
        lines = [
            f"Bonsai guardrail ({self.mode}): {r.width}x{r.height}, {r.steps} steps, "
            f"guidance {r.guidance}, batch {r.batch}{tokens}"
        ]
        lines += [f"  clamped: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        if not self.notes and not self.warnings:
            lines.append("  all checks passed")
        return "\n".join(lines)


class _Findings:
    """What the rules found, sorted by what the mode does with it."""

    def __init__(self, mode: str):
        self.mode = mode
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.problems: list[str] = []

    def soft(self, problem: str, advice: str, fix: Callable[[], str] | None = None) -> None:
        """A value out of a soft limit: warn keeps it, clamp runs ``fix`` (which changes the
        value and returns a note), refuse records it as a problem."""
        if self.mode == "warn":
            self.warnings.append(f"{problem}; {advice}")
        elif self.mode == "clamp" and fix is not None:
            self.notes.append(fix())
        else:
            self.problems.append(f"{problem}; {advice}")

    def hard(self, problem: str, advice: str) -> None:
        """A value no mode can accept."""
        self.problems.append(f"{problem}; {advice}")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_request(
    req: Request,
    *,
    family: FamilyDefaults,
    mode: str = "warn",
    max_side: int | None = None,
    tokenizer=None,
    count_tokens: Callable[[str], int] | None = None,
    memory_estimate_bytes: int | Callable[[Request], int] | None = None,
    memory_available_bytes: int | None = None,
) -> GuardrailReport:
    """Check ``req`` against ``family``'s limits; ``req`` itself is never changed.

    ``max_side`` defaults to ``family.max_side``. Prompt length is checked only when
    ``count_tokens(text) -> int`` or a transformers ``tokenizer`` is given (count_tokens wins for
    counting; clamping decodes through the tokenizer when there is one, else cuts at a word).
    Memory is checked only when both numbers are given; ``memory_estimate_bytes`` may be a
    callable of the request, which lets clamp mode find a smaller batch that fits (with a
    plain number it can't, and refuses).
    """
    if mode not in MODES:
        raise BonsaiRequestError(
            f"guardrail mode {mode!r} is unknown; use one of {', '.join(MODES)}"
        )
    out = replace(req)
    found = _Findings(mode)
    _check_steps(out, family, found)
    _check_guidance(out, family, found)
    _check_batch(out, found)
    _check_size(out, family, family.max_side if max_side is None else max_side, found)
    prompt_tokens = _check_prompts(out, family, tokenizer, count_tokens, found)
    if found.problems:
        raise BonsaiRequestError("Request refused:\n- " + "\n- ".join(found.problems))
    _check_memory(out, memory_estimate_bytes, memory_available_bytes, found)
    return GuardrailReport(out, found.warnings, found.notes, prompt_tokens, mode)


def _check_steps(out: Request, family: FamilyDefaults, found: _Findings) -> None:
    lo, hi = family.steps_advice
    s = out.steps
    if not _is_int(s) or not STEPS_RANGE[0] <= s <= STEPS_RANGE[1]:
        found.hard(
            f"steps {s!r} is not a whole number in {STEPS_RANGE[0]}-{STEPS_RANGE[1]}",
            f"use {lo}-{hi} steps for this model (default {family.steps})",
        )
    elif found.mode == "warn" and not lo <= s <= hi:
        why = "fewer leave noise and lose detail" if s < lo else "more cost time for little gain"
        found.warnings.append(f"{s} steps: {lo}-{hi} advised for this model ({why})")


def _check_guidance(out: Request, family: FamilyDefaults, found: _Findings) -> None:
    g = out.guidance
    lo, hi = GUIDANCE_RANGE
    if not isinstance(g, numbers.Real) or isinstance(g, bool) or not lo <= g <= hi:
        found.hard(
            f"guidance {g!r} is outside {lo:g}-{hi:g}",
            f"use about {family.guidance:g} (this model's default)",
        )
    elif not family.use_cfg and g != 1.0:
        found.warnings.append(
            f"guidance {g:g} has no effect: this model is guidance-distilled and runs without "
            f"classifier-free guidance; leave it at 1.0"
        )


def _check_batch(out: Request, found: _Findings) -> None:
    b = out.batch
    lo, hi = BATCH_RANGE
    if not _is_int(b) or b < lo:
        found.hard(f"batch {b!r} is not a number of images {lo}-{hi}", "ask for at least 1 image")
    elif b > hi:
        def fix() -> str:
            out.batch = hi
            return f"batch {b} -> {hi} (at most {hi} images in one run)"

        found.soft(
            f"batch {b} is over the {hi} images allowed in one run",
            f"ask for {hi} or fewer and run several batches",
            fix,
        )


def _fit_size(w: int, h: int, m: int, max_side: int) -> tuple[int, int]:
    """The nearest size whose sides are multiples of ``m`` (at least one multiple) and at most
    ``max_side``; a side over the limit is scaled down together with the other (aspect kept)."""
    top = max(m, max_side // m * m)
    scale = min(1.0, max_side / max(w, h))

    def snap(x: float) -> int:
        return min(top, max(m, math.floor(x * scale / m + 0.5) * m))

    return snap(w), snap(h)


def _check_size(out: Request, family: FamilyDefaults, max_side: int, found: _Findings) -> None:
    m = family.multiple_of
    bad = False
    for name in ("width", "height"):
        v = getattr(out, name)
        if not _is_int(v) or v <= 0:
            found.hard(
                f"{name} {v!r} is not a positive number of pixels",
                f"use a multiple of {m} such as {getattr(family, name)}",
            )
            bad = True
    if bad:
        return
    if not _is_int(max_side) or max_side < m:
        raise BonsaiRequestError(
            f"max_side {max_side!r} is smaller than the smallest allowed side {m}; "
            f"set it to at least {m} (this model's default is {family.max_side})"
        )
    w, h = out.width, out.height
    issues = [
        f"{name} {v} is not a multiple of {m}"
        for name, v in (("width", w), ("height", h))
        if v % m
    ] + [
        f"{name} {v} is over the largest side {max_side} allowed for this model"
        for name, v in (("width", w), ("height", h))
        if v > max_side
    ]
    if not issues:
        return
    fw, fh = _fit_size(w, h, m, max_side)
    advice = (
        f"sides must be multiples of {m} and at most {max_side}: use {fw}x{fh}"
        + (" and upscale afterwards" if max(w, h) > max_side else "")
    )

    if found.mode == "clamp":
        out.width, out.height = fw, fh
        found.notes.append(f"size {w}x{h} -> {fw}x{fh} ({'; '.join(issues)})")
    else:
        for issue in issues:
            found.soft(issue, advice)


def _count_with(tokenizer) -> Callable[[str], int]:
    # The model's own count: the text's tokens plus the special tokens the tokenizer adds.
    return lambda text: len(tokenizer(text, verbose=False).input_ids)


def _split_at_limit(
    text: str, limit: int, count: Callable[[str], int], tokenizer
) -> tuple[str, str]:
    """(kept, cut): the longest start of ``text`` that fits ``limit`` tokens, and the rest."""
    if tokenizer is not None:
        body = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        keep = max(0, limit - (len(tokenizer(text, verbose=False).input_ids) - len(body)))
        cut = tokenizer.decode(body[keep:], skip_special_tokens=True).strip()
        kept = tokenizer.decode(body[:keep], skip_special_tokens=True).strip()
        # Decoded text can re-tokenize a little differently; drop tokens until it fits.
        while keep > 0 and count(kept) > limit:
            keep -= 1
            kept = tokenizer.decode(body[:keep], skip_special_tokens=True).strip()
        return kept, cut
    # Only a counter: cut at a word boundary, keeping the user's text as written.
    ends = [mo.end() for mo in re.finditer(r"\S+", text)]
    lo, hi = 0, len(ends)  # the first lo words fit; find the largest such lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[: ends[mid - 1]]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    kept = text[: ends[lo - 1]] if lo else ""
    return kept, text[len(kept):].strip()


def _first_words(text: str, n: int = _SHOWN_CUT_WORDS) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def _check_prompts(
    out: Request,
    family: FamilyDefaults,
    tokenizer,
    count_tokens: Callable[[str], int] | None,
    found: _Findings,
) -> int | None:
    if not out.prompt.strip():
        found.warnings.append(
            "the prompt is empty: the model will draw something unguided; describe what you want"
        )
    count = count_tokens or (_count_with(tokenizer) if tokenizer is not None else None)
    if count is None:
        return None
    limit = family.max_tokens
    # The negative prompt goes through the same encoder, but only a CFG model reads it.
    names = ("prompt", "negative_prompt") if family.use_cfg else ("prompt",)
    for name in names:
        text = getattr(out, name)
        n = count(text)
        if n <= limit:
            continue
        kept, cut = _split_at_limit(text, limit, count, tokenizer)
        label = name.replace("_", " ")

        def fix() -> str:  # called at once by soft(), so the loop variables are current
            setattr(out, name, kept)
            return f'{label} cut from {n} to {count(kept)} tokens; dropped: "{_first_words(cut)}"'

        found.soft(
            f"{label} is {n} tokens, over the {limit} this model reads",
            f'the text encoder will cut the tail from "{_first_words(cut)}" on; '
            f"shorten it or move what matters to the front",
            fix,
        )
    return count(out.prompt)


def _check_memory(
    out: Request,
    estimate: int | Callable[[Request], int] | None,
    available: int | None,
    found: _Findings,
) -> None:
    if estimate is None or available is None:
        return
    need = estimate(out) if callable(estimate) else int(estimate)
    if need <= available:
        return
    problem = (
        f"this request needs about {need / GIB:.2f} GiB but {available / GIB:.2f} GiB is available"
    )
    advice = (
        f"use a smaller size than {out.width}x{out.height}, fewer images than {out.batch} per "
        f"batch, or run on the cpu (device cpu)"
    )
    if found.mode == "warn":
        found.warnings.append(f"{problem}; {advice}")
        return
    if found.mode == "clamp" and callable(estimate):
        for b in range(out.batch - 1, 0, -1):
            if estimate(replace(out, batch=b)) <= available:
                found.notes.append(f"batch {out.batch} -> {b} to fit in {available / GIB:.2f} GiB")
                out.batch = b
                return
    raise BonsaiMemoryError(f"{problem}; {advice}")


def estimate_memory_bytes(
    *, weight_bytes: int, width: int, height: int, batch: int, family: str, dtype_bytes: int = 2
) -> int:
    """A rough peak-memory estimate in bytes for one generation; good to a factor of about 2.

    weights + batch-proportional activations, plus 10% for allocator slack:

    * ``sd_unet`` (SD1.5 layout): latent tokens T = (H/8)(W/8); CFG runs conditional and
      unconditional together, so 2 x batch rows go through the UNet. Per row: the self-attention
      scores of the highest-resolution level, T^2 x 8 heads (the plain attention path materializes
      them; fused SDPA kernels need less, so this is an upper bound), plus feature maps kept alive
      through the UNet (skip connections), about 40 tensors of T x 320 channels.
    * ``flux2_klein``: sequence S = (H/16)(W/16) image tokens + 512 text tokens, no CFG. Per row:
      joint-attention scores S^2 x 24 heads, plus the widest single-block projection (27648) and
      about 10 tensors of the 3072 hidden size.
    * both: the VAE decoder at full resolution, about 6 live tensors of H x W x 128 channels per image.
    """
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILY_DEFAULTS)}")
    fam = FAMILY_DEFAULTS[family]
    rows = batch * (2 if fam.use_cfg else 1)
    if family == "sd_unet":
        t = (height // 8) * (width // 8)
        per_row = t * t * 8 + t * 320 * 40
    else:
        s = (height // 16) * (width // 16) + fam.max_tokens
        per_row = s * s * 24 + s * (27648 + 10 * 3072)
    vae = batch * height * width * 128 * 6
    activations = (rows * per_row + vae) * dtype_bytes
    return int((weight_bytes + activations) * 1.1)


def apply_prompt_defaults(
    prompt: str,
    negative: str,
    *,
    config: BonsaiConfig,
    use_style_prefix: bool | None = None,
    use_default_negative: bool = True,
) -> tuple[str, str]:
    """The prompt with ``config.style_prefix`` in front when asked (``use_style_prefix`` None
    means ``config.use_style_prefix``; a prompt that already starts with it is left alone), and
    an empty negative replaced by ``config.negative_default`` when ``use_default_negative``."""
    if use_style_prefix is None:
        use_style_prefix = config.use_style_prefix
    prefix = config.style_prefix.strip()
    if use_style_prefix and prefix and not prompt.strip().startswith(prefix):
        prompt = f"{prefix}, {prompt.strip()}" if prompt.strip() else prefix
    if use_default_negative and not negative.strip():
        negative = config.negative_default
    return prompt, negative
