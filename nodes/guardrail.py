"""Bonsai Guardrail: check size, prompt and steps before sampling; warn, clamp or refuse."""

from __future__ import annotations

from ..bonsai_core.config import FAMILY_DEFAULTS
from ..bonsai_core.guardrails import MODES, Request, check_request


class BonsaiGuardrail:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Checks a request before any compute is spent: size (multiple of 8, longest side 768 for SD), "
                   "prompt length in the model's own tokens, step count. warn keeps the values and reports, clamp "
                   "changes them to the nearest allowed ones, refuse stops the workflow with the reason. Wire its "
                   "outputs into Bonsai Sampler.")
    RETURN_TYPES = ("INT", "INT", "STRING", "INT", "STRING")
    RETURN_NAMES = ("width", "height", "prompt", "steps", "report")
    OUTPUT_TOOLTIPS = ("The checked width.", "The checked height.", "The checked prompt (cut to fit in clamp mode).",
                       "The checked steps.", "What was checked, warned about and changed, in words.")
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 8,
                                  "tooltip": "The width you want."}),
                "height": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 8,
                                   "tooltip": "The height you want."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The prompt to check against the model's token limit."}),
                "steps": ("INT", {"default": 24, "min": 0, "max": 1000,
                                  "tooltip": "The steps you want."}),
                "mode": (list(MODES), {"default": "clamp",
                                       "tooltip": "warn: keep and report; clamp: fix to the nearest allowed value; "
                                                  "refuse: stop with the reason."}),
            },
            "optional": {
                "pipe": ("BONSAI_PIPE", {"tooltip": "The model: its tokenizer, limits and memory are checked. "
                                                    "Without it, the SD family's limits (no token count)."}),
            },
        }

    def check(self, width, height, prompt, steps, mode, pipe=None):
        if pipe is not None:
            report = pipe.engine().check(prompt, steps=steps, width=width, height=height, mode=mode)
        else:
            req = Request(prompt=prompt, width=width, height=height, steps=steps)
            report = check_request(req, family=FAMILY_DEFAULTS["sd_unet"], mode=mode)
        r = report.request
        return (r.width, r.height, r.prompt, r.steps, report.text())
