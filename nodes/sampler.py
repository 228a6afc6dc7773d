"""Bonsai Sampler: BONSAI_PIPE + prompt and settings -> IMAGE and its metadata."""

from __future__ import annotations

import json

from ..bonsai_core.sampling import SAMPLERS
from . import host

MAX_SEED = 2**64 - 1


class BonsaiSampler:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Turns a prompt into images with a Bonsai model. Image i of a batch uses seed + i, so any one can "
                   "be made again alone. The progress bar moves while prompts encode, at every step (with a "
                   "preview) and during the VAE decode; Cancel stops it within one step.")
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "metadata")
    OUTPUT_TOOLTIPS = ("The images, [batch, height, width, 3], values 0-1.",
                       "JSON: prompt, seeds, sizes, sampler, timings, memory and guardrail warnings.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": ("BONSAI_PIPE", {"tooltip": "The model, from Bonsai Loader."}),
                "prompt": ("STRING", {"multiline": True, "default": "a bonsai tree on a rock, soft morning light",
                                      "tooltip": "What to draw. SD models read 77 tokens; the rest is cut (the "
                                                 "metadata warns)."}),
                "negative": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "What to avoid. Empty: a default negative is used. Ignored by "
                                                   "guidance-distilled models (FLUX.2 klein)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "The noise seed; the same seed and settings give the same image."}),
                "steps": ("INT", {"default": 24, "min": 1, "max": 150,
                                  "tooltip": "Denoising steps: 20-28 for SD-style models, 4 for Bonsai Image 4B."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance: how strongly to follow the prompt (7.5 for "
                                             "SD; 1.0 for guidance-distilled models)."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                                  "tooltip": "Image width in pixels, a multiple of 8 (32 for FLUX.2 klein); over "
                                             "768 is refused for SD models: upscale afterwards."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                                   "tooltip": "Image height in pixels, as width."}),
                "sampler": (list(SAMPLERS), {"default": "dpmpp_2m",
                                             "tooltip": "euler, or dpmpp_2m (DPM++ 2M: sharper at few steps)."}),
                "karras": ("BOOLEAN", {"default": False,
                                       "tooltip": "Karras sigma spacing (SD models only)."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 16,
                                  "tooltip": "How many images, with seeds seed, seed+1, ..."}),
            },
        }

    def sample(self, pipe, prompt, negative, seed, steps, cfg, width, height, sampler, karras, batch):
        engine = pipe.engine()
        progress = host.Progress(steps, preview=engine.preview)
        result = engine.generate(prompt, negative, steps=steps, guidance=cfg, width=width, height=height, seed=seed,
                                 sampler=sampler, karras=karras, batch=batch, callback=progress.step,
                                 on_stage=progress.stage)
        return (result.tensor, json.dumps(result.metadata, indent=1))
