"""ComfyUI node classes: thin adapters over ``bonsai_core`` (inputs in, one engine call, outputs out).

ComfyUI internals the nodes touch are all in ``host.py``, and for the text encoder loader (ComfyUI's
CLIP for a 4-bit Qwen3) in ``comfy_text_encoder.py``.
"""

from .guardrail import BonsaiGuardrail
from .loader import BonsaiLoader
from .lora import BonsaiLoRA
from .sampler import BonsaiSampler
from .text_encoder_loader import BonsaiTextEncoderLoader
from .text_overlay import BonsaiTextOverlay

NODE_CLASS_MAPPINGS = {
    "BonsaiLoader": BonsaiLoader,
    "BonsaiSampler": BonsaiSampler,
    "BonsaiGuardrail": BonsaiGuardrail,
    "BonsaiTextOverlay": BonsaiTextOverlay,
    "BonsaiTextEncoderLoader": BonsaiTextEncoderLoader,
    "BonsaiLoRA": BonsaiLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BonsaiLoader": "Bonsai Loader",
    "BonsaiSampler": "Bonsai Sampler",
    "BonsaiGuardrail": "Bonsai Guardrail",
    "BonsaiTextOverlay": "Bonsai Text Overlay",
    "BonsaiTextEncoderLoader": "Bonsai Text Encoder Loader",
    "BonsaiLoRA": "Bonsai LoRA",
}
