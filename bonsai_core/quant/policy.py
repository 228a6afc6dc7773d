"""The precision policy: which layers become Q1_0 and which stay in 16-bit, and why.

Pure 1-bit weights ruin denoising, so a policy names by module-name patterns (``fnmatch`` style,
matched against the full dotted module name) what stays in high precision. Everything else that
is a ``Linear`` or ``Conv2d`` with at least one whole group (128 inputs) is quantized.
Every decision carries its reason, and the decisions are written into the checkpoint.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from .q1_0 import GROUP_SIZE
from .q4_affine import GROUP_SIZE as Q4_GROUP

QTYPES = ("Q1_0", "Q4_AFFINE")

# SD-style UNets (diffusers UNet2DConditionModel names).
SD_UNET_KEEP = (
    "*attn2.*",             # cross-attention: where the prompt enters; 1-bit here loses the prompt
    "*norm*",               # GroupNorm / LayerNorm (also matched by type below)
    "time_embedding.*", "time_embed*", "class_embedding*", "add_embedding*",
    "conv_in", "conv_out",  # first and last convs: tiny, and errors there go straight to pixels
)

# FLUX.2 [klein] transformers (diffusers Flux2Transformer2DModel names), as Bonsai Image 4B keeps them
# (PrismML whitepaper Table 13; BONSAI-IMAGE-4B.md section 1): embedders, modulation, norm_out, proj_out.
FLUX2_KEEP = (
    "x_embedder", "context_embedder", "time_guidance_embed.*",
    "*modulation*", "norm_out*", "proj_out",
    "*norm*",
)


@dataclass(frozen=True)
class Decision:
    name: str
    quantize: bool
    reason: str


@dataclass
class PrecisionPolicy:
    """What to keep in high precision. ``keep`` patterns win over everything."""

    name: str = "sd_unet_default"
    keep: tuple[str, ...] = SD_UNET_KEEP
    min_in_features: int = GROUP_SIZE
    quantize_types: tuple[type, ...] = field(default=(nn.Linear, nn.Conv2d))
    qtype: str = "Q1_0"  # or "Q4_AFFINE" (4-bit, group 64: text encoders; Linear only)

    def decide(self, name: str, module: nn.Module) -> Decision | None:
        """Decision for one module, or None when it is not a weight layer at all."""
        if not isinstance(module, self.quantize_types):
            return None
        for pattern in self.keep:
            if fnmatch.fnmatchcase(name, pattern):
                return Decision(name, False, f"kept: matches policy pattern {pattern!r}")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return Decision(name, False, f"kept: grouped conv (groups={module.groups})")
        fan_in = module.weight.shape[1:].numel()  # from the shape: never reads (or dequantizes) the weight
        group = Q4_GROUP if self.qtype == "Q4_AFFINE" else GROUP_SIZE
        if fan_in < self.min_in_features:
            return Decision(name, False, f"kept: {fan_in} inputs is less than one group of {group}")
        if self.qtype == "Q4_AFFINE":
            if not isinstance(module, nn.Linear):
                return Decision(name, False, "kept: Q4_AFFINE is for linears")
            if fan_in % group:
                return Decision(name, False, f"kept: {fan_in} inputs is not a whole number of groups of {group}")
        return Decision(name, True, f"quantized: {self.qtype}")

    def plan(self, model: nn.Module) -> list[Decision]:
        out = []
        for name, module in model.named_modules():
            dec = self.decide(name, module)
            if dec is not None:
                out.append(dec)
        return out

    def to_dict(self) -> dict:
        out = {"name": self.name, "keep": list(self.keep), "min_in_features": self.min_in_features,
               "quantize_types": [t.__name__ for t in self.quantize_types]}
        if self.qtype != "Q1_0":  # a Q1_0 policy is written as before
            out["qtype"] = self.qtype
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionPolicy":
        """The inverse of ``to_dict``; an unknown weight type or module type is refused (ValueError)."""
        types = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}
        unknown = [t for t in d.get("quantize_types", []) if t not in types]
        if unknown or str(d.get("qtype", "Q1_0")) not in QTYPES:
            raise ValueError(f"policy {d.get('name', 'custom')!r}: qtype {d.get('qtype', 'Q1_0')!r} / module types "
                             f"{unknown or 'ok'}; known qtypes are {', '.join(QTYPES)}, module types {', '.join(types)}")
        return cls(name=d.get("name", "custom"), keep=tuple(d.get("keep", ())),
                   min_in_features=int(d.get("min_in_features", GROUP_SIZE)),
                   quantize_types=tuple(types[t] for t in d.get("quantize_types", ["Linear", "Conv2d"])),
                   qtype=str(d.get("qtype", "Q1_0")))


# Text encoders (CLIP, Qwen3) at 4 bits: embeddings, norms and the output projections stay 16-bit.
TEXT_ENCODER_KEEP = ("*embed*", "*norm*", "text_projection", "lm_head")


def text_encoder_policy() -> PrecisionPolicy:
    """Every linear of a text encoder with whole groups of 64 inputs becomes Q4_AFFINE."""
    return PrecisionPolicy(name="text_encoder_q4", keep=TEXT_ENCODER_KEEP, min_in_features=Q4_GROUP,
                           quantize_types=(nn.Linear,), qtype="Q4_AFFINE")


def default_policy(family: str) -> PrecisionPolicy:
    if family == "flux2_klein":
        return PrecisionPolicy(name="flux2_klein_default", keep=FLUX2_KEEP)
    if family == "sd_unet":
        return PrecisionPolicy()
    raise ValueError(f"no default policy for family {family!r}")


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds (a ``Q1Tensor`` says so itself: bits + scales, not numel x element size)."""
    return t.nbytes
