"""bonsai_core.overlay: text lands where the position and margin say (measured on the pixels),
wraps inside the margins, auto-fits, and each effect (outline, shadow, band) shows on the image."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from bonsai_core.errors import BonsaiRequestError
from bonsai_core.overlay import (
    BUNDLED_FONT, FONT_DIR, PILLOW_FONT, OverlayStyle, draw_text, draw_text_on_batch, font_names, wrap_lines,
)

W, H = 320, 200
PLAIN = dict(outline_width=0, color="#ffffff")


def black():
    return Image.new("RGB", (W, H), (0, 0, 0))


def reference(text, font, x, y):
    """Pillow alone drawing ``text`` with its layout box's top-left at (x, y)."""
    img = black()
    ImageDraw.Draw(img).text((x, y), text, font=font, fill=(255, 255, 255), anchor="la")
    return img


def ink_box(img, channel=None):
    """Bounding box (left, top, right, bottom) of the non-black pixels, right/bottom exclusive."""
    a = np.asarray(img).astype(int)
    mask = a.sum(-1) > 0 if channel is None else a[..., channel] > 100
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("position", ["top-left", "top-right", "bottom-left", "bottom-right", "center"])
def test_text_sits_at_its_position_inside_the_margin(position):
    font = ImageFont.truetype(str(FONT_DIR / BUNDLED_FONT), 24)
    ascent, descent = font.getmetrics()
    width = font.getlength("Hello")
    m = 20
    x0 = {"left": m, "right": W - m - round(width), "center": (W - round(width)) // 2}[
        position.split("-")[-1] if "-" in position else "center"]
    y0 = {"top": m, "bottom": H - m - (ascent + descent), "center": (H - (ascent + descent)) // 2}[
        position.split("-")[0] if "-" in position else "center"]
    img = draw_text(black(), "Hello", OverlayStyle(size=24, position=position, margin=m, **PLAIN))
    got = ink_box(img)
    want = ink_box(reference("Hello", font, x0, y0))
    assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)
    assert got[0] >= m and got[1] >= m and got[2] <= W - m and got[3] <= H - m


def test_long_text_wraps_within_the_margins_and_keeps_every_word():
    text = "a bonsai tree on a rocky ledge above the clouds at dawn with golden light"
    m = 30
    img = draw_text(black(), text, OverlayStyle(size=20, position="top", margin=m, **PLAIN))
    left, top, right, bottom = ink_box(img)
    assert left >= m and right <= W - m
    font = ImageFont.truetype(str(FONT_DIR / BUNDLED_FONT), 20)
    lines = wrap_lines(text, font, W - 2 * m)
    assert len(lines) >= 3 and " ".join(lines) == text
    assert all(font.getlength(line) <= W - 2 * m for line in lines)
    # the ink is as tall as that many lines (ascent+descent at 1.15 pitch), not one
    ascent, descent = font.getmetrics()
    assert bottom - top > (len(lines) - 1) * round((ascent + descent) * 1.15)
    unwrapped = draw_text(black(), text, OverlayStyle(size=20, position="top", margin=m, wrap=False, **PLAIN))
    assert ink_box(unwrapped)[3] - ink_box(unwrapped)[1] < 2 * (ascent + descent)


def test_a_word_wider_than_the_line_is_split():
    font = ImageFont.truetype(str(FONT_DIR / BUNDLED_FONT), 20)
    lines = wrap_lines("x" * 60, font, 100)
    assert "".join(lines) == "x" * 60 and all(font.getlength(line) <= 100 for line in lines)


def test_auto_size_is_the_largest_that_fits():
    m = 10
    img = draw_text(black(), "BONSAI", OverlayStyle(size=0, position="center", margin=m, wrap=False,
                                                   fit_height=1.0, **PLAIN))
    left, _, right, _ = ink_box(img)
    # find by hand the largest size whose advance width fits W - 2m
    fits = [s for s in range(6, 200) if ImageFont.truetype(str(FONT_DIR / BUNDLED_FONT), s).getlength("BONSAI")
            <= W - 2 * m]
    best = ImageFont.truetype(str(FONT_DIR / BUNDLED_FONT), max(fits))
    a, d = best.getmetrics()
    want = ink_box(reference("BONSAI", best, (W - round(best.getlength("BONSAI"))) // 2, (H - a - d) // 2))
    assert all(abs(g - w) <= 1 for g, w in zip(ink_box(img), want)), (ink_box(img), want)
    assert left >= m and right <= W - m


def test_outline_shadow_and_band_each_leave_their_colour():
    base = dict(size=32, position="center", margin=10, color="#ff0000")
    outlined = np.asarray(draw_text(black(), "Hi", OverlayStyle(outline_width=3, outline_color="#00ff00", **base)))
    assert ((outlined[..., 1] > 200) & (outlined[..., 0] < 50)).sum() > 50  # green ring
    shadowed = np.asarray(draw_text(black(), "Hi", OverlayStyle(outline_width=0, shadow_offset=4,
                                                               shadow_color="#0000ff", **base)))
    blue = (shadowed[..., 2] > 80) & (shadowed[..., 0] < 50)
    red = shadowed[..., 0] > 200
    assert blue.sum() > 50
    assert np.nonzero(blue)[1].max() > np.nonzero(red)[1].max()  # the shadow reaches further right
    grey = np.full((H, W, 3), 200, np.uint8)
    band = np.asarray(draw_text(Image.fromarray(grey), "Hi", OverlayStyle(outline_width=0, band_opacity=0.5,
                                                                          band_color="#000000", **base)))
    # half-opaque black over 200 grey is 100 (Pillow's alpha 128/255 -> 99.6); the band spans the width
    assert abs(int(band[H // 2, 2, 1]) - 100) <= 1 and abs(int(band[H // 2, W - 3, 1]) - 100) <= 1
    assert band[2, 2, 1] == 200  # outside the band: untouched


def test_batch_tensor_keeps_layout_and_takes_one_caption_per_image():
    images = torch.zeros(2, 64, 96, 3)
    out = draw_text_on_batch(images, "one\n---\ntwo", OverlayStyle(size=16, **PLAIN))
    assert out.shape == (2, 64, 96, 3) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out[0], out[1])
    same = draw_text_on_batch(images, "same", OverlayStyle(size=16, **PLAIN))
    assert torch.equal(same[0], same[1]) and same.max() == 1.0


def test_fonts_from_a_folder_are_offered_and_pillows_default_works(tmp_path):
    (tmp_path / "Mine.ttf").write_bytes((FONT_DIR / BUNDLED_FONT).read_bytes())
    names = font_names([tmp_path])
    assert names[:2] == [BUNDLED_FONT, PILLOW_FONT] and "Mine.ttf" in names
    assert ink_box(draw_text(black(), "Hi", OverlayStyle(font="Mine.ttf", size=20, **PLAIN), [tmp_path]))
    assert ink_box(draw_text(black(), "Hi", OverlayStyle(font=PILLOW_FONT, size=20, **PLAIN)))


@pytest.mark.parametrize("change,needle", [
    (dict(font="nope.ttf"), "nope.ttf"), (dict(color="notacolour"), "notacolour"),
    (dict(position="middle-ish"), "middle-ish"), (dict(margin=160), "margin 160"), (dict(size=5000), "5000"),
])
def test_bad_styles_are_refused_naming_the_value(change, needle):
    with pytest.raises(BonsaiRequestError, match=needle):
        draw_text(black(), "Hi", OverlayStyle(**change))


def test_a_100k_character_text_is_refused_quickly():
    with pytest.raises(BonsaiRequestError, match="100000 characters"):
        draw_text(black(), "x" * 100_000)
