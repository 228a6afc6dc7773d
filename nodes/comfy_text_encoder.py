"""Every ComfyUI internal the Bonsai Text Encoder Loader needs, in one file, behind a version check.

It builds ComfyUI's own ``CLIP`` object for FLUX.2 [klein] (what ``CLIPLoader`` type ``flux2`` builds
for a Qwen3-4B file) from a Bonsai text encoder whose linears (and embedding) stay 4-bit: ComfyUI's
``Flux2TEModel`` / ``KleinTokenizer`` / ``llama.Qwen3_4B`` with the sizes of the file's own config
(``CLIPLoader`` always builds a full Qwen3-4B), and layer classes that compute from the packed
weights through ``bonsai_core``'s kernel contract. Used (ComfyUI 0.33.0, commit 783545f6):

* ``comfy.sd.CLIP(target, state_dict=..., model_options={"custom_operations": ...}, disable_dynamic=True)``
  (plain ``ModelPatcher``: ComfyUI's dynamic-VRAM path maps weights it does not know);
* ``comfy.supported_models_base.ClipTarget``; ``comfy.sd1_clip.SDClipModel`` (``textmodel_json_config``,
  ``model_class``, ``layer``; its ``load_sd`` assigns the file's tensors, never copies them into dense
  parameters);
* ``comfy.text_encoders.flux.Flux2TEModel`` and ``KleinTokenizer``; ``comfy.text_encoders.llama.Qwen3_4B``;
* ``comfy.ops.manual_cast`` (its ``Linear`` / ``Embedding``, whose forward we take over for packed weights).
"""

from __future__ import annotations

import torch

from ..bonsai_core.errors import BonsaiError
from ..bonsai_core.quant import kernels
from ..bonsai_core.quant.tensor import PackedTensor
from .comfy_native import comfy_version

MIN_VERSION = (0, 33, 0)
QWEN3_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim")


def _version() -> tuple[int, ...] | None:
    """ComfyUI's version as numbers (None: unknown or not plain numbers)."""
    try:
        return tuple(int(p) for p in comfy_version().split(".")[:3])
    except ValueError:  # "unknown", or a suffixed version
        return None


def check_version() -> None:
    """ComfyUI with FLUX.2 [klein] text encoding (0.33.0 or later), else a BonsaiError saying so."""
    version = _version()
    try:
        import comfy.text_encoders.flux as flux
        import comfy.text_encoders.llama as llama

        missing = [n for n in ("Flux2TEModel", "KleinTokenizer") if not hasattr(flux, n)]
        missing += [] if hasattr(llama, "Qwen3_4B") else ["Qwen3_4B"]
    except ImportError as exc:
        missing = [str(exc)]
    if missing or (version is not None and version < MIN_VERSION):
        have = ".".join(map(str, version)) if version else "unknown"
        raise BonsaiError(f"Bonsai Text Encoder Loader needs ComfyUI {'.'.join(map(str, MIN_VERSION))} or later "
                          f"(FLUX.2 [klein] text encoding); this ComfyUI is {have} (lacks {', '.join(missing) or '-'}). "
                          "Update ComfyUI, or use the Bonsai Loader and Bonsai Sampler, which need no ComfyUI internals")


def _ops():
    import comfy.ops

    base = comfy.ops.manual_cast

    class BonsaiOps(base):
        """ComfyUI's manual-cast layers; a layer holding a packed weight computes from it."""

        class Linear(base.Linear):
            def forward(self, x, *args, **kwargs):
                if isinstance(self.weight, PackedTensor):
                    bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
                    return kernels.linear(x, self.weight.to(x.device), bias)
                return super().forward(x, *args, **kwargs)

        class Embedding(base.Embedding):
            def forward(self, input, out_dtype=None):
                if isinstance(self.weight, PackedTensor):  # only the looked-up rows are expanded
                    w = self.weight.to(input.device)
                    return torch.nn.functional.embedding(input, w).to(out_dtype or w.dtype)
                return super().forward(input, out_dtype=out_dtype)

    return BonsaiOps


def build_clip(config: dict, tensors: dict[str, torch.Tensor], layers: tuple[int, ...], dtype=None):
    """ComfyUI's ``CLIP`` (FLUX.2 [klein] conditioning: hidden states ``layers`` side by side) for a
    Qwen3 of ``config``'s sizes holding ``tensors`` (Qwen3ForCausalLM names)."""
    check_version()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.llama as llama

    if config.get("model_type") != "qwen3":
        raise BonsaiError(f"Bonsai Text Encoder Loader builds Qwen3 text encoders (FLUX.2 [klein]); this one is "
                          f"{config.get('model_type')!r}")
    sizes = {k: config[k] for k in QWEN3_FIELDS if config.get(k) is not None}
    head_dim = int(sizes.pop("head_dim", sizes["hidden_size"] // sizes["num_attention_heads"]))
    out_layers = [int(v) for v in layers]

    class SizedQwen3(llama.Qwen3_4B):
        """``llama.Qwen3_4B`` of the file's sizes: its config's ``head_dim`` is a class constant (128),
        not a field, so it is set on the config before the layers are built."""

        def __init__(self, config_dict, dtype, device, operations):
            super(llama.Qwen3_4B, self).__init__()
            config = llama.Qwen3_4BConfig(**config_dict)
            config.head_dim = head_dim
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class BonsaiQwen3(comfy.sd1_clip.SDClipModel):
        def load_sd(self, sd):  # assigned, not copied: the file's packed tensors become the parameters
            return self.transformer.load_state_dict(sd, strict=False, assign=True)

        def __init__(self, device="cpu", layer=None, layer_idx=None, dtype=None, attention_mask=True, model_options={}):
            super().__init__(device=device, layer=out_layers, layer_idx=layer_idx, textmodel_json_config=dict(sizes),
                             dtype=dtype, special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                             model_class=SizedQwen3, enable_attention_masks=attention_mask,
                             return_attention_masks=attention_mask, model_options=model_options)

    class BonsaiKleinTE(flux.Flux2TEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="qwen3_4b", model_options=model_options,
                             clip_model=BonsaiQwen3)

    sd = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # ComfyUI's Qwen3 has no LM head
    target = comfy.supported_models_base.ClipTarget(flux.KleinTokenizer, BonsaiKleinTE)
    options = {"custom_operations": _ops()}
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.CLIP(target=target, state_dict=[sd], model_options=options, disable_dynamic=True)
    return clip
