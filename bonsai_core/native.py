"""A Bonsai denoiser as a host's native state dict: the tensors under the names ComfyUI's own
loaders use, with the 1-bit weights still packed.

ComfyUI (and other hosts built on the original model code) name a model's tensors as the model's
authors did, not as diffusers does:

* FLUX.2 [klein]: Black Forest Labs' names (``double_blocks.N.img_attn.qkv.weight`` ...), the
  names community Bonsai Image 4B GGUFs already carry; a Bonsai folder's diffusers names are
  mapped by ``importers.flux2_names.diffusers_to_bfl`` (q/k/v rows joined, exact for Q1_0);
* SD1.5 / SDXL UNets: the original latent-diffusion (``ldm``) names (``input_blocks.N.M...``),
  mapped here by ``sd_unet_ldm_names`` from the diffusers names alone.

Q1_0 weights stay ``Q1Tensor`` (renaming and joining rows never dequantize). Nothing here imports
a host: ``nodes/comfy_native.py`` hands the result to ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .errors import BonsaiCheckpointError
from .quant.tensor import Q1Tensor

FAMILIES = ("flux2_klein", "sd_unet")


@dataclass
class NativeStateDict:
    """A denoiser's tensors under the original model code's names (``layout``: "bfl" or "ldm")."""

    family: str
    layout: str
    tensors: dict[str, torch.Tensor]
    source: Path
    notes: list[str] = field(default_factory=list)
    #: How the model was trained to be sampled, where that is not what a host assumes of the layout
    #: (an SD1.5/SDXL UNet is taken as epsilon-predicting on SD's schedule): ``{"prediction_type":
    #: "v_prediction", "zero_snr": bool}`` from a model folder's scheduler config; None otherwise.
    sampling: dict | None = None

    @property
    def packed_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if isinstance(t, Q1Tensor))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor dense in ``dtype``: what a host's own loader can read (tests, comparisons)."""
        return {k: (t.dequantize(dtype) if isinstance(t, Q1Tensor) else t.to(dtype)) for k, t in self.tensors.items()}


def read_native(path) -> NativeStateDict:
    """Read a Bonsai model folder, a Bonsai component folder or file, or a Q1_0 ``.gguf`` into
    host-native names. Refuses (``BonsaiCheckpointError``) anything else, saying what it found."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise BonsaiCheckpointError(f"{path}: no such file or folder; put the model in models/diffusion_models/")
    if path.suffix == ".gguf":
        return _read_gguf(path)
    if path.suffix == ".safetensors":
        kind = checkpoint.sniff_format(path)
        if kind != "bonsai":
            if kind == "broken-bonsai":
                checkpoint.read_header(path)  # raises, saying what is wrong
            raise BonsaiCheckpointError(
                f"{path}: not a Bonsai file ({kind}); load a dense model with ComfyUI's own Load Diffusion Model node, "
                "or convert it first with `bonsai convert`")
        return _from_component(checkpoint.read_tensors(path))
    raise BonsaiCheckpointError(f"{path}: expected a Bonsai folder, a Bonsai .safetensors file or a Q1_0 .gguf file")


def _read_folder(folder: Path) -> NativeStateDict:
    from .loader import family_of, read_model_index

    sampling = None
    if (folder / "model_index.json").exists():
        index = read_model_index(folder)
        family, comp = family_of(index, folder)
        sampling = sd_sampling(folder) if family == "sd_unet" else None
        folder = folder / comp
    if not any(checkpoint.sniff_format(p) in ("bonsai", "broken-bonsai") for p in folder.glob("*.safetensors")):
        raise BonsaiCheckpointError(
            f"{folder}: no Bonsai weights file here (a Bonsai model folder has model_index.json and unet/ or "
            "transformer/ with a Bonsai .safetensors); convert the model with `bonsai convert`")
    out = _from_component(checkpoint.read_tensors(checkpoint.find_weights(folder)))
    out.sampling = sampling
    return out


def sd_sampling(folder: Path) -> dict | None:
    """What an SD model folder's ``scheduler/scheduler_config.json`` says a host must do differently
    from epsilon prediction on SD's schedule: ``{"prediction_type": "v_prediction", "zero_snr": ...}``,
    or None where it says nothing of the kind (no config: SD's defaults). A config the engine would
    refuse is refused here too, with the engine's message and the file."""
    from .errors import BonsaiRequestError
    from .families.sd_unet import read_scheduler_config
    from .sampling import _check_sd_config

    cfg = read_scheduler_config(folder)  # the engine's reader: both refuse the same files
    if not cfg:
        return None
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        prediction = _check_sd_config(cfg)
    except BonsaiRequestError as e:
        raise BonsaiCheckpointError(f"{path}: {e}") from None
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if prediction == "epsilon" and not zero_snr:
        return None
    return {"prediction_type": prediction, "zero_snr": zero_snr}


def _from_component(cf: checkpoint.ComponentFile) -> NativeStateDict:
    family = cf.family
    if family == "flux2_klein":
        from .importers.flux2_names import diffusers_to_bfl

        try:
            bfl, unknown = diffusers_to_bfl(cf.tensors)
        except ValueError as e:
            raise BonsaiCheckpointError(f"{cf.path}: cannot map to BFL names ({e})") from None
        if unknown:
            raise BonsaiCheckpointError(f"{cf.path}: tensor {unknown[0]!r} is not a FLUX.2 transformer tensor "
                                        f"({len(unknown)} unknown names)")
        return NativeStateDict(family, "bfl", bfl, cf.path, ["diffusers names mapped to BFL names"])
    if family == "sd_unet":
        names = sd_unet_ldm_names(list(cf.tensors), cf.path)
        return NativeStateDict(family, "ldm", {names[k]: t for k, t in cf.tensors.items()}, cf.path,
                               ["diffusers names mapped to ldm names"])
    raise BonsaiCheckpointError(f"{cf.path}: a Bonsai {cf.meta.get('component')!r} component of family {family!r} "
                                f"is not a denoiser; expected one of {', '.join(FAMILIES)}")


def _read_gguf(path: Path) -> NativeStateDict:
    from .importers.flux2_names import diffusers_to_bfl, split_by_naming, strip_bfl_prefix
    from .importers.gguf_q1 import read_gguf_raw

    raw, notes = read_gguf_raw(path)
    tensors, diff = split_by_naming({strip_bfl_prefix(k): t for k, t in raw.items()})
    if diff:  # a file written with diffusers names: join them the BFL way
        bfl, unknown = diffusers_to_bfl(diff)
        if unknown:
            raise BonsaiCheckpointError(f"{path}: tensor {unknown[0]!r} is not a FLUX.2 transformer tensor")
        tensors = {**tensors, **bfl}
        notes.append(f"{len(diff)} diffusers-named tensors mapped to BFL names")
    needed = ("img_in.weight", "double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight")
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise BonsaiCheckpointError(f"{path}: not a FLUX.2 [klein] transformer GGUF: no tensor {missing[0]!r} "
                                    f"(found {', '.join(list(tensors)[:4])} ...)")
    if not any(isinstance(t, Q1Tensor) for t in tensors.values()):
        notes.append("no Q1_0 tensor in this file: every weight is dense")
    return NativeStateDict("flux2_klein", "bfl", tensors, path, notes)


# ------------------------------------------------------------------------------------------------
# SD UNet: diffusers names -> ldm names. The table follows the original latent-diffusion UNet
# (openaimodel.py: input_blocks / middle_block / output_blocks, ResBlock in/out/emb layers) as
# diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py states it; written out here
# because no library offers the diffusers -> ldm direction for a UNet alone. Block counts come
# from the names, so it holds for SD1.5, SDXL and shrunken test models alike.

_TOP = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
           "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}
_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def sd_unet_ldm_names(names: list[str], where="UNet") -> dict[str, str]:
    """diffusers ``UNet2DConditionModel`` tensor name -> ldm name, for every name given."""
    resnets = [int(m.group(4)) for n in names if (m := _PART.match(n)) and m.group(1) == "down_blocks"
               and m.group(3) == "resnets"]
    if not resnets:
        raise BonsaiCheckpointError(f"{where}: no down_blocks.N.resnets tensors: not an SD UNet")
    per_level = max(resnets) + 2  # layers_per_block resnets + the level's downsampler
    up_attn = {int(m.group(2)) for n in names if (m := _PART.match(n)) and m.group(1) == "up_blocks"
               and m.group(3) == "attentions"}
    out = {}
    for n in names:
        new = None
        for a, b in _TOP.items():
            if n.startswith(a):
                new = b + n[len(a):]
        if (m := _PART.match(n)) is not None:
            blocks, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "resnets":
                rest = _resnet(rest)
            if blocks == "down_blocks":
                new = {"resnets": f"input_blocks.{per_level * i + j + 1}.0.{rest}",
                       "attentions": f"input_blocks.{per_level * i + j + 1}.1.{rest}",
                       "downsamplers": f"input_blocks.{per_level * (i + 1)}.0.{rest.replace('conv.', 'op.', 1)}",
                       }.get(kind)
            else:
                new = {"resnets": f"output_blocks.{per_level * i + j}.0.{rest}",
                       "attentions": f"output_blocks.{per_level * i + j}.1.{rest}",
                       "upsamplers": f"output_blocks.{per_level * i + per_level - 1}.{2 if i in up_attn else 1}.{rest}",
                       }.get(kind)
        elif (m := _MID.match(n)) is not None:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        if new is None:
            raise BonsaiCheckpointError(f"{where}: tensor {n!r} has no place in an SD UNet")
        out[n] = new
    return out


def _resnet(rest: str) -> str:
    for a, b in _RESNET.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest
