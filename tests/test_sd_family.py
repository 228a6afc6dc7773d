"""The SD family against diffusers' own pipelines, image for image.

``engine.generate`` on tiny SD1.5- and SDXL-shaped models must equal ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` given the same initial latents (fp32, max abs difference <= 1e-4):
Euler and DPM++ 2M, with and without Karras sigmas, classifier-free guidance with a negative
prompt, epsilon and v prediction. A flipped CFG sign, unscaled UNet input, a dropped VAE
scaling factor or an ignored negative prompt each break these tests.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)

from bonsai_core import cli
from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.errors import BonsaiCheckpointError
from bonsai_core.quant.layers import BonsaiLinear
from tests.sd_fixtures import (TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG, make_tiny_sd_pipeline, make_tiny_sdxl_pipeline,
                               set_prediction_type)

TOL = 1e-4
W, H, STEPS, CFG = 64, 96, 5, 6.0  # not square: a swapped width/height shows
PROMPT, NEGATIVE = "a red cat on a mat", "a blue dog"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-family")
    eps = make_tiny_sd_pipeline(root / "sd-eps")
    v = set_prediction_type(shutil.copytree(eps, root / "sd-v"), "v_prediction")
    # zero terminal SNR (Lin et al. 2024), as Lin et al. sample it: v-prediction, trailing timesteps
    zsnr = set_prediction_type(shutil.copytree(eps, root / "sd-v-zsnr"), "v_prediction", rescale_betas_zero_snr=True,
                               timestep_spacing="trailing")
    return {"epsilon": eps, "v_prediction": v, "v_zero_snr": zsnr, "root": root, "loaded": {}}


def engine_and_pipeline(sd, prediction):
    """The engine and diffusers' pipeline of one folder, each loaded once per module."""
    if prediction not in sd["loaded"]:
        folder = sd[prediction]
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        sd["loaded"][prediction] = (BonsaiImageEngine.from_pretrained(folder, device="cpu"), pipe)
    return sd["loaded"][prediction]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    src = make_tiny_sdxl_pipeline(root / "sdxl-fp")
    dst = root / "sdxl-bonsai"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    return {"fp": src, "bonsai": dst, "root": root,
            "engine": BonsaiImageEngine.from_pretrained(dst, device="cpu")}


def diffusers_scheduler(config, sampler: str, karras: bool):
    """The sampler's own diffusers scheduler, as someone swapping schedulers in diffusers makes it."""
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=karras, algorithm_type="dpmsolver++",
                                                   solver_order=2)


def initial_noise(engine, result):
    shape = engine.family.latent_shape(result.metadata["width"], result.metadata["height"])
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in result.metadata["seeds"]])


def max_diff(result, reference) -> float:
    assert reference.std() > 0.01  # a picture, not a flat field that any bug would match
    return (result.tensor - reference.permute(0, 2, 3, 1)).abs().max().item()


# ---------------------------------------------------------------------------------------------
# SD1.5 layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "v_zero_snr"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sd_equals_stable_diffusion_pipeline(sd, sampler, karras, prediction):
    eng, pipe = engine_and_pipeline(sd, prediction)
    ours = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=11, sampler=sampler,
                        karras=karras)
    assert ours.metadata["schedule"] == "auto" and ours.metadata["cfg"] is True
    pipe.scheduler = diffusers_scheduler(pipe.scheduler.config, sampler, karras)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=W, height=H,
               latents=initial_noise(eng, ours), output_type="pt").images
    assert max_diff(ours, ref) <= TOL


def test_dpmpp_2m_on_euler_sigmas_equals_diffusers_dpm_solver_given_eulers_timesteps(sd):
    """schedule="euler": DPM++ 2M on the Euler scheduler's sigmas (k-diffusion's way). The seed's
    config spaces timesteps "leading", so Euler's timesteps are whole numbers, and diffusers'
    DPM-Solver given them as custom timesteps interpolates the same sigmas."""
    eng, pipe = engine_and_pipeline(sd, "epsilon")
    ours = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=2, sampler="dpmpp_2m",
                        schedule="euler")
    euler = EulerDiscreteScheduler.from_config(eng.family.scheduler_config)
    euler.set_timesteps(STEPS)
    assert torch.equal(euler.timesteps, euler.timesteps.round())
    pipe.scheduler = diffusers_scheduler(pipe.scheduler.config, "dpmpp_2m", False)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, timesteps=euler.timesteps.long().tolist(), guidance_scale=CFG,
               width=W, height=H, latents=initial_noise(eng, ours), output_type="pt").images
    assert max_diff(ours, ref) <= TOL
    auto = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=2, sampler="dpmpp_2m")
    assert (auto.tensor - ours.tensor).abs().max() > 1e-3  # the two schedules are really different


def test_converted_sd_folder_equals_the_pipeline_run_on_its_own_modules(sd):
    """The 1-bit UNet inside diffusers' loop: the loop is the pipeline's, the modules the engine's."""
    dst = sd["root"] / "sd-bonsai"
    assert cli.main(["convert", str(sd["epsilon"]), str(dst)]) == 0
    eng = BonsaiImageEngine.from_pretrained(dst, device="cpu")
    fam = eng.family
    assert any(isinstance(m, BonsaiLinear) for m in fam.unet.modules())
    ours = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=4, sampler="dpmpp_2m",
                        karras=True)
    pipe = StableDiffusionPipeline(vae=fam.vae, text_encoder=fam.text_encoder, tokenizer=fam.tokenizer(), unet=fam.unet,
                                   scheduler=diffusers_scheduler(fam.scheduler_config, "dpmpp_2m", True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=W, height=H,
               latents=initial_noise(eng, ours), output_type="pt").images
    assert max_diff(ours, ref) <= TOL


# ---------------------------------------------------------------------------------------------
# SDXL layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,karras,negative", [("euler", False, NEGATIVE), ("dpmpp_2m", True, NEGATIVE),
                                                      ("dpmpp_2m", False, "")])
def test_sdxl_converted_with_the_cli_equals_stable_diffusion_xl_pipeline(sdxl, sampler, karras, negative):
    eng = sdxl["engine"]
    fam = eng.family
    assert fam.xl and set(fam.modules()) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert any(isinstance(m, BonsaiLinear) for m in fam.unet.modules())
    ours = eng.generate(PROMPT, negative, steps=STEPS, guidance=CFG, width=W, height=H, seed=9, sampler=sampler,
                        karras=karras, default_negative=False, batch=2 if negative == "" else 1)
    pipe = StableDiffusionXLPipeline(vae=fam.vae, text_encoder=fam.text_encoders[0], text_encoder_2=fam.text_encoders[1],
                                     tokenizer=fam._tokenizers[0], tokenizer_2=fam._tokenizers[1], unet=fam.unet,
                                     scheduler=diffusers_scheduler(fam.scheduler_config, sampler, karras))
    pipe.set_progress_bar_config(disable=True)
    # an empty negative is "no negative" to diffusers: all-zero embeddings (force_zeros_for_empty_prompt)
    ref = pipe([PROMPT] * len(ours.images), negative_prompt=[negative] * len(ours.images) if negative else None,
               num_inference_steps=STEPS, guidance_scale=CFG, width=W, height=H, latents=initial_noise(eng, ours),
               output_type="pt").images
    assert max_diff(ours, ref) <= TOL


def test_full_precision_sdxl_folder_equals_the_pipeline_loaded_by_diffusers(sdxl):
    eng = BonsaiImageEngine.from_pretrained(sdxl["fp"], device="cpu")
    ours = eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=1, sampler="euler")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl["fp"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=W, height=H,
               latents=initial_noise(eng, ours), output_type="pt").images
    assert max_diff(ours, ref) <= TOL


def test_sdxl_has_its_own_defaults_and_size_limits(sdxl):
    eng = sdxl["engine"]
    d = eng.family.defaults
    assert (d.width, d.height, d.max_side, d.guidance) == (1024, 1024, 1536, 5.0)
    report = eng.check("a cat")
    assert (report.request.width, report.request.height, report.request.steps) == (1024, 1024, d.steps)
    assert not any("largest side" in w for w in eng.check("a cat", width=1536, height=1024).warnings)
    assert any("largest side 1536" in w for w in eng.check("a cat", width=2048, height=1024).warnings)


# ---------------------------------------------------------------------------------------------
# What the family cannot run is refused by name
# ---------------------------------------------------------------------------------------------
def _edit_index(folder, **changes):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            index.pop(k, None)
        else:
            index[k] = v
    path.write_text(json.dumps(index))


def test_an_sdxl_unet_without_its_second_text_encoder_is_refused_naming_it(sd, tmp_path):
    folder = shutil.copytree(sd["epsilon"], tmp_path / "m")
    shutil.rmtree(folder / "unet")
    cfg = dict(TINY_SDXL_UNET_CONFIG, cross_attention_dim=TINY_UNET_CONFIG["cross_attention_dim"])
    UNet2DConditionModel(**cfg).save_pretrained(folder / "unet", safe_serialization=True)
    with pytest.raises(BonsaiCheckpointError, match=r"SDXL-style UNet.*text_encoder_2 and tokenizer_2"):
        BonsaiImageEngine.from_pretrained(folder, device="cpu")


def test_an_sdxl_index_missing_a_component_is_refused_naming_it(sdxl, tmp_path):
    folder = shutil.copytree(sdxl["bonsai"], tmp_path / "m")
    _edit_index(folder, tokenizer_2=None)
    with pytest.raises(BonsaiCheckpointError, match=r"SDXL-style model needs .*missing tokenizer_2.*bonsai convert"):
        BonsaiImageEngine.from_pretrained(folder, device="cpu")


def test_a_unet_needing_inputs_the_family_does_not_make_is_refused(sd, tmp_path):
    folder = shutil.copytree(sd["epsilon"], tmp_path / "m")
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, in_channels=9)))  # an inpainting UNet: image + mask channels
    with pytest.raises(BonsaiCheckpointError, match=r"9 input channels.*4-channel latents"):
        BonsaiImageEngine.from_pretrained(folder, device="cpu")
    cfg_path.write_text(json.dumps(dict(cfg, class_embed_type="timestep")))
    with pytest.raises(BonsaiCheckpointError, match=r"class_embed_type='timestep'"):
        BonsaiImageEngine.from_pretrained(folder, device="cpu")
    _edit_index(folder, vae=None)
    # the folder check (validate.py) or the family's own, whichever sees it first, names the vae
    with pytest.raises(BonsaiCheckpointError, match=r"missing vae|names no vae component"):
        BonsaiImageEngine.from_pretrained(folder, device="cpu")
