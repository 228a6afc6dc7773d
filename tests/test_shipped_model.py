"""End to end on the CPU with the shipped model (issue 19): what a prompt asks for is what a plain
colour / position measurement finds in the image, at a small step count; seeds reproduce; the
folder fits the package budget. Skipped while the package carries no model (bonsai_core/shipped.py).
"""

import numpy as np
import pytest

from bonsai_core import scenes as S
from bonsai_core.shipped import shipped_model

MODEL = shipped_model()
needs_model = pytest.mark.skipif(MODEL is None, reason="no shipped model in this checkout (bonsai_core/assets/)")
STEPS = 8


@pytest.fixture(scope="module")
def eng():
    from bonsai_core.engine import BonsaiImageEngine

    return BonsaiImageEngine.from_pretrained(MODEL, device="cpu")


def _near(img, name, tol=60):
    return np.abs(img.astype(int) - np.array(S.PALETTE[name])).max(axis=-1) <= tol


CASES = [
    ("a large red circle on a white background", "red", "white", (1, 1)),
    ("a large blue square on a yellow background, top left", "blue", "yellow", (0, 0)),
    ("a large green star on a black background, bottom right", "green", "black", (2, 2)),
]
POSITION_OF = {(1, 1): "center", (0, 0): "top left", (2, 2): "bottom right"}


def check_colours(img, prompt, colour, background):
    h, w, _ = img.shape
    corners = [img[:h // 10, :w // 10], img[:h // 10, -w // 10:], img[-h // 10:, :w // 10], img[-h // 10:, -w // 10:]]
    assert np.mean([_near(c, background).mean() for c in corners]) > 0.8, prompt
    obj = _near(img, colour)
    assert obj.mean() > 0.01, prompt
    return obj


def check_position(img, prompt, colour, cell):
    h, w, _ = img.shape
    ys, xs = np.nonzero(_near(img, colour))
    assert len(xs), prompt
    assert (int(xs.mean() / w * 3), int(ys.mean() / h * 3)) == cell, prompt


def check(img, prompt, colour, background, cell):
    check_colours(img, prompt, colour, background)
    check_position(img, prompt, colour, cell)


@pytest.mark.parametrize("prompt,colour,background,cell", CASES)
def test_the_measurement_reads_a_rendered_scene_right(prompt, colour, background, cell):
    shape = prompt.split()[3].rstrip(",")
    o = S.SceneObject(shape, colour, "large", POSITION_OF[cell], 0.27 + 0.23 * cell[0], 0.27 + 0.23 * cell[1],
                      S.SIZES["large"])
    check(np.asarray(S.render(S.Scene((o,), background, prompt), 128)), prompt, colour, background, cell)
    with pytest.raises(AssertionError):  # and it is not fooled by the wrong background
        check(np.asarray(S.render(S.Scene((o,), "gray", prompt), 128)), prompt, colour, background, cell)


@pytest.fixture(scope="module")
def images(eng):
    return {p: np.asarray(eng.generate(p, seed=3, steps=STEPS).images[0]) for p, *_ in CASES}


@needs_model
@pytest.mark.parametrize("prompt,colour,background,cell", CASES)
def test_the_image_has_the_object_and_background_colours_the_prompt_names(images, prompt, colour, background, cell):
    check_colours(images[prompt], prompt, colour, background)


# The shipped model has not learned position yet: 10.5 % held-out position accuracy (chance is 1 in 9),
# its teacher 12 % (MODEL_CARD.md; issue 19 stays open for a longer-trained teacher). Strict: the day a
# model that places objects ships, this turns red until the mark goes.
@needs_model
@pytest.mark.xfail(strict=True, reason="the shipped model does not place objects where the prompt says yet")
@pytest.mark.parametrize("prompt,colour,background,cell", CASES)
def test_the_object_is_where_the_prompt_puts_it(images, prompt, colour, background, cell):
    check_position(images[prompt], prompt, colour, cell)


@needs_model
def test_same_seed_same_pixels(eng):
    a = eng.generate("a small orange ring on a purple background", seed=11, steps=2)
    b = eng.generate("a small orange ring on a purple background", seed=11, steps=2)
    assert (np.asarray(a.images[0]) == np.asarray(b.images[0])).all()


@needs_model
def test_the_shipped_folder_fits_the_package_budget():
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 10**6
    assert (MODEL / "MODEL_CARD.md").is_file()
