"""The scene renderer: pixels agree with the caption, read back with plain measurements.

The truth here is the caption text, parsed by this test with its own rules (not the renderer's
objects), and the colour names' RGB values as the palette states them.
"""

import re

import numpy as np
import pytest
import torch

from bonsai_core import scenes as S

SIZE = 96
ONE = re.compile(r"^(?:an? )?(?:(small|medium|large) )?(\w+) (\w+) on an? (\w+) background(?:, (.+))?$")
TWO = re.compile(r"^(?:an? )?(?:(small|medium|large) )?(\w+) (\w+) (at the|on the|in the) ([\w ]+?) and "
                 r"(?:an? )?(?:(small|medium|large) )?(\w+) (\w+) (at the|on the|in the) ([\w ]+?) "
                 r"on an? (\w+) background$")
# where each named position puts the object's centre: thirds of the image
THIRDS = {"left": 0, "right": 2, "top": 0, "bottom": 2}


def parse(caption):
    """Caption -> (background, [(size, colour, shape, position)]) by this test's own reading."""
    m = ONE.match(caption)
    if m:
        size, colour, shape, bg, pos = m.groups()
        pos = "center" if pos in (None, "in the center") else pos
        return bg, [(size or "medium", colour, shape, pos)]
    m = TWO.match(caption)
    assert m, f"caption not in the expected grammar: {caption!r}"
    g = m.groups()
    return g[10], [(g[0] or "medium", g[1], g[2], g[4]), (g[5] or "medium", g[6], g[7], g[9])]


def expected_cell(position):
    col, row = 1, 1
    for word in position.split():
        if word in ("left", "right"):
            col = THIRDS[word]
        elif word in ("top", "bottom"):
            row = THIRDS[word]
    return col, row


def rgb(name):
    return np.array(S.PALETTE[name])


def image(scene, size=SIZE):
    return np.asarray(S.render(scene, size)).astype(int)


def mask_of(img, name, tol=6):
    return (np.abs(img - rgb(name)).max(axis=-1) <= tol)


def test_one_object_scene_matches_its_caption():
    checked = 0
    for i in range(60):
        s = S.scene(3, i, two_objects=0.0)
        bg, [(size, colour, shape, position)] = parse(s.caption)
        img = image(s)
        assert (img[0, 0] == rgb(bg)).all() and (img[-1, -1] == rgb(bg)).all(), s.caption   # corner
        obj = mask_of(img, colour)
        assert obj.sum() > 20, s.caption
        ys, xs = np.nonzero(obj)
        cx, cy = xs.mean() / SIZE, ys.mean() / SIZE
        assert (int(cx * 3), int(cy * 3)) == expected_cell(position), (s.caption, cx, cy)
        checked += 1
    assert checked == 60


def test_colour_at_the_centre_of_a_filled_shape_and_background_in_a_rings_hole():
    for i in range(80):
        s = S.scene(5, i, two_objects=0.0)
        bg, [(_, colour, shape, _)] = parse(s.caption)
        o = s.objects[0]
        img = image(s)
        centre = img[int(o.cy * SIZE), int(o.cx * SIZE)]
        if shape == "ring":
            assert (centre == rgb(bg)).all(), s.caption        # a ring has a hole
            r = int(o.cy * SIZE), int((o.cx + 0.75 * o.r) * SIZE)
            assert (img[r] == rgb(colour)).all(), s.caption    # ...inside its band
        else:
            assert (centre == rgb(colour)).all(), s.caption


def _fill_ratio(shape, size_word="large"):
    o = S.SceneObject(shape, "red", size_word, "center", 0.5, 0.5, S.SIZES[size_word])
    img = image(S.Scene((o,), "white", ""), 256)
    m = mask_of(img, "red", tol=40)
    ys, xs = np.nonzero(m)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return m.sum() / box, m.sum()


def test_shapes_fill_their_bounding_box_as_their_geometry_says():
    assert _fill_ratio("square")[0] == pytest.approx(1.0, abs=0.03)
    assert _fill_ratio("circle")[0] == pytest.approx(np.pi / 4, abs=0.03)
    assert _fill_ratio("triangle")[0] == pytest.approx(0.5, abs=0.04)
    assert _fill_ratio("diamond")[0] == pytest.approx(0.5, abs=0.04)
    star = _fill_ratio("star")[0]
    assert 0.25 < star < 0.45  # a five-point star covers well under half its box


def test_sizes_grow_small_to_large():
    areas = [_fill_ratio("circle", s)[1] for s in ("small", "medium", "large")]
    assert areas[0] < areas[1] < areas[2]


def test_two_object_scene_has_both_colours_in_their_cells():
    found = 0
    for i in range(200):
        s = S.scene(7, i, two_objects=1.0)
        bg, objs = parse(s.caption)
        assert len(objs) == 2
        img = image(s)
        for size, colour, shape, position in objs:
            if sum(o.colour == colour for o in s.objects) > 1:
                continue  # the same colour twice: centroids would mix
            ys, xs = np.nonzero(mask_of(img, colour))
            assert len(xs) > 10, s.caption
            assert (int(xs.mean() / SIZE * 3), int(ys.mean() / SIZE * 3)) == expected_cell(position), s.caption
            found += 1
        if found > 40:
            break
    assert found > 40


def test_same_numbers_same_scene_and_pixels_other_numbers_differ():
    a, b, c = S.scene(11, 4), S.scene(11, 4), S.scene(11, 5)
    assert a == b and a != c
    assert torch.equal(S.render_batch([a, c], 64), S.render_batch([b, c], 64))


def test_training_never_shows_a_held_out_combination_and_evaluation_shows_only_those():
    seen = set()
    for i in range(1500):
        s = S.scene(0, i)
        bg, objs = parse(s.caption)
        for size, colour, shape, position in objs:
            assert not S.is_held_out(shape, colour, bg, position), s.caption
            seen.add((shape, colour, bg, position))
    prompts = S.held_out_prompts(200)
    assert len({p.caption for p in prompts}) > 150
    singles = {(a, b) for t in seen for a, b in [(t[0], t[1]), (t[1], t[2]), (t[0], t[3])]}
    for p in prompts:
        bg, [(size, colour, shape, position)] = parse(p.caption)
        assert S.is_held_out(shape, colour, bg, position)
        assert (shape, colour, bg, position) not in seen
        assert "," in p.caption or "in the center" in p.caption  # everything said
        # every attribute pair of a held-out prompt was seen in training
        assert {(shape, colour), (colour, bg), (shape, position)} <= singles
    total = len(S.SHAPES) * len(S.POSITIONS) * sum(c != b for c in S.COLOURS for b in S.BACKGROUNDS)
    held = sum(S.is_held_out(s, c, b, p) for s in S.SHAPES for c in S.COLOURS for b in S.BACKGROUNDS
               for p in S.POSITIONS if c != b)
    assert 0.07 < held / total < 0.13


def test_captions_leave_out_only_defaults_and_use_only_the_vocabulary():
    words = set(S.caption_words())
    sizes_said, centre_said = set(), set()
    for i in range(400):
        s = S.scene(2, i)
        assert set(s.caption.replace(",", " ,").split()) <= words, s.caption
        bg, objs = parse(s.caption)
        for (size, colour, shape, position), o in zip(objs, s.objects):
            assert (size, colour, shape, position) == (o.size, o.colour, o.shape, o.position), s.caption
            if o.size == "medium":
                sizes_said.add("medium" in s.caption)
            if o.position == "center" and len(objs) == 1:
                centre_said.add("center" in s.caption)
    assert sizes_said == {True, False} and centre_said == {True, False}
