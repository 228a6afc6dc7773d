"""What the engine gives a host application (ComfyUI's nodes): a free-memory call before loading,
stage events around encode and decode, and latent->RGB previews fitted from the family's VAE."""

import os
from pathlib import Path

import pytest
import torch

from bonsai_core.config import FAMILY_DEFAULTS
from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import STAGES, BonsaiImageEngine, load_engine, unload_current
from bonsai_core.families.base import Family
from tests.sd_fixtures import make_tiny_sd_pipeline

SMALL = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    src = make_tiny_sd_pipeline(root / "fp")
    convert_pipeline(src, root / "tiny-bonsai", log=lambda m: None)
    return root / "tiny-bonsai"


@pytest.fixture(scope="module")
def eng(model):
    return BonsaiImageEngine.from_pretrained(model, device="cpu")


def test_free_memory_is_asked_for_the_weight_files_size_before_loading(model):
    on_disk = 0
    for dirpath, _, files in os.walk(model):
        on_disk += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if f.endswith(".safetensors"))
    calls = []
    unload_current()
    try:
        first = load_engine(model, device="cpu")
        # the previous model is gone before the new one is asked room for
        load_engine(model, device="cpu", dtype="fp32",
                    free_memory=lambda n, dev: calls.append((n, dev.type, first.family is None)))
    finally:
        unload_current()
    assert calls == [(on_disk, "cpu", True)]


def test_stages_bracket_the_steps_in_order(eng):
    events = []
    eng.generate("a cat", seed=1, callback=lambda i, n, x0: events.append(f"step {i}/{n}"),
                 on_stage=events.append, **SMALL)
    assert events == ["encode", "sample", "step 1/3", "step 2/3", "step 3/3", "decode", "done"]
    assert STAGES == ("encode", "sample", "decode", "done")


def test_an_exception_from_on_stage_stops_the_run_untouched(eng):
    class Stop(Exception):
        pass

    steps = []

    def stage(name):
        if name == "decode":
            raise Stop(name)

    with pytest.raises(Stop):
        eng.generate("a cat", seed=1, callback=lambda i, n, x0: steps.append(i), on_stage=stage, **SMALL)
    assert steps == [1, 2, 3]


class LinearFamily(Family):
    """A family whose 'VAE' is exactly linear: each latent pixel becomes a flat 8x8 patch of
    colour W^T z + b. The fitted map must come back as W and b."""

    name = "linear"
    defaults = FAMILY_DEFAULTS["sd_unet"]
    W = torch.tensor([[0.30, 0.20, -0.10], [0.05, -0.25, 0.40], [-0.20, 0.10, 0.15], [0.10, 0.30, -0.05]])
    b = torch.tensor([0.5, 0.45, 0.55])

    def __init__(self):
        super().__init__(Path("."), {}, torch.device("cpu"), torch.float32)
        self.decodes = 0

    def latent_shape(self, width, height):
        return (4, height // 8, width // 8)

    def decode(self, latents, width, height):
        self.decodes += 1
        rgb = torch.einsum("bchw,cr->brhw", latents, self.W) + self.b.view(1, 3, 1, 1)
        return rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def test_latent_rgb_fit_recovers_a_linear_decoder_and_is_fitted_once():
    fam = LinearFamily()
    factors, bias = fam.latent_rgb()
    torch.testing.assert_close(factors, LinearFamily.W, atol=1e-5, rtol=0)
    torch.testing.assert_close(bias, LinearFamily.b, atol=1e-5, rtol=0)
    # one latent pixel (1, -1, 0, 2): colour worked by hand from W and b, clamped to [0, 1]
    x0 = torch.tensor([1.0, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)
    # r = 0.5 + 0.30 - 0.05 + 0 + 0.20 = 0.95; g = 0.45 + 0.20 + 0.25 + 0 + 0.60 = 1.50 -> 1;
    # b = 0.55 - 0.10 - 0.40 + 0 - 0.10 = -0.05 -> 0
    got = fam.preview(x0)
    assert got.shape == (1, 1, 1, 3)
    torch.testing.assert_close(got.flatten(), torch.tensor([0.95, 1.0, 0.0]), atol=1e-5, rtol=0)
    fam.preview(x0)
    assert fam.decodes == 1


def test_engine_preview_is_a_pil_image_scaled_to_the_image_size(eng):
    seen = []
    eng.generate("a cat", seed=1, callback=lambda i, n, x0: seen.append(x0), **SMALL)
    images = eng.preview(seen[-1])
    assert len(images) == 1 and images[0].size == (64, 64) and images[0].mode == "RGB"
    assert eng.preview(torch.zeros(2, 4, 8, 8), max_side=32)[1].size == (32, 32)


def test_a_100k_character_prompt_is_refused_before_tokenizing(eng):
    from bonsai_core.errors import BonsaiRequestError

    with pytest.raises(BonsaiRequestError, match="100000 characters"):
        eng.generate("a " * 50_000, seed=1, **SMALL)


def test_find_models_lists_model_folders_and_loose_files_only(tmp_path):
    from bonsai_core.hub import find_models

    for name in ("tiny", "family/other"):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text("{}")
        (tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (tmp_path / "klein-q1_0.gguf").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert find_models([tmp_path, tmp_path / "missing"]) == ["family/other", "tiny", "klein-q1_0.gguf"]


def test_the_memory_guardrail_uses_the_hosts_count_when_given(eng):
    from bonsai_core.errors import BonsaiMemoryError

    asked = []
    eng.available_memory = lambda dev: asked.append(dev.type) or 2**20  # the host says: 1 MiB free
    try:
        # 1 MiB from the host, plus the tiny model's own weights (the estimate counts them too)
        with pytest.raises(BonsaiMemoryError, match=r"0\.0\d GiB is available"):
            eng.check("a cat", width=64, height=64, mode="refuse")
        assert asked == ["cpu"]
        eng.available_memory = lambda dev: 2**40
        assert eng.check("a cat", width=64, height=64, mode="refuse").warnings == []
    finally:
        eng.available_memory = None
