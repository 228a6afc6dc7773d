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

from .config import GIB, BonsaiConfig, FamilyDefaults
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
    memory_hard: bool = False,
) -> GuardrailReport:
    """Check ``req`` against ``family``'s limits; ``req`` itself is never changed.

    ``max_side`` defaults to ``family.max_side``. Prompt length is checked only when
    ``count_tokens(text) -> int`` or a transformers ``tokenizer`` is given (count_tokens wins for
    counting; clamping decodes through the tokenizer when there is one, else cuts at a word).
    Memory is checked only when both numbers are given; ``memory_estimate_bytes`` may be a
    callable of the request, which lets clamp mode find a smaller batch that fits (with a
    plain number it can't, and refuses). ``memory_hard``: running out would not raise but take
    the machine down (host memory: the OS kills the process, ComfyUI's server with it), so too much
    is refused in every mode, warn included.
    """
    if mode not in MODES:
        raise BonsaiRequestError(
            f"guardrail mode {mode!r} is unknown; use one of {', '.join(MODES)}"
        )
    check_prompt_text(req.prompt, req.negative_prompt, family.max_tokens)
    out = replace(req)
    found = _Findings(mode)
    _check_steps(out, family, found)
    _check_guidance(out, family, found)
    _check_batch(out, found)
    _check_size(out, family, family.max_side if max_side is None else max_side, found)
    prompt_tokens = _check_prompts(out, family, tokenizer, count_tokens, found)
    if found.problems:
        raise BonsaiRequestError("Request refused:\n- " + "\n- ".join(found.problems))
    _check_memory(out, memory_estimate_bytes, memory_available_bytes, found, hard=memory_hard)
    return GuardrailReport(out, found.warnings, found.notes, prompt_tokens, mode)


MAX_PROMPT_CHARS = 10_000  # far beyond any model's tokens; refused before a tokenizer spends time on it


def check_prompt_text(prompt, negative_prompt="", max_tokens: int | None = None) -> None:
    """Prompts are text that can be encoded: not bytes or numbers, no lone surrogates (what
    undecodable command-line bytes become in Python), at most ``MAX_PROMPT_CHARS`` characters."""
    for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not isinstance(text, str):
            raise BonsaiRequestError(f"the {label} is a {type(text).__name__} ({text!r:.60}), not text; pass a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BonsaiRequestError(
                f"the {label} holds {text[exc.start:exc.end]!r} at character {exc.start}, which is not text "
                "(bytes that are not UTF-8, e.g. from a shell in another encoding); write the prompt in UTF-8"
            ) from None
        if len(text) > MAX_PROMPT_CHARS:
            reads = f"this model reads {max_tokens} tokens (a few hundred characters) and " if max_tokens else ""
            raise BonsaiRequestError(f"the {label} is {len(text)} characters; {reads}prompts over "
                                     f"{MAX_PROMPT_CHARS} characters are refused: shorten it")


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
    hard: bool = False,
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
        f"batch, or " + ("close other programs (this is the machine's own memory)" if hard else
                         "run on the cpu (device cpu)")
    )
    if found.mode == "warn" and not hard:
        found.warnings.append(f"{problem}; {advice}")
        return
    if found.mode == "clamp" and callable(estimate):
        for b in range(out.batch - 1, 0, -1):
            if estimate(replace(out, batch=b)) <= available:
                found.notes.append(f"batch {out.batch} -> {b} to fit in {available / GIB:.2f} GiB")
                out.batch = b
                return
    raise BonsaiMemoryError(f"{problem}; {advice}")


@dataclass(frozen=True)
class MemoryModel:
    """What one loaded model puts on the device, phase by phase, from its modules' sizes and configs.

    A generation has three phases, and its peak is the largest of them:

    * **encode** (once per new prompt): the resident weights, the text encoder lent to the device
      for the forward (``lent_bytes``; FLUX.2 klein on CUDA) and its activations;
    * **denoise**: the resident weights, one network step's activations for ``rows_per_image``
      rows per image (2 under CFG: negative and positive together), the largest 1-bit layer
      unpacked for its matmul (``unpacked_bytes``), and on CUDA, when steps are replayed as a CUDA
      graph, the graph's private pool (another step's worth, held while the model is loaded);
    * **decode**: the resident weights and the VAE decoder at full size for the whole batch, or, when
      that is over ``decode_budget_bytes`` (or ``vae_tile`` names a tile), in overlapping tiles
      (``decode_tile``: diffusers' ``tiled_decode``, one tile's activations at a time).

    ``step_elements(width, height)`` and ``decode_elements(width, height)`` count live activation
    elements per row / per image; ``tiled_decode_elements(width, height, tile)`` per image decoded in
    ``tile`` x ``tile`` pixel tiles; ``encode_elements`` per prompt. They are the families'
    (``Family.memory_model``), from ``unet_step_elements``, ``flux_step_elements``,
    ``vae_decode_elements`` and ``vae_tiled_decode_elements`` below.
    """

    resident_bytes: int
    dtype_bytes: int
    step_elements: Callable[[int, int], int]
    decode_elements: Callable[[int, int], int]
    encode_elements: int = 0
    lent_bytes: int = 0
    unpacked_bytes: int = 0
    rows_per_image: int = 1
    graph_pool: bool = False
    tiled_decode_elements: Callable[[int, int, int], int] | None = None  # None: this VAE is never tiled
    decode_budget_bytes: int | None = None  # ``auto`` tiles a decode over it; None: never (not CUDA)
    vae_tile: str | int = "auto"  # "auto", "off" or the tile's side in pixels (``BONSAI_VAE_TILE``)

    def decode_tile(self, width: int, height: int, batch: int, free_bytes: int | None = None) -> int | None:
        """The side of the square output tiles the VAE decodes in, or None: the whole image at once.

        ``vae_tile`` "off": never tiled; a number: that tile, wherever the image is larger than one
        tile; "auto": tiled only when the whole decode (with allocator slack) is over
        ``decode_budget_bytes`` (weights and decoder) or its activations are over ``free_bytes`` (the
        device memory free when the decode starts), in the largest of ``VAE_TILES`` that fits both
        (else the smallest)."""
        if self.tiled_decode_elements is None or self.vae_tile == "off":
            return None
        larger = [t for t in ((self.vae_tile,) if isinstance(self.vae_tile, int) else VAE_TILES)
                  if t < max(width, height)]
        if not larger or isinstance(self.vae_tile, int):
            return larger[0] if larger else None
        if self.decode_budget_bytes is None and free_bytes is None:
            return None

        def fits(tile: int | None) -> bool:
            whole = self._decode_bytes(width, height, batch, tile)
            return (self.decode_budget_bytes is None or whole * ALLOCATOR_SLACK <= self.decode_budget_bytes) and \
                (free_bytes is None or (whole - self.resident_bytes) * ALLOCATOR_SLACK <= free_bytes)

        if fits(None):
            return None
        return next((t for t in larger if fits(t)), larger[-1])

    def _decode_bytes(self, width: int, height: int, batch: int, tile: int | None) -> int:
        elements = self.decode_elements(width, height) if tile is None else \
            self.tiled_decode_elements(width, height, tile)
        return self.resident_bytes + batch * elements * self.dtype_bytes

    def phases(self, width: int, height: int, batch: int) -> dict[str, int]:
        """Bytes on the device at the peak of each phase."""
        b = self.dtype_bytes
        step = batch * self.rows_per_image * self.step_elements(width, height) * b
        return {
            "encode": self.resident_bytes + self.lent_bytes + self.encode_elements * b,
            "denoise": self.resident_bytes + step * (2 if self.graph_pool else 1) + self.unpacked_bytes,
            "decode": self._decode_bytes(width, height, batch, self.decode_tile(width, height, batch)),
        }

    def peak_bytes(self, width: int, height: int, batch: int) -> int:
        return int(max(self.phases(width, height, batch).values()) * ALLOCATOR_SLACK)


#: allocator rounding and fragmentation on top of what the tensors themselves need
ALLOCATOR_SLACK = 1.05


def _cfg(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def unet_step_elements(unet_config, width: int, height: int, vae_scale: int = 8) -> int:
    """Live activation elements of one row through a ``UNet2DConditionModel`` step.

    Inference frees each tensor after its last use, so what is alive at the peak is the skip
    connections kept for the up path (the conv_in output, every down resnet's output and every
    downsampler's output) plus the working set of the widest block: in a transformer block the
    normed input, q, k, v, the attention output and the GEGLU feed-forward (8 x the width out of
    its first projection, 4 x after gating); in a resnet the input, its norm, activation and
    conv outputs. Attention scores are not counted: PyTorch's fused attention (flash / memory
    efficient on CUDA, the flash CPU kernel) never materializes them.
    """
    t = (height // vae_scale) * (width // vae_scale)
    chans = list(_cfg(unet_config, "block_out_channels"))
    layers = _cfg(unet_config, "layers_per_block", 2)
    layers = layers if isinstance(layers, (list, tuple)) else [layers] * len(chans)
    kinds = list(_cfg(unet_config, "down_block_types"))
    skips = chans[0] * t  # conv_in
    work = 0
    for i, (c, n, kind) in enumerate(zip(chans, layers, kinds)):
        ti = t // 4**i
        skips += n * c * ti
        if i < len(chans) - 1:
            skips += c * (t // 4 ** (i + 1))
        # up path: the block input is its own width plus the skip it concatenates
        resnet = (2 * c + c) * ti * 2
        attn = (4 + 3 + 1 + 8 + 4) * c * ti if "CrossAttn" in kind else 0
        work = max(work, resnet, attn)
    return skips + work


def flux_step_elements(transformer_config, width: int, height: int, text_tokens: int = 512) -> int:
    """Live activation elements of one row through a FLUX.2 transformer step: sequence
    S = (H/16)(W/16) image tokens + the text tokens; the widest moment is a single-stream block,
    whose fused first projection gives S x (3 x inner + 2 x mlp) (q, k, v and the gated MLP
    input), beside the block input, the attention output, the gated MLP and the residual."""
    inner = _cfg(transformer_config, "num_attention_heads", 24) * _cfg(transformer_config, "attention_head_dim", 128)
    mlp = int(inner * _cfg(transformer_config, "mlp_ratio", 3.0))
    s = (height // 16) * (width // 16) + text_tokens
    return s * (3 * inner + 2 * mlp) + s * (4 * inner + mlp)


#: What a CUDA VAE decode holds beyond its live tensors (the caching allocator's blocks of the
#: up-path's changing sizes and cuDNN's convolution workspaces), in activations of the decoder's
#: full-size level. Measured on an H100 (torch 2.11, cu130; benchmarks/results/h100/memory_estimate):
#: reserved memory minus the modelled decode phase was 15.4 such activations for the SD1.5 VAE at
#: 512² and 12.1 for the SDXL VAE at 1024². Calibrated on those two runs, the lower one taken.
CUDA_DECODE_CACHE = 12


def vae_decode_elements(vae_config, width: int, height: int, cuda: bool = False) -> int:
    """Live activation elements of one image through a KL VAE decoder at full size: the widest
    moment is the first resnet after an upsampler, holding its input, that input normed and
    activated (three tensors of the incoming width) and its first conv's output, at the new
    resolution; the largest such moment over the up blocks (the last, full-size ones dominate).
    The half tensor more of the incoming width is what convolution kernels hold beside their
    output (measured: the SD1.5 VAE's decode peak on a CPU at 256² and 512², within 6%). On CUDA
    (``cuda``) the allocator's cache and cuDNN's workspaces add ``CUDA_DECODE_CACHE`` activations of
    the full-size level."""
    rev = list(reversed(list(_cfg(vae_config, "block_out_channels"))))
    levels = len(rev)
    peak = 0
    for j, c in enumerate(rev):
        res = (height >> (levels - 1 - j)) * (width >> (levels - 1 - j))
        c_in = rev[j - 1] if j else rev[0]
        peak = max(peak, (7 * c_in // 2 + c) * res)
    cache = CUDA_DECODE_CACHE * rev[-1] * height * width if cuda else 0
    return peak + 3 * height * width + cache


#: Output tile sides (pixels) an ``auto`` tiled decode tries, largest first, and the share of a tile
#: that overlaps its neighbour (diffusers' ``tile_overlap_factor`` default; blended linearly).
VAE_TILES = (512, 256)
VAE_TILE_OVERLAP = 0.25


def vae_tiled_decode_elements(vae_config, width: int, height: int, tile: int, cuda: bool = False) -> int:
    """One image through diffusers' ``tiled_decode`` in ``tile`` x ``tile`` output tiles overlapping by
    ``VAE_TILE_OVERLAP``: one tile through the decoder at a time (``vae_decode_elements`` of a tile,
    allocator cache included), while every decoded tile is kept until all are blended (3 channels a
    pixel: the tiles start every ``tile`` x (1 - overlap) pixels, each ``tile`` wide), then the
    blended rows and the image they are joined into (3 x 2 per pixel)."""
    step = int(tile * (1 - VAE_TILE_OVERLAP))
    tiles = math.ceil(height / step) * math.ceil(width / step)
    one = vae_decode_elements(vae_config, min(tile, width), min(tile, height), cuda=cuda)
    return one + 3 * tiles * tile * tile + 6 * height * width


def text_encode_elements(text_config, tokens: int, keeps_hidden_states: bool) -> int:
    """One prompt through a transformer text encoder: the hidden states (every layer's, when the
    family reads several of them, as FLUX.2 does), the MLP's intermediate and attention."""
    hidden = _cfg(text_config, "hidden_size", 768)
    inter = _cfg(text_config, "intermediate_size", 4 * hidden)
    layers = _cfg(text_config, "num_hidden_layers", 12)
    kept = (layers + 1) if keeps_hidden_states else 2
    return tokens * (hidden * kept + 2 * inter + 4 * hidden)


def estimate_memory_bytes(model: MemoryModel, *, width: int, height: int, batch: int) -> int:
    """Peak device bytes of one generation of ``batch`` images at ``width`` x ``height``
    (the largest phase of ``model``, plus allocator slack)."""
    return model.peak_bytes(width, height, batch)


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
