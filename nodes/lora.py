"""Bonsai LoRA: BONSAI_PIPE + a LoRA file from models/loras/ + strength -> BONSAI_PIPE."""

from __future__ import annotations

import dataclasses

from ..bonsai_core.errors import BonsaiRequestError
from . import host

NO_FILES = "(no .safetensors LoRA in models/loras)"


class BonsaiLoRA:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Adds a LoRA (kohya or diffusers/PEFT .safetensors from models/loras/) to a Bonsai model as "
                   "low-rank side branches: the 1-bit weights are never changed. Chain several; the pipe coming in "
                   "is not changed, so branches off one loader keep their own LoRAs.")
    RETURN_TYPES = ("BONSAI_PIPE",)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA added, for Bonsai Sampler (or another Bonsai LoRA).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        names = host.lora_names() or [NO_FILES]
        return {
            "required": {
                "pipe": ("BONSAI_PIPE", {"tooltip": "The model, from Bonsai Loader or another Bonsai LoRA."}),
                "lora": (names, {"default": names[0],
                                 "tooltip": "A LoRA file in models/loras/ made for this model's family "
                                            "(SD 1.5 / SDXL / FLUX.2 klein); a file whose layers match nothing "
                                            "here is refused with their names."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "How strongly the LoRA applies: 1 as trained, 0 off, negative "
                                                  "inverts it."}),
            },
        }

    def apply(self, pipe, lora, strength):
        if lora == NO_FILES:
            raise BonsaiRequestError("no LoRA chosen: put a .safetensors LoRA in ComfyUI's models/loras/ folder")
        out = dataclasses.replace(pipe, loras=(*pipe.loras, (host.lora_path(lora), float(strength))))
        out.engine()  # attach now: a file that fits nothing is this node's error, shown on this node
        return (out,)
