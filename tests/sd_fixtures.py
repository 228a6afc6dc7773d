"""Tiny SD-style pipelines built from configs (no downloads), for tests and CPU smoke runs.

The shapes are small but every kind of layer the real models have is present: down/up blocks with
self- and cross-attention, a CLIP text encoder, a KL VAE, a byte-level CLIP tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD15_UNET_CONFIG = dict(  # Stable Diffusion 1.5 shapes (random weights are fine for sizes)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(128, 256), norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8,
)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    """A valid byte-level CLIP tokenizer: every byte, every byte+'</w>', a few merges, the specials."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return folder


def tiny_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(folder))


def make_tiny_sd_pipeline(folder: Path, seed: int = 0, unet_config: dict | None = None) -> Path:
    """Write a full-precision diffusers StableDiffusionPipeline folder with tiny random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(**(unet_config or TINY_UNET_CONFIG))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    # four blocks: the VAE downsamples by 8 as SD's does, so latents are H/8 x W/8
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=64)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, projection_dim=128))
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return write_sd_scheduler_and_index(folder)


def write_sd_scheduler_and_index(folder: Path, **changes) -> Path:
    """The SD1.5 scheduler config (with ``changes``, e.g. ``prediction_type="v_prediction"``) and a
    StableDiffusionPipeline model_index.json beside the components."""
    from diffusers import EulerDiscreteScheduler

    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
               timestep_spacing="leading", steps_offset=1)
    EulerDiscreteScheduler(**{**cfg, **changes}).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.36.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# SDXL layout, small: two CLIP text encoders (the second with a projection, whose output is the
# pooled embedding), a UNet with SDXL's "text_time" added embedding (pooled text + six size
# values), linear projections in the transformer blocks, and two transformer layers in the
# second block as SDXL has more than one. Widths of 128 so the 1-bit conversion has work to do.
TINY_SDXL_TE_HIDDEN = (64, 64)
TINY_SDXL_PROJECTION = 64
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(128, 256), norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8), use_linear_projection=True,
    cross_attention_dim=sum(TINY_SDXL_TE_HIDDEN), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + TINY_SDXL_PROJECTION,
)


def _tiny_vae(seed_folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=64)
    vae.save_pretrained(seed_folder / "vae", safe_serialization=True)


def make_tiny_sdxl_pipeline(folder: Path, seed: int = 0, unet_config: dict | None = None) -> Path:
    """Write a full-precision diffusers StableDiffusionXLPipeline folder with tiny random weights."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(folder / "tokenizer")
    tiny_clip_tokenizer(folder / "tokenizer_2")
    UNet2DConditionModel(**(unet_config or TINY_SDXL_UNET_CONFIG)).save_pretrained(folder / "unet",
                                                                                   safe_serialization=True)
    _tiny_vae(folder)
    for name, cls, hidden in (("text_encoder", CLIPTextModel, TINY_SDXL_TE_HIDDEN[0]),
                              ("text_encoder_2", CLIPTextModelWithProjection, TINY_SDXL_TE_HIDDEN[1])):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, projection_dim=TINY_SDXL_PROJECTION, hidden_act="gelu")
        cls(cfg).save_pretrained(folder / name, safe_serialization=True)
    # SDXL's scheduler config (leading spacing, offset 1) and model index
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           prediction_type="epsilon", timestep_spacing="leading", steps_offset=1
                           ).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.36.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "force_zeros_for_empty_prompt": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def set_prediction_type(folder: Path, prediction: str, **extra) -> Path:
    """Make the folder's scheduler config say ``prediction`` (epsilon or v_prediction), and any
    ``extra`` keys (e.g. ``rescale_betas_zero_snr=True``)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg["prediction_type"] = prediction
    cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2))
    return folder
