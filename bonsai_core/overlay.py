"""Typography on generated images, drawn with Pillow (diffusion models can't spell).

One call, :func:`draw_text`, lays text out and draws it onto a PIL image: a font (the bundled
DejaVu Sans Bold, Pillow's built-in Aileron, or any TrueType/OpenType file), a fixed pixel size or
the largest size that fits, word wrapping to the width left between the margins, nine anchor
positions (corners, edges, centre), line alignment, an outline, a drop shadow and a translucent
background band. :func:`draw_text_on_batch` does the same for a ``[B, H, W, C]`` float tensor
(ComfyUI's IMAGE layout).

Layout is ours because Pillow draws lines but does not wrap or fit text; every measurement is
Pillow's own (``FreeTypeFont.getlength`` and ``getmetrics``), so what is measured is what is drawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BonsaiRequestError

POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
ALIGNS = ("left", "center", "right")
FONT_DIR = Path(__file__).parent / "fonts"
BUNDLED_FONT = "DejaVuSans-Bold.ttf"  # Bitstream Vera licence (fonts/LICENSE-DejaVu.txt)
PILLOW_FONT = "Aileron (Pillow built-in)"
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
MAX_TEXT_CHARS = 2000  # a caption, a title, a paragraph; a longer text is a mistake, not a label
MIN_SIZE, MAX_SIZE = 6, 1024


@dataclass(frozen=True)
class OverlayStyle:
    """How text is drawn. Colours are anything ``PIL.ImageColor`` reads ("white", "#ff8800",
    "rgb(10,20,30)"); ``size`` 0 means the largest size that fits the box between the margins
    (``fit_height`` of the image's height at most)."""

    font: str = BUNDLED_FONT
    size: int = 0
    color: str = "#ffffff"
    outline_width: int = 2
    outline_color: str = "#000000"
    shadow_offset: int = 0
    shadow_color: str = "#000000"
    band_opacity: float = 0.0  # 0 = no band; 1 = opaque band behind the text, across the image
    band_color: str = "#000000"
    position: str = "bottom"
    margin: int = 16
    align: str = "center"
    wrap: bool = True
    line_spacing: float = 1.15  # line pitch as a multiple of the font's ascent + descent
    fit_height: float = 0.3  # auto size: the text block takes at most this share of the height


def parse_color(value: str, name: str = "colour") -> tuple[int, int, int]:
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(str(value).strip())
    except ValueError:
        raise BonsaiRequestError(
            f"{name} {value!r} is not a colour; use a name (white), #rrggbb or rgb(r, g, b)") from None
    return tuple(rgb[:3])


def font_names(search_dirs: list[str | os.PathLike] = ()) -> list[str]:
    """The fonts offered by name: the bundled one, Pillow's, then font files found in ``search_dirs``."""
    found = []
    for d in search_dirs:
        d = Path(d)
        if d.is_dir():
            found += sorted(p.name for p in d.rglob("*") if p.suffix.lower() in FONT_EXTENSIONS)
    return [BUNDLED_FONT, PILLOW_FONT] + [n for n in dict.fromkeys(found) if n != BUNDLED_FONT]


def resolve_font(font: str, search_dirs: list[str | os.PathLike] = ()) -> Path | None:
    """The file of ``font``: a name from :func:`font_names` or a path. None means Pillow's own."""
    font = (font or BUNDLED_FONT).strip()
    if font == PILLOW_FONT:
        return None
    if font == BUNDLED_FONT:
        return FONT_DIR / BUNDLED_FONT
    path = Path(os.path.expanduser(font))
    if path.is_file():
        return path
    for d in search_dirs:
        hits = [p for p in Path(d).rglob(path.name) if p.is_file()] if Path(d).is_dir() else []
        if hits:
            return hits[0]
    raise BonsaiRequestError(
        f"font {font!r} was not found (not a file, not in {', '.join(map(str, search_dirs)) or 'any fonts folder'}); "
        f"use {BUNDLED_FONT!r}, {PILLOW_FONT!r}, a font file in ComfyUI's models/fonts folder, or a full path")


def load_font(font: str, size: int, search_dirs: list[str | os.PathLike] = ()):
    from PIL import ImageFont

    path = resolve_font(font, search_dirs)
    if path is None:
        return ImageFont.load_default(size)
    try:
        return ImageFont.truetype(str(path), size)
    except OSError as exc:
        raise BonsaiRequestError(f"{path} is not a font file Pillow can read ({exc}); use a .ttf or .otf file") from None


def wrap_lines(text: str, font, max_width: float, wrap: bool = True) -> list[str]:
    """Lines of ``text`` (its own newlines kept); with ``wrap``, words move to the next line when
    a line would be wider than ``max_width`` pixels, and a word wider than that alone is split."""
    lines: list[str] = []
    for para in text.split("\n"):
        if not wrap:
            lines.append(para)
            continue
        line = ""
        for word in para.split():
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= max_width:
                line = trial
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > max_width and len(word) > 1:
                cut = max([1] + [i for i in range(1, len(word)) if font.getlength(word[:i]) <= max_width])
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


@dataclass(frozen=True)
class Layout:
    lines: list[str]
    widths: list[float]
    x: int  # top-left of the text block (before outline/shadow), pixels
    y: int
    width: int
    height: int
    pitch: int  # pixels from one line's top to the next
    size: int


def _block(lines: list[str], font, spacing: float) -> tuple[list[float], int, int, int]:
    ascent, descent = font.getmetrics()
    pitch = max(1, round((ascent + descent) * spacing))
    widths = [font.getlength(line) for line in lines]
    height = pitch * (len(lines) - 1) + ascent + descent
    return widths, int(round(max(widths, default=0))), height, pitch


def layout(text: str, width: int, height: int, style: OverlayStyle, search_dirs=()) -> tuple[Layout, object]:
    """Where each line goes on a ``width`` x ``height`` image, and the font to draw it with."""
    m, pad = style.margin, style.outline_width
    box_w, box_h = width - 2 * m - 2 * pad, height - 2 * m - 2 * pad
    if box_w < 1 or box_h < 1:
        raise BonsaiRequestError(
            f"margin {m} (and outline {pad}) leave no room on a {width}x{height} image; use a margin under "
            f"{max(0, min(width, height) // 2 - pad - 1)}")

    def fit(size: int):
        font = load_font(style.font, size, search_dirs)
        lines = wrap_lines(text, font, box_w, style.wrap)
        widths, bw, bh, pitch = _block(lines, font, style.line_spacing)
        return font, lines, widths, bw, bh, pitch

    if style.size:
        size = int(style.size)
    else:  # the largest size whose block fits the box (wrapping re-done at each size)
        limit_h = max(1, min(box_h, int(height * style.fit_height)))
        lo, hi = MIN_SIZE, max(MIN_SIZE, min(MAX_SIZE, box_h))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            _, _, _, bw, bh, _ = fit(mid)
            if bw <= box_w and bh <= limit_h:
                lo = mid
            else:
                hi = mid - 1
        size = lo
    font, lines, widths, bw, bh, pitch = fit(size)
    vert, horiz = _anchor(style.position)
    x = {"left": m + pad, "center": (width - bw) // 2, "right": width - m - pad - bw}[horiz]
    y = {"top": m + pad, "middle": (height - bh) // 2, "bottom": height - m - pad - bh}[vert]
    return Layout(lines, widths, x, y, bw, bh, pitch, size), font


def _anchor(position: str) -> tuple[str, str]:
    if position not in POSITIONS:
        raise BonsaiRequestError(f"position {position!r} is unknown; use one of {', '.join(POSITIONS)}")
    vert = "top" if position.startswith("top") else "bottom" if position.startswith("bottom") else "middle"
    horiz = "left" if position.endswith("left") else "right" if position.endswith("right") else "center"
    return vert, horiz


def check_style(text: str, style: OverlayStyle) -> None:
    """Refuse what can't be drawn, naming the value and what to use instead."""
    if len(text) > MAX_TEXT_CHARS:
        raise BonsaiRequestError(
            f"the text is {len(text)} characters; an overlay takes at most {MAX_TEXT_CHARS} (a caption or a "
            "title); shorten it")
    if style.align not in ALIGNS:
        raise BonsaiRequestError(f"align {style.align!r} is unknown; use one of {', '.join(ALIGNS)}")
    _anchor(style.position)
    if style.size and not MIN_SIZE <= style.size <= MAX_SIZE:
        raise BonsaiRequestError(f"font size {style.size} is outside {MIN_SIZE}-{MAX_SIZE}; use 0 to fit the image")
    if style.margin < 0 or style.outline_width < 0:
        raise BonsaiRequestError("margin and outline width are pixels and cannot be negative")
    if not 0.0 <= style.band_opacity <= 1.0:
        raise BonsaiRequestError(f"band opacity {style.band_opacity} is outside 0-1")
    if not 0.5 <= style.line_spacing <= 4.0:
        raise BonsaiRequestError(f"line spacing {style.line_spacing} is outside 0.5-4")


def draw_text(image, text: str, style: OverlayStyle = OverlayStyle(), search_dirs=()):
    """``image`` (PIL) with ``text`` drawn on it, as a new RGB image. Empty text: a copy."""
    from PIL import Image, ImageDraw

    check_style(text, style)
    base = image.convert("RGB")
    if not text.strip():
        return base.copy()
    lay, font = layout(text, base.width, base.height, style, search_dirs)
    fill, stroke = parse_color(style.color, "colour"), parse_color(style.outline_color, "outline colour")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if style.band_opacity > 0:
        band = Image.new("RGBA", base.size, (0, 0, 0, 0))
        top = max(0, lay.y - style.margin // 2 - style.outline_width)
        bottom = min(base.height, lay.y + lay.height + style.margin // 2 + style.outline_width)
        alpha = round(255 * style.band_opacity)
        ImageDraw.Draw(band).rectangle([0, top, base.width - 1, bottom - 1],
                                       fill=(*parse_color(style.band_color, "band colour"), alpha))
        base = Image.alpha_composite(base.convert("RGBA"), band).convert("RGB")

    def lines_at(dx: int, dy: int, colour, outline) -> None:
        for i, (line, w) in enumerate(zip(lay.lines, lay.widths)):
            off = {"left": 0, "center": (lay.width - w) / 2, "right": lay.width - w}[style.align]
            draw.text((lay.x + off + dx, lay.y + i * lay.pitch + dy), line, font=font, fill=colour, anchor="la",
                      stroke_width=style.outline_width if outline else 0, stroke_fill=stroke)

    if style.shadow_offset:
        lines_at(style.shadow_offset, style.shadow_offset, (*parse_color(style.shadow_color, "shadow colour"), 160),
                 True)
    lines_at(0, 0, (*fill, 255), True)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def draw_text_on_batch(images, text: str, style: OverlayStyle = OverlayStyle(), search_dirs=()):
    """ComfyUI IMAGE ``[B, H, W, C]`` float in [0, 1] -> the same with the text drawn on every image.

    One line of ``text`` per image when ``text`` has exactly B lines separated by ``---`` on their
    own line (a caption per batch item); otherwise the same text on each."""
    import numpy as np
    import torch
    from PIL import Image

    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise BonsaiRequestError(f"expected images [B, H, W, 3], got shape {list(images.shape)}")
    parts = [p.strip("\n") for p in text.split("\n---\n")]
    texts = parts if len(parts) == images.shape[0] and len(parts) > 1 else [text] * images.shape[0]
    out = []
    for img, t in zip(images, texts):
        arr = (img[..., :3].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        drawn = draw_text(Image.fromarray(arr, "RGB"), t, style, search_dirs)
        out.append(torch.from_numpy(np.asarray(drawn, dtype=np.float32) / 255.0))
    return torch.stack(out)
