"""ComfyUI node classes: thin adapters over ``bonsai_core`` (inputs in, one engine call, outputs out).

ComfyUI internals the nodes touch are in ``host.py`` (stable modules), ``comfy_native.py`` (the
native MODEL: ops, patcher, loader) and ``comfy_text_encoder.py`` (ComfyUI's CLIP for a 4-bit Qwen3),
the last two version-checked.
"""

from .guardrail import BonsaiGuardrail
from .loader import BonsaiLoader
from .lora import BonsaiLoRA
from .native_loader import BonsaiDiffusionModelLoader
from .sampler import BonsaiSampler
from .text_encoder_loader import BonsaiTextEncoderLoader
from .text_overlay import BonsaiTextOverlay

NODE_CLASS_MAPPINGS = {
    "BonsaiLoader": BonsaiLoader,
    "BonsaiSampler": BonsaiSampler,
    "BonsaiGuardrail": BonsaiGuardrail,
    "BonsaiTextOverlay": BonsaiTextOverlay,
    "BonsaiDiffusionModelLoader": BonsaiDiffusionModelLoader,
    "BonsaiTextEncoderLoader": BonsaiTextEncoderLoader,
    "BonsaiLoRA": BonsaiLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BonsaiLoader": "Bonsai Loader",
    "BonsaiSampler": "Bonsai Sampler",
    "BonsaiGuardrail": "Bonsai Guardrail",
    "BonsaiTextOverlay": "Bonsai Text Overlay",
    "BonsaiDiffusionModelLoader": "Bonsai Diffusion Model Loader",
    "BonsaiTextEncoderLoader": "Bonsai Text Encoder Loader",
    "BonsaiLoRA": "Bonsai LoRA",
}
