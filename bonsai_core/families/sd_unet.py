"""SD-style UNet family: SD1.5-style (one CLIP text encoder) and SDXL-style (two CLIP text
encoders, pooled embedding and size conditioning through ``added_cond_kwargs``) models with a
``UNet2DConditionModel`` (epsilon or v prediction), a KL VAE, the DDPM noise schedule and
classifier-free guidance.

Components come from diffusers and transformers; only the loop around them is ours. It is the
loop of diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, step for step:

* prompt: tokens padded to the tokenizer's ``model_max_length``; SD1.5 takes the text encoder's
  last hidden state; SDXL takes the penultimate hidden state of each encoder, concatenated, and the
  projected pooled output of the second (an empty negative is all zeros when the model's
  ``force_zeros_for_empty_prompt`` says so, as diffusers does for an absent negative);
* every step: UNet input ``x / sqrt(sigma^2 + 1)`` (``sampling.model_input_scale``), the
  scheduler's timestep, CFG ``uncond + guidance * (cond - uncond)``; SDXL adds
  ``text_embeds`` (pooled) and ``time_ids`` = (original size, crop top-left (0, 0), target size);
* decode: ``latents / scaling_factor`` (``* latents_std / scaling_factor + latents_mean`` when the
  VAE config has them), then the VAE, then ``image / 2 + 0.5`` clamped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import sampling
from ..config import FAMILY_DEFAULTS
from ..loader import load_component
from ..errors import BonsaiCheckpointError
from .base import Family, load_vae_decoder

#: what the sampler's own diffusers scheduler is, for ``schedule="auto"``
AUTO_SCHEDULE = {"euler": "euler", "dpmpp_2m": "dpm"}


def load_tokenizer(folder: Path, entry: list, name: str = "tokenizer"):
    import transformers

    cls = getattr(transformers, entry[1], None) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(folder / name)
    except (OSError, ValueError) as exc:
        raise BonsaiCheckpointError(f"{folder / name}: cannot load the tokenizer ({exc})") from exc


def read_scheduler_config(folder: Path) -> dict:
    """The folder's ``scheduler/scheduler_config.json`` ({} without one), read by the bounded,
    type-checked JSON reader every entry point uses."""
    from ..validate import read_json_file

    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    return read_json_file(path, "scheduler config")


def _config(folder: Path, name: str) -> dict:
    path = folder / name / "config.json"
    if not path.is_file():
        raise BonsaiCheckpointError(f"{path} is missing; the {name} component needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BonsaiCheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _has(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


class SDUNetFamily(Family):
    name = "sd_unet"
    defaults = FAMILY_DEFAULTS["sd_unet"]

    def __init__(self, folder: Path, index: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(folder, index, device, dtype)
        self.xl = _has(index, "text_encoder_2") or index.get("_class_name") == "StableDiffusionXLPipeline"
        need = ("unet", "vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if self.xl else ())
        missing = [c for c in need if not _has(index, c)]
        if missing:
            kind = "an SDXL-style" if self.xl else "an SD-style"
            raise BonsaiCheckpointError(
                f"{folder}/model_index.json: {kind} model needs {', '.join(need)}; missing {', '.join(missing)}. "
                "Convert the full diffusers pipeline folder again with `bonsai convert`")
        self._check_configs(folder)  # before any weight is read
        if self.xl:
            self.defaults = FAMILY_DEFAULTS["sdxl"]
        self.unet = load_component(folder, "unet", index["unet"], dtype, device)
        self._tokenizers = [load_tokenizer(folder, index["tokenizer"])]
        self.text_encoders = [load_component(folder, "text_encoder", index["text_encoder"], dtype, device)]
        if self.xl:
            self._tokenizers.append(load_tokenizer(folder, index["tokenizer_2"], "tokenizer_2"))
            self.text_encoders.append(load_component(folder, "text_encoder_2", index["text_encoder_2"], dtype, device))
        self.vae = load_vae_decoder(folder, index["vae"], dtype, device)
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", self.xl))
        self.scheduler_config = read_scheduler_config(folder)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- what this family can run ------------------------------------------------------------
    def _check_configs(self, folder: Path) -> None:
        """Refuse, from the components' config files, a model whose UNet needs inputs this family
        does not make, or whose parts do not fit together."""
        unet, vae = _config(folder, "unet"), _config(folder, "vae")
        tes = [_config(folder, n) for n in (("text_encoder", "text_encoder_2") if self.xl else ("text_encoder",))]
        where = folder / "unet" / "config.json"
        add = unet.get("addition_embed_type")
        if add not in (None, "text_time"):
            raise BonsaiCheckpointError(
                f"{where}: addition_embed_type {add!r} is not supported (SD1.5 has none, SDXL 'text_time'); "
                "this UNet needs inputs the SD family does not make")
        if add == "text_time" and not self.xl:
            raise BonsaiCheckpointError(
                f"{where}: this is an SDXL-style UNet (addition_embed_type 'text_time'), which needs text_encoder_2 "
                f"and tokenizer_2 for its pooled prompt embedding; {folder / 'model_index.json'} has neither")
        if self.xl and add != "text_time":
            raise BonsaiCheckpointError(
                f"{where}: the model has two text encoders (SDXL) but the UNet takes no pooled embedding or size "
                "conditioning (addition_embed_type is not 'text_time')")
        for key in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
            if unet.get(key) is not None:
                raise BonsaiCheckpointError(
                    f"{where}: {key}={unet[key]!r} is not supported by the SD family (the UNet needs an extra input "
                    "this family does not make)")
        width = sum(int(te.get("hidden_size") or 0) for te in tes)
        cross = unet.get("cross_attention_dim", 1280)
        if all(te.get("hidden_size") for te in tes) and not isinstance(cross, list) and cross != width:
            raise BonsaiCheckpointError(
                f"{where}: the UNet attends to {cross}-wide text embeddings but the text encoder(s) give {width}; "
                "the components are from different models")
        latent = vae.get("latent_channels", 4)
        if unet.get("in_channels", 4) != latent:
            raise BonsaiCheckpointError(
                f"{where}: the UNet takes {unet.get('in_channels')} input channels but the VAE makes {latent}-channel "
                "latents (an inpainting or other special UNet?); use a text-to-image model")
        if self.xl:
            proj = tes[1].get("projection_dim")
            passed = int(unet.get("addition_time_embed_dim") or 0) * 6 + int(proj or 0)
            expected = unet.get("projection_class_embeddings_input_dim")
            if proj is None or passed != expected:
                raise BonsaiCheckpointError(
                    f"{where}: the UNet's added embedding takes {expected} values but text_encoder_2's projection "
                    f"({proj}) and six size values of {unet.get('addition_time_embed_dim')} make {passed}; "
                    "text_encoder_2 must be the CLIPTextModelWithProjection of the same model")

    # --- modules ------------------------------------------------------------------------------
    @property
    def text_encoder(self):
        return self.text_encoders[0] if self.text_encoders else None

    def modules(self):
        mods = {"text_encoder": self.text_encoders[0], "unet": self.unet, "vae": self.vae}
        if self.xl:
            mods["text_encoder_2"] = self.text_encoders[1]
        return mods

    def tokenizer(self):
        return self._tokenizers[0]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizers[0](text).input_ids)

    # --- prompts ------------------------------------------------------------------------------
    def _encode(self, prompt: str):
        if not self.xl:
            tok = self._tokenizers[0]
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            return self.text_encoders[0](ids.to(self.device))[0].to(self.dtype)
        hidden, pooled = [], None
        for tok, te in zip(self._tokenizers, self.text_encoders):
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (text_embeds)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def encode_negative(self, prompts: list[str]):
        if self.xl and self.force_zeros_for_empty_prompt and all(not p for p in prompts):
            emb, pooled = self.encode([""] * len(prompts))
            return torch.zeros_like(emb), torch.zeros_like(pooled)
        return self.encode(prompts)

    def memory_model(self, cfg: bool):
        from .. import cuda_graph
        from ..guardrails import MemoryModel, text_encode_elements, unet_step_elements, vae_decode_elements

        unet, vae, scale = self.unet.config, self.vae.config, self.vae_scale
        return MemoryModel(
            resident_bytes=self.weight_bytes(), dtype_bytes=torch.empty(0, dtype=self.dtype).element_size(),
            step_elements=lambda w, h: unet_step_elements(unet, w, h, scale),
            decode_elements=lambda w, h: vae_decode_elements(vae, w, h, cuda=self.device.type == "cuda"),
            encode_elements=sum(text_encode_elements(te.config, tok.model_max_length, self.xl)
                                for te, tok in zip(self.text_encoders, self._tokenizers)),
            unpacked_bytes=self.unpacked_bytes(), rows_per_image=2 if cfg else 1,
            graph_pool=cuda_graph.enabled(self.device), **self.vae_memory(cuda=self.device.type == "cuda"))

    # --- sampling -----------------------------------------------------------------------------
    def schedule(self, steps, width, height, karras, sampler="euler", kind="auto"):
        kind = AUTO_SCHEDULE.get(sampler, "euler") if kind in (None, "auto") else kind
        return sampling.sd_schedule(steps, self.scheduler_config, karras=karras, kind=kind)

    def latent_shape(self, width, height):
        return (self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def denoiser(self, cond, uncond, guidance, schedule, width, height):
        use_cfg = uncond is not None and guidance != 1.0
        extra = {}
        if self.xl:
            (cond, pooled), (uncond, pooled_u) = cond, (uncond if use_cfg else (None, None))
            b = pooled.shape[0]
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype).repeat(b, 1)
            extra = {"text_embeds": torch.cat([pooled_u, pooled]) if use_cfg else pooled,
                     "time_ids": (torch.cat([time_ids, time_ids]) if use_cfg else time_ids).to(self.device)}
        context = torch.cat([uncond, cond]) if use_cfg else cond

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            x_in = (x * sampling.model_input_scale(schedule, i)).to(self.dtype)
            t = sampling.model_timestep(schedule, i).to(self.device)
            if use_cfg:
                out = self._step(sample=torch.cat([x_in, x_in]), timestep=t, encoder_hidden_states=context, **extra)
                out_u, out_c = out.float().chunk(2)
                out = out_u + guidance * (out_c - out_u)
            else:
                out = self._step(sample=x_in, timestep=t, encoder_hidden_states=context, **extra).float()
            return sampling.to_x0(schedule, x, out, i)

        return denoise

    def _forward(self, text_embeds=None, time_ids=None, **inputs):
        if text_embeds is not None:  # passed as plain tensors so a CUDA graph copies them in
            inputs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(**inputs).sample

    def decode(self, latents, width, height):
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            z = (latents * torch.tensor(std).view(1, c, 1, 1).to(latents) / cfg.scaling_factor
                 + torch.tensor(mean).view(1, c, 1, 1).to(latents))
        else:
            z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae_decode(z, width, height, retry_fp32=self.dtype != torch.float32)

    def release(self):
        super().release()
        self.text_encoders = []
        self.unet = self.vae = None

