"""SD-style UNet family: CLIP text encoder, ``UNet2DConditionModel`` (epsilon or v prediction),
KL VAE, the ``scaled_linear`` noise schedule and classifier-free guidance.

Components come from diffusers and transformers; only the loop around them is ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import sampling
from ..config import FAMILY_DEFAULTS
from ..loader import load_component
from ..errors import BonsaiCheckpointError
from .base import Family


def load_tokenizer(folder: Path, entry: list):
    import transformers

    cls = getattr(transformers, entry[1], None) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError) as exc:
        raise BonsaiCheckpointError(f"{folder / 'tokenizer'}: cannot load the tokenizer ({exc})") from exc


def read_scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BonsaiCheckpointError(f"{path}: not valid JSON ({exc})") from exc


class SDUNetFamily(Family):
    name = "sd_unet"
    defaults = FAMILY_DEFAULTS["sd_unet"]

    def __init__(self, folder: Path, index: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(folder, index, device, dtype)
        self._tokenizer = load_tokenizer(folder, index.get("tokenizer", ["transformers", "CLIPTokenizer"]))
        self.text_encoder = load_component(folder, "text_encoder", index["text_encoder"], dtype, device)
        self.unet = load_component(folder, "unet", index["unet"], dtype, device)
        self.vae = load_component(folder, "vae", index["vae"], dtype, device)
        self.scheduler_config = read_scheduler_config(folder)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self):
        return {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}

    def tokenizer(self):
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text).input_ids)

    def _encode(self, prompt: str) -> torch.Tensor:
        tok = self._tokenizer(prompt, padding="max_length", max_length=self._tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    def schedule(self, steps, width, height, karras):
        return sampling.sd_schedule(steps, self.scheduler_config, karras=karras)

    def latent_shape(self, width, height):
        return (self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def denoiser(self, cond, uncond, guidance, schedule, width, height):
        use_cfg = uncond is not None and guidance != 1.0
        context = torch.cat([uncond, cond]) if use_cfg else cond

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            x_in = (x * sampling.model_input_scale(schedule, i)).to(self.dtype)
            t = sampling.model_timestep(schedule, i).to(self.device)
            if use_cfg:
                out = self._step(sample=torch.cat([x_in, x_in]), timestep=t, encoder_hidden_states=context)
                out_u, out_c = out.float().chunk(2)
                out = out_u + guidance * (out_c - out_u)
            else:
                out = self._step(sample=x_in, timestep=t, encoder_hidden_states=context).float()
            return sampling.to_x0(schedule, x, out, i)

        return denoise

    def _forward(self, **inputs):
        return self.unet(**inputs).sample

    def decode(self, latents, width, height):
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        image = self.vae.decode(z.to(self.dtype)).sample.float()
        if not torch.isfinite(image).all() and self.dtype != torch.float32:
            # fp16 VAEs can overflow on some latents: decode once more in fp32 (slower, exact)
            self.vae.to(torch.float32)
            try:
                image = self.vae.decode(z.float()).sample
            finally:
                self.vae.to(self.dtype)
        return (image / 2 + 0.5).clamp(0, 1).cpu()

    def release(self):
        super().release()
        self.text_encoder = self.unet = self.vae = None
