"""What a real ComfyUI needs to run the example workflows offline: the models they name, made tiny.

* ``models/bonsai/<SD_MODEL>``: a tiny SD-shaped pipeline converted to Bonsai (tests.sd_fixtures);
* ``models/bonsai/<KLEIN_MODEL>``: a tiny FLUX.2 [klein] pipeline converted to Bonsai, under the
  folder name the Bonsai Image 4B workflow uses (tests.klein_fixtures);
* the native workflows' files (``make_native_models``): a tiny FLUX.2 [klein] Q1_0 GGUF in BFL names
  (2 x 128 heads, 1 double + 1 single block, text width 768 so CLIP-L conditioning drives it in
  tests), a Bonsai SD1.5 folder whose UNet core's detection takes as SD1.5 (320 channels, context
  768, one attention level), a full-size random CLIP-L (ComfyUI builds CLIP-L at its real size
  whatever the file holds), a full-size SD VAE and a FLUX.2 VAE with a narrow decoder (ComfyUI 0.33
  reads a decoder's width from its first conv), and a LoRA on the klein's fused qkv and linear2;
* ``models/upscale_models/<UPSCALER>``: a randomly initialised, small ESRGAN (RRDBNet, x4) state
  dict, a plain tensor dict in a .pth as the real file is (ComfyUI reads it with
  ``weights_only``), in the layout ComfyUI's upscaler loader (spandrel) recognises.
"""

from __future__ import annotations

from pathlib import Path

import torch

SD_MODEL = "bonsai-sd-tiny"
KLEIN_MODEL = "bonsai-image-binary-4B"
UPSCALER = "RealESRGAN_x4plus.pth"  # the name of the real file (xinntao/Real-ESRGAN releases)
# the native workflows' files, under the names of the public files they stand for
KLEIN_GGUF = "bonsai_image_4b-q1_0.gguf"  # models/diffusion_models (community Q1_0 GGUF, BFL names)
SD15_MODEL = "bonsai-sd15"  # models/bonsai: a Bonsai SD1.5 folder (`bonsai convert`)
QWEN_TE = "qwen_3_4b.safetensors"  # models/text_encoders: FLUX.2 klein's Qwen3-4B (not made: too big)
CLIP_L = "clip_l.safetensors"  # models/text_encoders: SD1.5's CLIP-L
FLUX2_VAE = "flux2-vae.safetensors"  # models/vae
SD_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"  # models/vae
KLEIN_LORA = "bonsai_image_4b_style_lora.safetensors"  # models/loras


def write_tiny_esrgan(path: Path, nf: int = 8, gc: int = 32, blocks: int = 1, seed: int = 0) -> Path:
    """RRDBNet x4 (ESRGAN / Real-ESRGAN's generator) with ``blocks`` RRDB blocks of three dense blocks,
    ``nf`` features, ``gc`` growth channels (spandrel reads ESRGAN files with 32). Weights are small noise around an identity-like
    colour path, so the output is a plausible 4x image, not saturated noise."""
    g = torch.Generator().manual_seed(seed)

    def conv(name: str, cout: int, cin: int, scale: float = 0.02):
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * scale
        sd[f"{name}.bias"] = torch.zeros(cout)

    sd: dict[str, torch.Tensor] = {}
    conv("conv_first", nf, 3, 0.2)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 5):
                conv(f"body.{b}.rdb{r}.conv{k}", gc, nf + (k - 1) * gc)
            conv(f"body.{b}.rdb{r}.conv5", nf, nf + 4 * gc)
    conv("conv_body", nf, nf)
    conv("conv_up1", nf, nf, 0.2)
    conv("conv_up2", nf, nf, 0.2)
    conv("conv_hr", nf, nf, 0.2)
    conv("conv_last", 3, nf, 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def make_models(models: Path) -> Path:
    """Fill a ComfyUI ``models`` folder with everything the example workflows name."""
    from bonsai_core.convert import convert_pipeline
    from tests.klein_fixtures import make_full_pipeline
    from tests.sd_fixtures import make_tiny_sd_pipeline

    work = models.parent / "model-sources"
    if not (models / "bonsai" / SD_MODEL).exists():
        convert_pipeline(make_tiny_sd_pipeline(work / "sd"), models / "bonsai" / SD_MODEL, log=lambda m: None)
    if not (models / "bonsai" / KLEIN_MODEL).exists():
        convert_pipeline(make_full_pipeline(work / "klein"), models / "bonsai" / KLEIN_MODEL, log=lambda m: None)
    if not (models / "upscale_models" / UPSCALER).exists():
        write_tiny_esrgan(models / "upscale_models" / UPSCALER)
    make_native_models(models)
    return models


SD15_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
                        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                        attention_head_dim=8)
NATIVE_KLEIN_CONFIG = dict(attention_head_dim=128, num_attention_heads=2, num_layers=1, num_single_layers=1,
                           joint_attention_dim=768, axes_dims_rope=[32, 32, 32, 32])


def _save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def make_native_models(models: Path, seed: int = 0) -> Path:
    """The files the native workflows name (see the module docstring)."""
    from bonsai_core.convert import convert_pipeline
    from bonsai_core.importers.flux2_names import is_packed_linear
    from bonsai_core.importers.gguf_q1 import write_gguf
    from bonsai_core.quant.tensor import Q1Tensor
    from tests.flux2_fixtures import TINY_CONFIG, build_model
    from tests.sd_fixtures import make_tiny_sd_pipeline

    torch.manual_seed(seed)
    gguf = models / "diffusion_models" / KLEIN_GGUF
    if not gguf.exists():
        sd = build_model(dict(TINY_CONFIG, **NATIVE_KLEIN_CONFIG)).state_dict()
        gguf.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(gguf, {k: (Q1Tensor.from_float(v) if is_packed_linear(k) else v.to(torch.bfloat16))
                          for k, v in sd.items()})
    if not (models / "bonsai" / SD15_MODEL).exists():
        src = make_tiny_sd_pipeline(models.parent / "model-sources" / "sd15", seed, unet_config=SD15_UNET_CONFIG)
        convert_pipeline(src, models / "bonsai" / SD15_MODEL, log=lambda m: None)
    if not (models / "text_encoders" / CLIP_L).exists():
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, projection_dim=768)).half()  # CLIP ViT-L/14 text
        # ComfyUI reads "text_model."-prefixed names; transformers 5 may save them without it
        _save(models / "text_encoders" / CLIP_L,
              {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.state_dict().items()})
    if not (models / "vae" / FLUX2_VAE).exists():
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2(decoder_block_out_channels=(32, 64, 128, 128))
        _save(models / "vae" / FLUX2_VAE, {k: v.half() if v.is_floating_point() else v for k, v in vae.state_dict().items()})
    if not (models / "vae" / SD_VAE).exists():
        from diffusers import AutoencoderKL

        # full size: ComfyUI 0.3.64 reads no decoder width from the file
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        _save(models / "vae" / SD_VAE, {k: v.half() for k, v in vae.state_dict().items()})
    if not (models / "loras" / KLEIN_LORA).exists():
        g = torch.Generator().manual_seed(seed + 1)
        lora = {}
        for key, (out, inp) in (("double_blocks.0.img_attn.qkv", (768, 256)), ("single_blocks.0.linear2", (256, 1024))):
            lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(8, inp, generator=g) * 0.05
            lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out, 8, generator=g) * 0.05
            lora[f"diffusion_model.{key}.alpha"] = torch.tensor(8.0)
        _save(models / "loras" / KLEIN_LORA, lora)
    return models
