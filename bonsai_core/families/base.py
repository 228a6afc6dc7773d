"""What every model family gives the engine.

A family owns its modules (text encoder, denoiser, VAE), knows how to encode prompts, how its
network turns a latent into a data prediction, its noise schedule and its latent shape. The
engine owns everything else (guardrails, seeds, the sampler loop, memory, metadata), so a new
family is one file.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import cuda_graph
from ..config import FamilyDefaults
from ..errors import BonsaiRequestError
from ..sampling import Schedule

#: ``auto`` (default): the VAE decodes in tiles only when the whole decode would not fit the memory
#: budget (CUDA); ``off``: never tiled; a number of pixels: always in tiles of that side.
VAE_TILE_ENV = "BONSAI_VAE_TILE"


class _DecodeOnly(nn.Module):
    """Where a VAE's encoder was: text to image never encodes an image, so the encoder's weights are
    not kept (``decode_only``); calling it says so instead of failing on a missing module."""

    def forward(self, *args, **kwargs):
        raise BonsaiRequestError("this model's VAE was loaded to decode only (text to image): its encoder was "
                                 "left in the file. Encoding an image needs the VAE loaded with diffusers or ComfyUI")


def decode_only(vae: nn.Module) -> None:
    """Drop a diffusers KL VAE's encoder (and its ``quant_conv``): text to image only decodes, and
    the encoder is 40 % of the weights (34 M of FLUX.2's and SD's 84 M: 66 MiB in 16-bit on the
    device in every phase). A VAE without one is left as it is."""
    if not isinstance(getattr(vae, "encoder", None), nn.Module):
        return
    vae.encoder = _DecodeOnly()
    if isinstance(getattr(vae, "quant_conv", None), nn.Module):
        vae.quant_conv = None  # diffusers' encode skips a None quant_conv


def load_vae_decoder(folder: Path, entry: list, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The pipeline's ``vae`` component for decoding on ``device``: loaded on the host, its encoder
    dropped (``decode_only``), then moved, so the encoder never reaches the device."""
    from ..loader import load_component

    vae = load_component(folder, "vae", entry, dtype, "cpu")
    decode_only(vae)
    return vae.to(device)


class Family:
    name: str = ""
    defaults: FamilyDefaults

    def __init__(self, folder: Path, index: dict, device: torch.device, dtype: torch.dtype):
        self.folder = folder
        self.index = index
        self.device = device
        self.dtype = dtype
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._graph = None  # cuda_graph.GraphedStep once a step ran on CUDA; False after a failed capture
        self._rgb = None  # (factors [C, 3], bias [3]) once fitted by latent_rgb()
        self.decode_budget_bytes: int | None = None  # what an ``auto`` VAE decode must fit (engine, at load)
        self.last_vae_tile: int | None = None  # the tile side the last decode ran in; None: untiled

    # --- what a family must provide -------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def denoising_modules(self) -> dict[str, nn.Module]:
        """What sits on the device while the sampler runs (a family that parks its text encoder
        elsewhere leaves it out)."""
        return self.modules()

    #: the compute dtype this family prefers on CUDA when the user asked for none
    cuda_dtype: torch.dtype = torch.float16

    def tokenizer(self):
        """The text encoder's tokenizer (for counting prompt tokens)."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def _encode(self, prompt: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One prompt -> its conditioning, ``[1, tokens, dim]`` on the device (or a tuple of such
        tensors, each with batch dimension 1, when the network takes more than one)."""
        raise NotImplementedError

    def encode_negative(self, prompts: list[str]):
        """The negative prompts' conditioning; a family may treat an empty negative specially."""
        return self.encode(prompts)

    def schedule(self, steps: int, width: int, height: int, karras: bool, sampler: str = "euler",
                 kind: str = "auto") -> Schedule:
        """The noise schedule; ``kind`` ``auto`` is the family's choice for ``sampler``."""
        raise NotImplementedError

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        """Shape of one image's initial noise (no batch dimension)."""
        raise NotImplementedError

    def denoiser(self, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                 schedule: Schedule, width: int, height: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """``denoise(x, i) -> x0`` for the sampler (classifier-free guidance when ``uncond``)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Final latents -> images ``[B, 3, H, W]`` in ``[0, 1]``, float32 on the CPU."""
        raise NotImplementedError

    def preview(self, x0: torch.Tensor) -> torch.Tensor:
        """A cheap RGB preview ``[B, h, w, 3]`` in [0, 1] of a data prediction ``x0 [B, C, h, w]``:
        one latent pixel -> one RGB pixel through the family's latent->RGB factors."""
        factors, bias = self.latent_rgb()
        rgb = torch.einsum("bchw,cr->bhwr", x0.detach().float().cpu(), factors) + bias
        return rgb.clamp(0, 1)

    def pixels_per_latent(self) -> int:
        """Image pixels one latent pixel covers, per side (8 for SD's VAE, 16 for FLUX.2's)."""
        side = self.defaults.multiple_of * 8
        return side // self.latent_shape(side, side)[1]

    def latent_rgb(self, probes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear map from one latent pixel to the colour of the image patch it decodes to:
        ``(factors [C, 3], bias [3])``, float32, fitted once per loaded model.

        Fitted, not tabulated: published factors exist for a few VAEs only, and a Bonsai model may
        carry any VAE. ``probes`` seeded noise latents (the sampler's x0 lives at unit scale) are
        decoded with this family's own decoder, each image is averaged over the patch of pixels
        one latent pixel covers, and the least-squares fit maps latent pixels to those colours.
        The probe is made large enough to have several samples per unknown (C + 1 per colour)."""
        if self._rgb is not None:
            return self._rgb
        m = self.defaults.multiple_of
        c = self.latent_shape(m * 8, m * 8)[0]
        factor = self.pixels_per_latent()
        side_latent = max(8, math.ceil(math.sqrt(4 * (c + 1) / probes)))
        side = side_latent * factor
        side = -(-side // m) * m
        gen = torch.Generator("cpu").manual_seed(0)
        z = torch.randn((probes, *self.latent_shape(side, side)), generator=gen)
        with torch.inference_mode():
            image = self.decode(z.to(self.device), side, side).float().cpu()
        pooled = torch.nn.functional.avg_pool2d(image, factor)  # [P, 3, h, w]
        a = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        y = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()
        sol = torch.linalg.lstsq(a, y).solution
        self._rgb = (sol[:-1].float().contiguous(), sol[-1].float().contiguous())
        return self._rgb

    def _forward(self, **inputs) -> torch.Tensor:
        """One raw network forward (the denoiser's model call) for ``_step``."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    def _step(self, **inputs) -> torch.Tensor:
        """One network forward; on CUDA replayed as a CUDA graph (captured once per input shape,
        ``BONSAI_CUDA_GRAPH=0`` turns it off), falling back to eager if capture fails."""
        if self._graph is None and cuda_graph.enabled(self.device):
            self._graph = cuda_graph.GraphedStep(self._forward)
        if self._graph:
            try:
                return self._graph(**inputs)
            except RuntimeError as exc:  # capture refused (a sync inside the forward, say): stay eager
                if "out of memory" in str(exc).lower():
                    raise  # the engine turns this into BonsaiMemoryError; eager would not fit either
                import warnings

                warnings.warn(f"CUDA graph capture failed, running eagerly: {exc}")
                self._graph = False
                torch.cuda.synchronize(self.device)
        return self._forward(**inputs)

    def encode(self, prompts: list[str], cache_size: int = 32) -> torch.Tensor:
        """Encode prompts, caching each prompt's conditioning (repeated prompts cost nothing)."""
        out = []
        for p in prompts:
            emb = self._prompt_cache.get(p)
            if emb is None:
                with torch.inference_mode():
                    emb = self._encode(p)
                self._prompt_cache[p] = emb
                while len(self._prompt_cache) > cache_size:
                    self._prompt_cache.popitem(last=False)
            else:
                self._prompt_cache.move_to_end(p)
            out.append(emb)
        if isinstance(out[0], tuple):
            return tuple(torch.cat(parts, dim=0) for parts in zip(*out))
        return torch.cat(out, dim=0)

    def weight_bytes(self) -> int:
        """Bytes of the weights on the device during denoising (what the memory guardrail counts)."""
        from ..quant.layers import module_nbytes

        return sum(module_nbytes(m) for m in self.denoising_modules().values())

    def loaded_bytes(self) -> int:
        """Bytes of every module this family holds, wherever it is."""
        from ..quant.layers import module_nbytes

        return sum(module_nbytes(m) for m in self.modules().values() if isinstance(m, nn.Module))

    def memory_model(self, cfg: bool):
        """The memory guardrail's model of this family on its device (``guardrails.MemoryModel``);
        ``cfg``: two network rows per image (negative and positive)."""
        raise NotImplementedError

    # --- the VAE decode, whole or tiled (families whose ``self.vae`` is a diffusers KL VAE) -----
    def vae_tile_setting(self) -> str | int:
        """``BONSAI_VAE_TILE``: "auto", "off" or a tile side in pixels. A side must be a multiple of 4
        latent pixels (so that diffusers' tiles start on whole latent pixels and its 1/4 overlap is
        whole too: the tiles then add up to the image exactly)."""
        raw = os.environ.get(VAE_TILE_ENV, "auto").strip().lower()
        if raw in ("", "auto", "off"):
            return raw or "auto"
        m = 4 * self.vae_scale
        if not raw.isdigit() or int(raw) < m or int(raw) % m:
            raise BonsaiRequestError(f"{VAE_TILE_ENV}={raw!r}: use auto, off, or a tile side in pixels that is a "
                                     f"multiple of {m} (this VAE's), such as 512")
        return int(raw)

    def vae_memory(self, cuda: bool) -> dict:
        """``guardrails.MemoryModel``'s tiled-decode fields for this family's VAE: its tiled decode's
        elements, the budget an ``auto`` decode must fit (CUDA only) and ``BONSAI_VAE_TILE``."""
        from ..guardrails import vae_tiled_decode_elements

        cfg = self.vae.config
        return {"tiled_decode_elements": lambda w, h, tile: vae_tiled_decode_elements(cfg, w, h, tile, cuda=cuda),
                "decode_budget_bytes": self.decode_budget_bytes if self.device.type == "cuda" else None,
                "vae_tile": self.vae_tile_setting()}

    def vae_decode(self, z: torch.Tensor, width: int, height: int, retry_fp32: bool) -> torch.Tensor:
        """VAE latents ``z`` -> images ``[B, 3, H, W]`` in [0, 1], float32 on the CPU: whole, or in the
        tiles ``memory_model().decode_tile`` chooses (diffusers' ``tiled_decode``; the tiles overlap by
        ``guardrails.VAE_TILE_OVERLAP`` and are blended, so the pixels differ a little from a whole
        decode). ``retry_fp32``: a decode that overflows is done once more in fp32."""
        from dataclasses import replace

        from ..guardrails import VAE_TILE_OVERLAP

        vae, model = self.vae, self.memory_model(cfg=False)

        def pick(dtype_bytes: int) -> int | None:
            free = None
            if self.device.type == "cuda":  # what the card has now: free, and this process's cache not in use
                free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) - \
                    torch.cuda.memory_allocated(self.device)
            self.last_vae_tile = replace(model, dtype_bytes=dtype_bytes).decode_tile(width, height, z.shape[0], free)
            return self.last_vae_tile

        def run(x: torch.Tensor, tile: int | None) -> torch.Tensor:
            if tile is None:
                return vae.decode(x, return_dict=False)[0]
            saved = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // self.vae_scale
            vae.tile_overlap_factor = VAE_TILE_OVERLAP
            try:
                return vae.tiled_decode(x, return_dict=False)[0]
            finally:
                vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved

        image = run(z.to(self.dtype), pick(model.dtype_bytes)).float()
        if retry_fp32 and not torch.isfinite(image).all():
            # fp16 VAEs (SDXL's above all) can overflow on some latents: decode once more in fp32, whose
            # activations take twice the bytes (the tile is chosen again for them)
            vae.to(torch.float32)
            try:
                image = run(z.float(), pick(4))
            finally:
                vae.to(self.dtype)
        return (image / 2 + 0.5).clamp(0, 1).cpu()

    def unpacked_bytes(self) -> int:
        """Dense copies of 1-bit weights alive on top of the packed ones, in the compute dtype: on a
        GPU the kernels expand at most one layer's weight at a time (the largest counts); on a CPU
        the ``cpu-cache`` kernel keeps every layer's dense weight that fits its budget."""
        from ..quant import cpu_cache, kernels
        from ..quant.layers import QUANTIZED_TYPES

        size = torch.empty(0, dtype=self.dtype).element_size()
        largest = total = 0
        for module in self.denoising_modules().values():
            for m in module.modules():
                if isinstance(m, QUANTIZED_TYPES):
                    n = m.weight.numel() * size
                    largest = max(largest, n)
                    total += n
        # on a CPU every choice but the reference ends at the cpu-cache kernel (a CUDA kernel named
        # there leaves its inputs to the auto choice)
        if self.device.type == "cpu" and kernels.choice() != kernels.REFERENCE.name:
            return max(largest, min(total, cpu_cache.KERNEL.budget))
        return largest

    def release(self) -> None:
        """Drop every module and cached embedding (the engine frees device memory after)."""
        self._prompt_cache.clear()
        self._graph = None
        self._rgb = None
