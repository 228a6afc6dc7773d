"""The VAE decode in tiles (``BONSAI_VAE_TILE``, ``MemoryModel.decode_tile``) when the whole decode
would not fit the memory budget.

(a) the tile the memory model chooses for a FLUX.2-VAE-shaped config and a budget, counted by hand;
(b) a tiled decode through each family equals diffusers' own tiled decode (FLUX.2 klein: the whole
    ``Flux2KleinPipeline`` with ``vae.enable_tiling()``; SD: ``AutoencoderKL.tiled_decode``) with the
    same tile settings, and differs from the whole decode by a bounded amount;
(c) with a budget only the tiled decode fits, the run is not refused and its metadata says tiled;
    with a roomy budget the pixels are those of the untiled decode, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.errors import BonsaiMemoryError, BonsaiRequestError
from bonsai_core.families.base import VAE_TILE_ENV
from bonsai_core.guardrails import ALLOCATOR_SLACK, MemoryModel, vae_decode_elements, vae_tiled_decode_elements
from tests.klein_fixtures import OUT_LAYERS, build_pipeline, klein_ground_truth, make_full_pipeline
from tests.sd_fixtures import make_tiny_sd_pipeline

GIB = 2**30
FLUX2_VAE = {"block_out_channels": [128, 256, 512, 512]}


# ---------------------------------------------------------------------------------------------
# (a) the tile choice, by hand
# ---------------------------------------------------------------------------------------------
def test_decode_elements_of_the_flux2_vae_counted_by_hand():
    # whole 1024²: the last up block's first resnet at 1024², input 256 channels, output 128:
    # (7 * 256 / 2 + 128) * 1024² = 1024 * 2^20, plus the 3-channel image
    assert vae_decode_elements(FLUX2_VAE, 1024, 1024) == 2**30 + 3 * 2**20
    # 512² tiles, 1/4 overlap: a tile every 384 px, 3 x 3 tiles of 512² x 3 channels kept, one tile through
    # the decoder (1024 * 512² + 3 * 512²), the blended rows and the image (6 * 1024²)
    assert vae_tiled_decode_elements(FLUX2_VAE, 1024, 1024, 512) == \
        1024 * 2**18 + 3 * 2**18 + 3 * 9 * 2**18 + 6 * 2**20 == 282_591_232
    # 256² tiles: every 192 px, 6 x 6 tiles
    assert vae_tiled_decode_elements(FLUX2_VAE, 1024, 1024, 256) == \
        1024 * 2**16 + 3 * 2**16 + 3 * 36 * 2**16 + 6 * 2**20 == 80_674_816


def flux2_model(budget: int | None, vae_tile="auto") -> MemoryModel:
    return MemoryModel(resident_bytes=GIB, dtype_bytes=2, step_elements=lambda w, h: 0,
                       decode_elements=lambda w, h: vae_decode_elements(FLUX2_VAE, w, h),
                       tiled_decode_elements=lambda w, h, t: vae_tiled_decode_elements(FLUX2_VAE, w, h, t),
                       decode_budget_bytes=budget, vae_tile=vae_tile)


@pytest.mark.parametrize("budget_gib,tile,decode_bytes", [
    (4.0, None, GIB + 2 * (2**30 + 3 * 2**20)),   # whole: 3.01 GiB x 1.05 = 3.16 GiB fits 4
    (3.0, 512, GIB + 2 * 282_591_232),              # whole 3.16 GiB > 3; 512² tiles: 1.53 x 1.05 = 1.60 fits
    (1.5, 256, GIB + 2 * 80_674_816),               # 512²: 1.60 GiB > 1.5; 256²: 1.15 x 1.05 = 1.21 fits
    (1.0, 256, GIB + 2 * 80_674_816),               # nothing fits: the smallest tile
])
def test_auto_picks_the_largest_tile_whose_decode_fits_the_budget(budget_gib, tile, decode_bytes):
    model = flux2_model(int(budget_gib * GIB))
    assert model.decode_tile(1024, 1024, 1) == tile
    assert model.phases(1024, 1024, 1)["decode"] == decode_bytes
    assert decode_bytes * ALLOCATOR_SLACK <= budget_gib * GIB or budget_gib == 1.0


def test_the_setting_overrides_the_budget():
    assert flux2_model(None).decode_tile(1024, 1024, 1) is None  # auto off CUDA (no budget): whole
    assert flux2_model(int(1.0 * GIB), "off").decode_tile(1024, 1024, 1) is None
    assert flux2_model(None, 512).decode_tile(1024, 1024, 1) == 512
    assert flux2_model(None, 512).decode_tile(512, 512, 1) is None  # one tile covers it: whole
    assert flux2_model(int(1.0 * GIB)).decode_tile(256, 256, 1) is None  # no auto tile is smaller than it
    # 2 GiB: one image in 512² tiles (1 GiB + 2 x 282.6 M x 2 B = 1.53 GiB, x 1.05 = 1.60), two in 256²
    # (512²: 1 GiB + 2 x 2 x 282.6 M x 2 B = 2.05 GiB, x 1.05 = 2.15 > 2; 256²: 1.30 x 1.05 = 1.37)
    assert flux2_model(2 * GIB).decode_tile(1024, 1024, 1) == 512
    assert flux2_model(2 * GIB).decode_tile(1024, 1024, 2) == 256


# ---------------------------------------------------------------------------------------------
# (b) through the families, against diffusers' own tiled decode
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    gt = klein_ground_truth(0)
    folder = make_full_pipeline(tmp_path_factory.mktemp("klein-tiles") / "klein-fp", gt=gt)
    return {"gt": gt, "engine": BonsaiImageEngine.from_pretrained(folder, device="cpu")}


KLEIN = dict(steps=2, width=256, height=192, seed=4, sampler="euler")


def assert_bounded(tiled: torch.Tensor, whole: torch.Tensor, other: torch.Tensor) -> None:
    """Really tiled (each tile's group norms are its own), yet near the whole decode: on these random
    tiny VAEs the mean difference is under 0.3 x that between two different latents' images (a tile
    put in the wrong place, or not blended, is not)."""
    diff = (tiled - whole).abs()
    assert diff.max() > 1e-3
    assert diff.mean() < 0.3 * (whole - other).abs().mean()


def test_klein_tiled_decode_equals_the_diffusers_pipeline_with_vae_tiling(klein, monkeypatch):
    eng, prompt = klein["engine"], "a lighthouse in fog"
    monkeypatch.setenv(VAE_TILE_ENV, "128")
    tiled = eng.generate(prompt, **KLEIN)
    assert tiled.metadata["vae_tile"] == 128
    monkeypatch.setenv(VAE_TILE_ENV, "off")
    whole = eng.generate(prompt, **KLEIN)
    other = eng.generate(prompt, **dict(KLEIN, seed=5))
    assert whole.metadata["vae_tile"] is None

    shape = eng.family.latent_shape(KLEIN["width"], KLEIN["height"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(KLEIN["seed"]))[None]
    pipe = build_pipeline(klein["gt"], seed=0)
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size, pipe.vae.tile_overlap_factor = 128, 16, 0.25
    ref = pipe(prompt=prompt, num_inference_steps=2, guidance_scale=1.0, width=KLEIN["width"], height=KLEIN["height"],
               latents=noise, output_type="pt", text_encoder_out_layers=OUT_LAYERS).images.permute(0, 2, 3, 1)
    torch.testing.assert_close(tiled.tensor, ref, atol=1e-4, rtol=0)
    assert_bounded(tiled.tensor, whole.tensor, other.tensor)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd-tiles") / "sd-fp")
    return BonsaiImageEngine.from_pretrained(folder, device="cpu")


def test_sd_tiled_decode_equals_diffusers_tiled_decode(sd, monkeypatch):
    fam = sd.family
    latents = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(1))  # 128x192 images
    monkeypatch.setenv(VAE_TILE_ENV, "96")
    ours = fam.decode(latents, 128, 192)
    assert fam.last_vae_tile == 96 and ours.shape == (2, 3, 192, 128)
    monkeypatch.setenv(VAE_TILE_ENV, "off")
    whole = fam.decode(latents, 128, 192)
    other = fam.decode(torch.randn(latents.shape, generator=torch.Generator().manual_seed(2)), 128, 192)
    assert fam.last_vae_tile is None

    vae = fam.vae
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 96, 12, 0.25
    try:
        with torch.inference_mode():
            ref = vae.decode(latents / vae.config.scaling_factor).sample
    finally:
        vae.disable_tiling()
    torch.testing.assert_close(ours, (ref / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    assert_bounded(ours, whole, other)


@pytest.mark.parametrize("value", ["100", "0", "-64", "big", "16"])
def test_a_tile_that_is_not_a_multiple_of_four_latent_pixels_is_refused(sd, monkeypatch, value):
    monkeypatch.setenv(VAE_TILE_ENV, value)
    with pytest.raises(BonsaiRequestError, match="BONSAI_VAE_TILE.*multiple of 32"):
        sd.generate("a cat", steps=1, width=64, height=64, seed=0)


# ---------------------------------------------------------------------------------------------
# (c) a budget only the tiled decode fits
# ---------------------------------------------------------------------------------------------
def test_a_run_that_fits_only_tiled_runs_tiled_and_a_roomy_one_is_unchanged(klein, monkeypatch):
    """The budget is a CUDA one; here (CPU) the family is told it applies, and the guardrail's
    available memory is set between the tiled and the whole decode's estimates (refuse mode)."""
    eng = klein["engine"]
    fam = eng.family
    vae_memory = type(fam).vae_memory
    monkeypatch.setattr(type(fam), "vae_memory",
                        lambda self, cuda: {**vae_memory(self, cuda), "decode_budget_bytes": self.decode_budget_bytes})
    monkeypatch.delenv(VAE_TILE_ENV, raising=False)
    size = dict(steps=1, width=512, height=512, seed=2, sampler="euler")
    monkeypatch.setattr(fam, "decode_budget_bytes", None)
    model = fam.memory_model(cfg=False)
    whole = model._decode_bytes(512, 512, 1, None)
    tiled = model._decode_bytes(512, 512, 1, 256)
    others = max(v for k, v in model.phases(512, 512, 1).items() if k != "decode")
    assert max(tiled, others) < whole  # the decode sets this run's peak unless it is tiled
    budget = int(ALLOCATOR_SLACK * (max(tiled, others) + whole) / 2)
    monkeypatch.setattr(eng, "available_memory", lambda device: budget - fam.loaded_bytes())

    monkeypatch.setattr(fam, "decode_budget_bytes", budget)
    r = eng.generate("a harbour at dusk", guardrail="refuse", **size)
    assert r.metadata["vae_tile"] == 256 and r.metadata["estimate_bytes"] <= budget
    monkeypatch.setenv(VAE_TILE_ENV, "off")  # the whole decode does not fit: refused before any compute
    with pytest.raises(BonsaiMemoryError, match="needs about"):
        eng.generate("a harbour at dusk", guardrail="refuse", **size)

    monkeypatch.delenv(VAE_TILE_ENV)
    monkeypatch.setattr(eng, "available_memory", None)
    monkeypatch.setattr(fam, "decode_budget_bytes", 100 * GIB)
    roomy = eng.generate("a harbour at dusk", **size)
    monkeypatch.setenv(VAE_TILE_ENV, "off")
    untiled = eng.generate("a harbour at dusk", **size)
    assert roomy.metadata["vae_tile"] is None and torch.equal(roomy.tensor, untiled.tensor)
    assert not torch.equal(roomy.tensor, r.tensor)


def test_placement_tiles_the_decode_to_fit_beside_the_measured_text_encoder(klein, monkeypatch):
    """The run placement sets the text encoder beside is estimated with a decode that must fit the
    decode budget less the encoder with the allocator's 5 % slack on it; the run itself (encoder
    resident) against the whole decode budget, (rest + encoder) x 1.05: the same test, so the run
    chooses the tile placement estimated (both budgets already within placement's headroom); off
    CUDA there is no budget to tile for."""
    fam = klein["engine"].family
    assert fam.memory_model(cfg=False).decode_budget_bytes is None  # CPU
    monkeypatch.setattr(fam, "device", torch.device("cuda"))
    monkeypatch.setattr(fam, "decode_budget_bytes", 4 * GIB)
    monkeypatch.setattr(fam, "_te_device_bytes", GIB + 5)
    assert fam.memory_model(cfg=False).decode_budget_bytes == 4 * GIB
    assert fam.memory_model(cfg=False, text_encoder=False).decode_budget_bytes == 4 * GIB - int((GIB + 5) * 1.05)

    # the resident run and placement's estimate choose the same tile at every budget, tried on each
    # side of every budget where the run's choice changes (whole, and each tile)
    from bonsai_core.placement import RESIDENT, Placement
    from bonsai_core.quant.layers import module_nbytes

    monkeypatch.setattr(fam, "_te_device_bytes", module_nbytes(fam.text_encoder))
    monkeypatch.setattr(fam, "te_placement", Placement(RESIDENT, "fits"))
    monkeypatch.setattr(fam, "_te_promoted", False)
    run_model = fam.memory_model(cfg=False)
    assert run_model.resident_bytes == fam.memory_model(cfg=False, text_encoder=False).resident_bytes + \
        module_nbytes(fam.text_encoder)
    tiles = set()
    from bonsai_core.guardrails import VAE_TILES

    edges = [math.ceil(run_model._decode_bytes(1024, 1024, 1, t) * ALLOCATOR_SLACK) for t in (None, *VAE_TILES)]
    for budget in (e + d for e in edges for d in (-2, -1, 0, 1, 2)):
        monkeypatch.setattr(fam, "decode_budget_bytes", budget)
        run = fam.memory_model(cfg=False).decode_tile(1024, 1024, 1)
        assert fam.memory_model(cfg=False, text_encoder=False).decode_tile(1024, 1024, 1) == run, budget
        tiles.add(run)
    assert None in tiles and len(tiles) > 2  # the sweep crossed whole decodes and more than one tile


def test_only_a_budget_the_user_set_sizes_the_decode_and_never_above_the_card(monkeypatch):
    """The default budget (6 GiB) never sizes a decode (only the memory free at the decode does); a
    budget the user set (``max_vram_gb`` as a flag or BONSAI_MAX_VRAM_GB) does, capped at what the
    card has (the engine's available-memory probe, here an 8 GiB card), 95 % of it (placement's
    headroom); off CUDA there is none."""
    import bonsai_core.engine as engine_mod
    from bonsai_core.config import BonsaiConfig

    monkeypatch.setattr(engine_mod, "_available_memory", lambda device: 8 * GIB)
    monkeypatch.delenv("BONSAI_MAX_VRAM_GB", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default = BonsaiConfig.from_env()
    assert default.max_vram_gb == 6.0 and engine_mod._decode_budget(default, cuda) is None
    assert engine_mod._decode_budget(BonsaiConfig.from_env(max_vram_gb=2), cuda) == int(0.95 * 2 * GIB)
    assert engine_mod._decode_budget(BonsaiConfig.from_env(max_vram_gb=24), cuda) == int(0.95 * 8 * GIB)
    assert engine_mod._decode_budget(BonsaiConfig.from_env(max_vram_gb=2), cpu) is None
    monkeypatch.setenv("BONSAI_MAX_VRAM_GB", "3")
    assert engine_mod._decode_budget(BonsaiConfig.from_env(), cuda) == int(0.95 * 3 * GIB)


def test_the_memory_free_at_the_decode_tiles_it_without_a_budget():
    """No budget set: the whole decode's activations (with slack) must fit the free memory; the
    weights already on the card are not counted again."""
    model = flux2_model(None)
    acts = lambda tile: 2 * (vae_tiled_decode_elements(FLUX2_VAE, 1024, 1024, tile) if tile else
                             vae_decode_elements(FLUX2_VAE, 1024, 1024))
    assert model.decode_tile(1024, 1024, 1) is None
    assert model.decode_tile(1024, 1024, 1, free_bytes=int(acts(None) * 1.05) + 1) is None
    assert model.decode_tile(1024, 1024, 1, free_bytes=int(acts(None) * 1.05) - 1) == 512
    assert model.decode_tile(1024, 1024, 1, free_bytes=int(acts(512) * 1.05) - 1) == 256


def test_the_fp32_retry_chooses_its_tile_for_four_bytes_a_value(sd, monkeypatch):
    """A decode that overflowed in 16 bits is done again in fp32, whose activations take twice the
    bytes: a budget the 16-bit whole decode fits, but a 32-bit one does not, gets the retry tiled."""
    from dataclasses import replace

    fam = sd.family
    monkeypatch.delenv(VAE_TILE_ENV, raising=False)
    base = replace(fam.memory_model(cfg=False), dtype_bytes=2)
    w = h = 512  # a 256² tile is smaller than the image
    whole16 = base._decode_bytes(w, h, 1, None)
    whole32 = replace(base, dtype_bytes=4)._decode_bytes(w, h, 1, None)
    budget = int(ALLOCATOR_SLACK * (whole16 + whole32) / 2)
    model = replace(base, decode_budget_bytes=budget)
    assert model.decode_tile(w, h, 1) is None and replace(model, dtype_bytes=4).decode_tile(w, h, 1) is not None
    monkeypatch.setattr(fam, "memory_model", lambda cfg=False, **k: model)
    calls = []
    decode, tiled = fam.vae.decode, fam.vae.tiled_decode

    def overflowing(x, **k):  # the 16-bit whole decode overflows
        calls.append(("whole", x.dtype))
        out = decode(x, **k)
        return (out[0] * float("inf"),) if len(calls) == 1 else out

    monkeypatch.setattr(fam.vae, "decode", overflowing)
    monkeypatch.setattr(fam.vae, "tiled_decode", lambda x, **k: (calls.append(("tiled", x.dtype)), tiled(x, **k))[1])
    image = fam.vae_decode(torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0)), w, h,
                           retry_fp32=True)
    assert calls[0][0] == "whole" and ("tiled", torch.float32) in calls
    assert fam.last_vae_tile == replace(model, dtype_bytes=4).decode_tile(w, h, 1) and torch.isfinite(image).all()


@pytest.mark.parametrize("which", ["klein", "sd"])
def test_the_engine_keeps_the_vae_decoder_only(which, klein, sd):
    """Text to image never encodes an image, so the engine keeps only the VAE's decoder: its module
    holds exactly the file's tensors less ``encoder.*`` and ``quant_conv.*`` (counted from the file,
    not from the module), the decode still equals diffusers' (the tests above), and calling the
    encoder says what happened instead of failing on a missing module."""
    from safetensors import safe_open

    from bonsai_core.quant.layers import module_nbytes

    eng = klein["engine"] if which == "klein" else sd
    kept = dropped = 0
    for path in sorted((eng.family.folder / "vae").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                n = t.numel() * torch.empty(0, dtype=eng.family.dtype).element_size() if t.is_floating_point() \
                    else t.numel() * t.element_size()
                if name.startswith(("encoder.", "quant_conv.")):
                    dropped += n
                else:
                    kept += n
    assert dropped > 0.2 * kept  # the encoder is a real share of these tiny VAEs too
    assert module_nbytes(eng.family.vae) == kept
    with pytest.raises(BonsaiRequestError, match="decode only"):
        eng.family.vae.encode(torch.zeros(1, 3, 64, 64))
