"""Bonsai Diffusion Model Loader: a Bonsai folder / file or a Q1_0 GGUF -> a native ComfyUI MODEL."""

from __future__ import annotations

from ..bonsai_core.errors import BonsaiRequestError
from ..bonsai_core.hub import find_models
from ..bonsai_core.native import read_native
from . import comfy_native, host

FOLDERS = ("diffusion_models", "unet", host.MODEL_FOLDER)


def _roots() -> list[str]:
    import folder_paths

    roots = []
    for key in FOLDERS:
        if key == host.MODEL_FOLDER:
            roots += host.model_folders()
        elif key in folder_paths.folder_names_and_paths:
            roots += list(folder_paths.folder_names_and_paths[key][0])
    return list(dict.fromkeys(roots))


def model_names() -> list[str]:
    return find_models(_roots())


def model_path(name: str) -> str:
    path = host.find_in(_roots(), name)
    if path is not None:
        return path
    raise BonsaiRequestError(f"model {name!r} is not in {', '.join(_roots())}; put it in models/diffusion_models/")


class BonsaiDiffusionModelLoader:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Loads a 1-bit Bonsai denoiser as a native ComfyUI MODEL, for core KSampler / SamplerCustomAdvanced, "
                   "LoRA loaders and model patches: a Bonsai model folder or file, or a Q1_0 .gguf (Bonsai Image 4B "
                   "community GGUFs), from models/diffusion_models, models/unet or models/bonsai. The weights stay "
                   "1-bit in memory; LoRAs run beside them. Text encoder and VAE come from core's CLIPLoader and "
                   "VAELoader.")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The denoiser, 1-bit weights packed, for any core sampler and LoRA loader.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = model_names()
        return {"required": {"model_name": (names, {
            **({"default": names[0]} if names else {}),
            "tooltip": "A Bonsai model folder, a Bonsai .safetensors or a Q1_0 .gguf in models/diffusion_models, "
                       "models/unet or models/bonsai."})}}

    def load(self, model_name):
        path = model_path(model_name)
        native = read_native(path)
        return (comfy_native.load_native_model(native.tensors, path, native.sampling),)
