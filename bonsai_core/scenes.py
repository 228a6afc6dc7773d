"""Procedural scenes with plain-English captions: the training data of the shipped model.

A scene is one or two flat-coloured shapes on a flat background ("a small red star on a blue
background, top left"). Everything is deterministic from ``(seed, index)``, and unlimited. Part of
the package (not of ``training/``) because ``bonsai distill`` can draw its prompts from it.

Vocabulary: ``SHAPES`` x ``COLOURS`` (objects) x ``BACKGROUNDS`` x ``SIZES`` x ``POSITIONS`` (a 3x3
grid). A caption leaves out what is the default: no size word means medium, no position words mean
the centre (so "a red circle on a white background" is a medium red circle in the middle).

Held out: a fixed tenth of the (shape, colour, background, position) combinations never appears
in a training scene (``is_held_out``); every single attribute and every pair of attributes still
does. ``held_out_prompts(n)`` gives evaluation scenes drawn only from those combinations.

Rendering: each shape is a signed distance in image units, turned into an anti-aliased coverage
(one pixel of smooth edge) and composited over the background. It is written in torch, batched,
so the same code renders on the CPU for ``render`` and on the GPU during training (``render_batch``
on a CUDA device: no data loader, no stall); on the CPU the pixels are exactly reproducible.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "stripes", "diamond")

# sRGB 0..255. Object colours and background colours; an object never has its background's colour.
PALETTE = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 215, 30),
    "orange": (245, 135, 20), "purple": (135, 50, 180), "white": (245, 245, 245), "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
BACKGROUNDS = COLOURS + ("gray",)

# half-extent of a shape as a fraction of the image side
SIZES = {"small": 0.09, "medium": 0.14, "large": 0.19}

# grid cell -> (x, y) centre as fractions of the side (y down), and the caption words
_GRID = (0.27, 0.5, 0.73)
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
_POSITION_PHRASE = {  # how a two-object caption says where each object is
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}

HELD_OUT_FRACTION = 0.1
JITTER = 0.03  # centre jitter (fraction of the side) and +-10 % size jitter: scenes are not all alike


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    cx: float  # centre, fraction of the side, x to the right
    cy: float  # y downwards
    r: float   # half-extent, fraction of the side


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    caption: str


def combination(shape: str, colour: str, background: str, position: str) -> tuple[str, str, str, str]:
    return (shape, colour, background, position)


def is_held_out(shape: str, colour: str, background: str, position: str) -> bool:
    """True for the fixed tenth of (shape, colour, background, position) kept out of training.
    A hash of the words, so it does not depend on the order of the tuples above."""
    key = "|".join(combination(shape, colour, background, position)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") / 2**32 < HELD_OUT_FRACTION


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: SceneObject, say_size: bool) -> str:
    words = f"{obj.size + ' ' if say_size else ''}{obj.colour} {obj.shape}"
    if obj.shape == "stripes":  # a plural: no article
        return words
    return f"{_a(words)} {words}"


def caption_of(objects: tuple[SceneObject, ...], background: str, rng: np.random.Generator | None = None) -> str:
    """The caption. With ``rng``, a medium size and a centre position are said only sometimes
    (the model learns that no word means the default); without, everything is said."""
    def say(default: bool) -> bool:
        return not default or rng is None or bool(rng.random() < 0.5)

    if len(objects) == 1:
        (o,) = objects
        text = f"{_object_phrase(o, say(o.size == 'medium'))} on {_a(background)} {background} background"
        if say(o.position == "center"):
            text += ", in the center" if o.position == "center" else f", {o.position}"
        return text
    parts = [f"{_object_phrase(o, say(o.size == 'medium'))} {_POSITION_PHRASE[o.position]}" for o in objects]
    return f"{parts[0]} and {parts[1]} on {_a(background)} {background} background"


def _place(rng: np.random.Generator, shape: str, colour: str, size: str, position: str) -> SceneObject:
    gx, gy = POSITIONS[position]
    cx = _GRID[gx] + rng.uniform(-JITTER, JITTER)
    cy = _GRID[gy] + rng.uniform(-JITTER, JITTER)
    r = SIZES[size] * rng.uniform(0.9, 1.1)
    return SceneObject(shape, colour, size, position, float(cx), float(cy), float(r))


def _far_apart(a: str, b: str) -> bool:
    """Two grid cells two apart on some axis: their objects (any size) never overlap."""
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    return max(abs(ax - bx), abs(ay - by)) == 2


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, split: str = "train", two_objects: float = 0.25) -> Scene:
    """One random scene of ``split`` ("train": no held-out combination in it; "held_out": one object,
    a held-out combination; "any")."""
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"split must be 'train', 'held_out' or 'any', not {split!r}")
    n = 2 if split != "held_out" and rng.random() < two_objects else 1
    while True:
        background = _pick(rng, BACKGROUNDS)
        # two objects: the first is never in the centre (no cell is two away from it)
        positions = [_pick(rng, tuple(p for p in POSITIONS if n == 1 or p != "center"))]
        if n == 2:
            positions.append(_pick(rng, tuple(p for p in POSITIONS if _far_apart(p, positions[0]))))
        objs = []
        for pos in positions:
            shape = _pick(rng, SHAPES)
            colour = _pick(rng, tuple(c for c in COLOURS if c != background))
            size = _pick(rng, tuple(SIZES))
            objs.append(_place(rng, shape, colour, size, pos))
        held = [is_held_out(o.shape, o.colour, background, o.position) for o in objs]
        if (split == "train" and not any(held)) or (split == "held_out" and all(held)) or split == "any":
            break
    objs = tuple(objs)
    return Scene(objs, background, caption_of(objs, background, rng))


def scene(seed: int, index: int, split: str = "train", two_objects: float = 0.25) -> Scene:
    """Scene number ``index`` of stream ``seed``: the same numbers give the same scene, always."""
    tag = {"train": 0, "held_out": 1, "any": 2}[split]
    return sample_scene(np.random.default_rng([int(seed), tag, int(index)]), split, two_objects)


def scenes(seed: int, count: int, split: str = "train", start: int = 0, two_objects: float = 0.25) -> list[Scene]:
    return [scene(seed, i, split, two_objects) for i in range(start, start + count)]


def held_out_prompts(count: int = 200, seed: int = 1234) -> list[Scene]:
    """``count`` one-object evaluation scenes, every one a held-out combination, everything said
    (size and position words included)."""
    out = []
    for i in range(count):
        s = scene(seed, i, "held_out")
        out.append(Scene(s.objects, s.background, caption_of(s.objects, s.background)))
    return out


def caption_words() -> list[str]:
    """Every word a caption can contain (what the shipped tokenizer's vocabulary is built from)."""
    words = {"a", "an", "on", "background", "and", "in", "the", "at", ","}
    words |= set(SHAPES) | set(BACKGROUNDS) | set(SIZES)
    for phrase in list(POSITIONS) + list(_POSITION_PHRASE.values()):
        words |= set(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------------------------- rendering
def _box(px, py, hx, hy):
    qx, qy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _polygon(px, py, verts):
    """Signed distance to a closed polygon (any simple polygon): the distance to the nearest edge,
    negative inside (inside by the even-odd crossing rule)."""
    dist = None
    inside = torch.zeros_like(px, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        d = torch.sqrt((wx - t * ex) ** 2 + (wy - t * ey) ** 2)
        dist = d if dist is None else torch.minimum(dist, d)
        crosses = ((ay > py) != (by > py)) & (px < (bx - ax) * (py - ay) / (by - ay + 1e-30) + ax)
        inside ^= crosses
    return torch.where(inside, -dist, dist)


def _regular(n: int, radius: float, start_deg: float = 90.0, inner: float | None = None):
    """Vertices of a regular polygon (or, with ``inner``, a star of ``n`` points), y down."""
    pts = []
    k = 2 * n if inner is not None else n
    for i in range(k):
        a = math.radians(start_deg) + 2 * math.pi * i / k
        rr = radius if inner is None or i % 2 == 0 else inner
        pts.append((rr * math.cos(a), -rr * math.sin(a)))
    return pts


def _shape_distance(shape: str, px, py, r):
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":
        return _box(px, py, 0.9 * r, 0.9 * r)
    if shape == "diamond":
        return (px.abs() + py.abs() - 1.2 * r) * 0.7071
    if shape == "triangle":  # pointing up, centred on its centroid
        return _polygon(px, py, _regular(3, 1.25 * r))
    if shape == "star":      # five points, one straight up
        return _polygon(px, py, _regular(5, 1.2 * r, inner=0.5 * r))
    if shape == "ring":
        return (torch.sqrt(px * px + py * py) - 0.75 * r).abs() - 0.25 * r
    if shape == "cross":
        return torch.minimum(_box(px, py, r, 0.3 * r), _box(px, py, 0.3 * r, r))
    if shape == "stripes":  # three vertical bars filling a square
        bars = [_box(px - k * 0.7 * r, py, 0.2 * r, r) for k in (-1, 0, 1)]
        return torch.minimum(torch.minimum(bars[0], bars[1]), bars[2])
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _rgb(name: str, device, dtype) -> torch.Tensor:
    return torch.tensor(PALETTE[name], dtype=dtype, device=device).view(3, 1, 1) / 255


def render_batch(batch: list[Scene], size: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scenes -> images ``[B, 3, size, size]`` in ``[0, 1]`` on ``device``."""
    device = torch.device(device)
    coords = (torch.arange(size, device=device, dtype=dtype) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(len(batch), 3, size, size, device=device, dtype=dtype)
    for i, s in enumerate(batch):
        img = _rgb(s.background, device, dtype).expand(3, size, size).clone()
        for o in s.objects:
            d = _shape_distance(o.shape, xx - o.cx, yy - o.cy, o.r)
            alpha = (0.5 - d * size).clamp(0, 1)    # one pixel of anti-aliased edge
            img = torch.lerp(img, _rgb(o.colour, device, dtype).expand_as(img), alpha)
        out[i] = img
    return out


def render(s: Scene, size: int = 512):
    """One scene as a PIL RGB image."""
    from PIL import Image

    arr = (render_batch([s], size)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> uint8 ``[B, H, W, 3]``."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
