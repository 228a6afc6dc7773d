"""Run inside a real ComfyUI's Python (``COMFYUI_PATH``): the Bonsai native MODEL against ComfyUI's own
loader, on tiny models built here. Prints one JSON line of results; tests/test_comfy_native.py
asserts on it. Each case samples the same noise and conditioning with core ``comfy.sample`` twice:

* through ``BonsaiDiffusionModelLoader`` / ``comfy_native.load_native_model`` (packed weights,
  our ops), and
* through ``comfy.sd.load_diffusion_model_state_dict`` of the dequantized weights (ComfyUI's own
  layers, no Bonsai code), the independent truth;

and a LoRA through core ``LoraLoaderModelOnly`` against the merged weights computed by hand here.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ["COMFYUI_PATH"]
sys.path[:0] = [COMFY, str(ROOT)]
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402


torch.manual_seed(0)
RESULTS: dict = {}


def _ours(name: str):
    """One of our tests/ modules by file (ComfyUI has a ``tests`` package of its own on the path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bonsai_tests_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _pack():
    return _ours("comfy_stub").load_pack("ComfyUI_Bonsai_native_check")


def sample(patcher, latent, cond, steps=3, seed=1, sampler="euler", scheduler="simple"):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    positive = [[cond, {}]]
    negative = [[torch.zeros_like(cond), {}]]
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, 1.0, sampler, scheduler, positive, negative, latent,
                                   seed=seed, disable_pbar=True)


def dense_model(sd):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in sd.items()},
                                                    model_options={"dtype": torch.float32})


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------- klein
def tiny_klein_gguf(work: Path) -> Path:
    """A tiny FLUX.2 [klein] transformer (widths a multiple of 128, which core's detection needs), its
    linears Q1_0, written as ``diffusion_models/tiny-klein-q1.gguf`` under ``work``."""
    from bonsai_core.importers.flux2_names import is_packed_linear
    from bonsai_core.importers.gguf_q1 import write_gguf
    from bonsai_core.quant.tensor import Q1Tensor

    fixtures = _ours("flux2_fixtures")
    cfg = dict(fixtures.TINY_CONFIG, attention_head_dim=128, num_attention_heads=2, num_layers=1, num_single_layers=1,
               joint_attention_dim=256, axes_dims_rope=[32, 32, 32, 32])
    diff = fixtures.build_model(cfg).state_dict()
    diff = {k: (Q1Tensor.from_float(v.float()) if is_packed_linear(k) else v.to(torch.bfloat16)) for k, v in diff.items()}
    path = work / "diffusion_models" / "tiny-klein-q1.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, diff)
    return path


def _cast_stats(name: str, patcher, pack):
    """Which 16-bit layers skip ComfyUI's cast on every call, beside what core itself would build for
    layers of that dtype computing in the model's dtype (``pick_operations``: its own loader's rule)."""
    import comfy.ops

    model = patcher.model
    compute = model.manual_cast_dtype if model.manual_cast_dtype is not None else model.get_dtype()
    plain, uncast, core_casts = 0, 0, []
    for m in model.diffusion_model.modules():
        if not hasattr(m, "comfy_cast_weights") or pack.nodes.comfy_native.is_q1(getattr(m, "weight", None)):
            continue
        dtypes = {t.dtype for t in m.parameters(recurse=False)} or {compute}
        plain += 1
        uncast += not m.comfy_cast_weights
        core = comfy.ops.pick_operations(dtypes.pop() if len(dtypes) == 1 else None, compute)
        core_casts.append(getattr(getattr(core, "Linear", None), "comfy_cast_weights", None))
    RESULTS[f"{name}_plain_layers"] = plain
    RESULTS[f"{name}_plain_layers_uncast"] = uncast
    RESULTS[f"{name}_core_would_cast"] = sum(bool(c) for c in core_casts)
    RESULTS[f"{name}_compute_dtype"] = str(compute)


def klein_case(work: Path, pack):
    from bonsai_core.native import read_native
    from bonsai_core.quant.tensor import Q1Tensor

    path = tiny_klein_gguf(work)
    t0 = time.perf_counter()
    native = read_native(path)
    RESULTS["klein_gguf_read_s"] = round(time.perf_counter() - t0, 3)
    RESULTS["klein_q1_tensors"] = sum(isinstance(t, Q1Tensor) for t in native.tensors.values())

    import folder_paths

    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(work / "diffusion_models")], {".gguf", ".safetensors"})
    folder_paths.folder_names_and_paths["loras"] = ([str(work / "loras")], {".safetensors"})
    node = pack.nodes.BonsaiDiffusionModelLoader
    assert "tiny-klein-q1.gguf" in node.INPUT_TYPES()["required"]["model_name"][0]
    with torch.inference_mode():
        ours = node().load("tiny-klein-q1.gguf")[0]
    truth_sd = native.dequantized(torch.float32)
    truth = dense_model(truth_sd)
    RESULTS["klein_model_class"] = type(ours.model).__name__
    RESULTS["klein_packed_params"] = sum(pack.nodes.comfy_native.is_q1(p) for p in ours.model.parameters())
    RESULTS["klein_size_bytes"] = [ours.model_size(), truth.model_size()]
    latent = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 8, 256, generator=torch.Generator().manual_seed(4))
    a, b = sample(ours, latent, cond), sample(truth, latent, cond)
    RESULTS["klein_rel"] = rel(a, b)
    _cast_stats("klein", ours, pack)

    # LoRA on the fused qkv of the double block (rows of q only: an offset patch) and on linear2
    lora, merged = {}, dict(truth_sd)
    g = torch.Generator().manual_seed(5)
    for key, rows in (("double_blocks.0.img_attn.qkv", (0, 256)), ("single_blocks.0.linear2", None)):
        w = truth_sd[key + ".weight"]
        out = w.shape[0] if rows is None else rows[1]
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(out, 4, generator=g) * 0.3
        if rows is None:
            lora[f"diffusion_model.{key}.lora_down.weight"] = down
            lora[f"diffusion_model.{key}.lora_up.weight"] = up
            lora[f"diffusion_model.{key}.alpha"] = torch.tensor(2.0)
        else:  # the LoRA as trainers write it for diffusers' to_q, mapped by ComfyUI onto qkv rows
            lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = down
            lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = up
        merged[key + ".weight"] = (w, down, up, rows, 2.0 / 4 if rows is None else 1.0)
    from safetensors.torch import save_file

    (work / "loras").mkdir(exist_ok=True)
    save_file(lora, str(work / "loras" / "tiny-klein-lora.safetensors"))
    import nodes as comfy_nodes

    for strength in (1.0, 0.5):
        with torch.inference_mode():
            lm = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny-klein-lora.safetensors", strength)[0]
        RESULTS[f"klein_lora_patched_keys_{strength}"] = len(lm.patches)
        sd = {}
        for k, v in merged.items():
            if isinstance(v, tuple):
                w, down, up, rows, alpha = v
                delta = strength * alpha * (up @ down)
                w = w.clone()
                if rows is None:
                    w += delta
                else:
                    w[rows[0]:rows[0] + rows[1]] += delta
                sd[k] = w
            else:
                sd[k] = v
        want = sample(dense_model(sd), latent, cond)
        got = sample(lm, latent, cond)
        RESULTS[f"klein_lora_rel_{strength}"] = rel(got, want)
        RESULTS[f"klein_lora_effect_{strength}"] = rel(want, b)
    RESULTS["klein_after_lora_rel"] = rel(sample(ours, latent, cond), b)  # the base MODEL is unpatched again

    # low-VRAM loading: every layer offloaded, the LoRA reaching it as ComfyUI's LowVramPatch
    import comfy.model_management as mm

    mm.unload_all_models()
    with torch.inference_mode():
        lm = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny-klein-lora.safetensors", 0.5)[0]
        lm.load(torch.device("cpu"), lowvram_model_memory=1)
        RESULTS["klein_lowvram_patched_layers"] = sum(
            1 for m in lm.model.modules() if any(hasattr(f, "key") for f in getattr(m, "weight_function", ())))
        t = torch.full((1,), 0.5)
        got = lm.model.apply_model(latent, t, c_crossattn=cond)
        truth_lm = dense_model(sd)  # the merged weights at strength 0.5, from the loop above
        want = truth_lm.model.apply_model(latent, t, c_crossattn=cond)
    RESULTS["klein_lowvram_lora_rel"] = rel(got, want)
    RESULTS["klein_lowvram_caches_before_unpatch"] = sum("_bonsai_lora_cache" in m.__dict__ for m in lm.model.modules())
    lm.unpatch_model()  # the LoRA's down/up copies go with it
    RESULTS["klein_lowvram_caches_after_unpatch"] = sum("_bonsai_lora_cache" in m.__dict__ for m in lm.model.modules())


# ------------------------------------------------------------------------------------------- SD1.5
def tiny_sd_native() -> tuple[dict, dict, dict]:
    """A tiny SD1.5-shaped UNet (320 channels, which core's detection needs), quantized:
    ``(diffusers state dict, diffusers -> ldm names, the ldm-named native dict)``."""
    from diffusers import UNet2DConditionModel

    from bonsai_core.native import sd_unet_ldm_names
    from bonsai_core.quant.layers import quantize_model

    unet = UNet2DConditionModel(block_out_channels=(320, 320), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, sample_size=8)
    quantize_model(unet)
    dsd = unet.state_dict()
    names = sd_unet_ldm_names(list(dsd))
    return dsd, names, {names[k]: v for k, v in dsd.items()}


def sd_case(work: Path, pack):
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from bonsai_core.native import sd_unet_ldm_names
    from bonsai_core.quant.tensor import Q1Tensor

    dsd, names, native = tiny_sd_native()
    RESULTS["sd_q1_tensors"] = sum(isinstance(t, Q1Tensor) for t in native.values())
    comfy_nodes_native = pack.nodes.comfy_native
    with torch.inference_mode():
        ours = comfy_nodes_native.load_native_model(native, "tiny-sd")
    # ComfyUI's own diffusers -> ldm table for the config it detected: the independent truth for ours
    table = comfy.utils.unet_to_diffusers(ours.model.model_config.unet_config)
    theirs = {d: l for d, l in table.items() if d in dsd}
    RESULTS["sd_names_compared"] = len(theirs)
    RESULTS["sd_names_differ"] = sorted(k for k in dsd if theirs.get(k) != names[k])[:5]
    # SDXL's names, on the meta device (no weights): core detects SDXL from our ldm names alone, and its
    # own diffusers -> ldm table for that config agrees with ours on every tensor
    from accelerate import init_empty_weights
    import comfy.model_detection

    with init_empty_weights():
        xl = UNet2DConditionModel(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                  use_linear_projection=True, addition_embed_type="text_time",
                                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    xsd = xl.state_dict()
    xnames = sd_unet_ldm_names(list(xsd))
    xcfg = comfy.model_detection.model_config_from_unet({xnames[k]: v for k, v in xsd.items()}, "")
    RESULTS["sdxl_detected"] = type(xcfg).__name__
    xtable = comfy.utils.unet_to_diffusers(xcfg.unet_config)
    RESULTS["sdxl_names_compared"] = sum(k in xsd for k in xtable)
    RESULTS["sdxl_names_differ"] = sorted(k for k in xsd if xtable.get(k) != xnames[k])[:5]
    truth = dense_model({k: (v.dequantize(torch.float32) if isinstance(v, Q1Tensor) else v.float())
                         for k, v in native.items()})
    RESULTS["sd_model_class"] = type(ours.model).__name__
    RESULTS["sd_size_bytes"] = [ours.model_size(), truth.model_size(), comfy_nodes_native.model_nbytes(ours.model)]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4))
    base = sample(truth, latent, cond, sampler="euler", scheduler="normal")
    RESULTS["sd_rel"] = rel(sample(ours, latent, cond, sampler="euler", scheduler="normal"), base)
    _cast_stats("sd", ours, pack)
    RESULTS["sd_packed_params"] = sum(comfy_nodes_native.is_q1(p) for p in ours.model.parameters())

    # a LoRA on a packed 3x3 conv and a packed linear, kohya names, through core LoraLoaderModelOnly
    conv = next(k for k, v in native.items() if isinstance(v, Q1Tensor) and v.dim() == 4 and v.shape[-1] == 3)
    lin = next(k for k, v in native.items() if isinstance(v, Q1Tensor) and v.dim() == 2)
    g = torch.Generator().manual_seed(7)
    lora, merged = {}, {k: (v.dequantize(torch.float32) if isinstance(v, Q1Tensor) else v.float())
                        for k, v in native.items()}
    for key in (conv, lin):
        w = merged[key]
        down = torch.randn(4, *w.shape[1:], generator=g) * 0.05
        up = torch.randn(w.shape[0], 4, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.05
        name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
        merged[key] = w + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    from safetensors.torch import save_file

    (work / "loras").mkdir(exist_ok=True)
    save_file(lora, str(work / "loras" / "tiny-sd-lora.safetensors"))
    import folder_paths
    import nodes as comfy_nodes

    folder_paths.folder_names_and_paths["loras"] = ([str(work / "loras")], {".safetensors"})
    with torch.inference_mode():
        lm = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny-sd-lora.safetensors", 1.0)[0]
    want = sample(dense_model(merged), latent, cond, sampler="euler", scheduler="normal")
    RESULTS["sd_lora_patched_keys"] = len(lm.patches)
    RESULTS["sd_lora_rel"] = rel(sample(lm, latent, cond, sampler="euler", scheduler="normal"), want)
    RESULTS["sd_lora_effect"] = rel(want, base)

    # a v-prediction, zero-terminal-SNR model (NativeStateDict.sampling from its folder's scheduler
    # config) against core's own loader with core's ModelSamplingDiscrete node set the same way
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    RESULTS["sd_default_sigma_max"] = float(ours.get_model_object("model_sampling").sigma_max)
    with torch.inference_mode():
        vz = comfy_nodes_native.load_native_model(native, "tiny-sd-vz", {"prediction_type": "v_prediction",
                                                                          "zero_snr": True})
    vz_truth = ModelSamplingDiscrete().patch(truth, "v_prediction", True)[0]
    RESULTS["sd_vz_sigma_max"] = [float(m.get_model_object("model_sampling").sigma_max) for m in (vz, vz_truth)]
    import comfy.model_sampling

    RESULTS["sd_vz_prediction"] = [isinstance(m.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
                                   for m in (vz, vz_truth, ours)]
    vz_want = sample(vz_truth, latent, cond, sampler="euler", scheduler="normal")
    RESULTS["sd_vz_rel"] = rel(sample(vz, latent, cond, sampler="euler", scheduler="normal"), vz_want)
    RESULTS["sd_vz_effect"] = rel(vz_want, base)  # not the epsilon model's image


# ------------------------------------------------------------------------------------------- VAE
def vae_case():
    """Does the Bonsai Image 4B VAE file (diffusers AutoencoderKLFlux2 layout, the FLUX.2 VAE) load in
    core's VAELoader as it is? Full-size random weights and batch-norm statistics; ComfyUI's decode of
    a 128-channel latent against diffusers' own (un-normalise with the batch norm, 2x2 unpatchify,
    decode), as the klein pipeline does."""
    import comfy.sd
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    vae = AutoencoderKLFlux2().eval()
    g = torch.Generator().manual_seed(6)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g) * 0.1)
    vae.bn.running_var.copy_(torch.rand(128, generator=g) + 0.5)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    cvae = comfy.sd.VAE(sd=sd)
    RESULTS["vae_latent_channels"] = cvae.latent_channels
    latent = torch.randn(1, 128, 3, 3, generator=g)
    with torch.inference_mode():
        got = cvae.decode(latent)  # [B, H, W, C] in 0..1
        z = latent * torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps) \
            + vae.bn.running_mean.view(1, -1, 1, 1)
        want = vae.decode(Flux2KleinPipeline._unpatchify_latents(z)).sample
    want = ((want.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    RESULTS["vae_shape"] = list(got.shape)
    RESULTS["vae_max_abs"] = float((got.float() - want.float()).abs().max())


def main():
    work = Path(tempfile.mkdtemp(prefix="bonsai-native-"))
    _ours("comfy_stub").stub_missing_torchaudio()
    from comfy.cli_args import args

    args.cpu = True  # as `main.py --cpu`: ComfyUI picks its device when model_management is imported
    import comfy.model_management  # noqa: F401

    pack = _pack()
    import comfyui_version

    RESULTS["comfyui"] = comfyui_version.__version__
    import comfy.model_detection

    if hasattr(comfy.supported_models, "Flux2"):
        klein_case(work, pack)
        vae_case()
    sd_case(work, pack)
    print("RESULTS " + json.dumps(RESULTS))


if __name__ == "__main__":
    main()
