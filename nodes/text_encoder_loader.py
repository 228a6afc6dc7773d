"""Bonsai Text Encoder Loader: a Bonsai model's 4-bit Qwen3 text encoder -> ComfyUI's CLIP (FLUX.2 [klein])."""

from __future__ import annotations

from ..bonsai_core.errors import BonsaiRequestError
from ..bonsai_core.loader import read_text_encoder
from . import comfy_text_encoder, host
from .loader import PATH_CHOICE


class BonsaiTextEncoderLoader:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Loads the text encoder of a Bonsai FLUX.2 [klein] model (Bonsai Image 4B) as a CLIP, keeping its "
                   "weights 4-bit (about 2.3 GB instead of 8), for CLIP Text Encode and the native klein workflow "
                   "(in place of CLIPLoader type flux2). Needs ComfyUI 0.33.0 or later.")
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("FLUX.2 [klein] conditioning from the 4-bit Qwen3 (hidden states 9, 18, 27).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = host.model_names()
        return {
            "required": {
                "model": (names + [PATH_CHOICE], {
                    "default": names[0] if names else PATH_CHOICE,
                    "tooltip": "A Bonsai klein model folder in models/bonsai/ (its text_encoder/ is read), or the "
                               "last entry to use the path input."}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": "A Bonsai model folder, or its text_encoder/ folder."}),
            },
        }

    def load(self, model, path=""):
        source = path.strip() or (None if model == PATH_CHOICE else host.model_path(model))
        if not source:
            raise BonsaiRequestError(f"no model chosen: put a Bonsai model folder in {host.model_folders()[0]} and "
                                     "pick it, or give a folder in path")
        config, tensors, layers = read_text_encoder(source)
        return (comfy_text_encoder.build_clip(config, tensors, layers),)
