"""Bonsai Text Encoder Loader: a Bonsai model's 4-bit Qwen3 text encoder -> ComfyUI's CLIP (FLUX.2 [klein])."""

from __future__ import annotations

from ..bonsai_core.loader import read_text_encoder
from . import comfy_text_encoder
from .loader import model_input, model_source


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
        return {
            "required": {
                "model": model_input("A Bonsai klein model folder in models/bonsai/ (its text_encoder/ is read), "
                                     "or the last entry to use the path input."),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": "A Bonsai model folder, or its text_encoder/ folder."}),
            },
        }

    def load(self, model, path=""):
        source = model_source(model, path, "a folder")
        config, tensors, layers = read_text_encoder(source)
        return (comfy_text_encoder.build_clip(config, tensors, layers),)
