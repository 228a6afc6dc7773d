"""LoRA files made in tests, and the merged references they are checked against.

A LoRA is random low-rank ``down``/``up`` pairs in a real file layout (kohya ``lora_unet_`` /
``lora_te_`` names with ``alpha``, or diffusers/PEFT ``unet.<module>.lora_A.weight`` names with
diffusers' ``lora_adapter_metadata``). The reference model is built without the engine: every
Q1_0 tensor of the Bonsai file is dequantized here from the format's definition (18-byte blocks:
fp16 ``d`` then 16 bytes of signs, LSB first; bit 1 -> +d), loaded into a plain diffusers /
transformers model, and ``strength * alpha / rank * up @ down`` is added to each target weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# targets of every kind the engine has: 1-bit linear and conv (3x3 and 1x1), dense linear (attn2,
# kept in 16-bit by the policy), dense conv (conv_in), dense text-encoder linears
UNET_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.0.attentions.0.proj_in",
    "conv_in",
]
TE_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


def spec_dequantize(blocks: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Q1_0 blocks ``[rows, n_blocks * 18]`` -> float32 weight of ``shape``, from the definition."""
    rows = blocks.shape[0]
    b = blocks.numpy().reshape(rows, -1, 18)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
    qs = b[..., 2:]
    j = np.arange(128)
    bits = (qs[..., j >> 3] >> (j & 7)) & 1  # [rows, nb, 128]
    w = (2.0 * bits - 1.0) * d
    cols = int(np.prod(shape[1:]))
    return torch.from_numpy(w.reshape(rows, -1)[:, :cols].reshape(shape).copy())


def dequantized_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A Bonsai component file as a plain float32 state dict (Q1_0 expanded from the spec)."""
    from bonsai_core.checkpoint import is_bonsai_file, read_header

    # which tensors are Q1_0 and their logical shapes: the file's header, as written
    header = read_header(path) if is_bonsai_file(path) else {"tensors": {}}
    tensors = load_file(str(path))
    out = {}
    for k, t in tensors.items():
        info = header["tensors"].get(k, {})
        out[k] = spec_dequantize(t, info["shape"]) if info.get("type") == "Q1_0" else t.float()
    return out


def random_pairs(modules: dict[str, torch.nn.Module], rank: int, seed: int, scale: float = 0.05):
    """``{name: (down, up)}`` for each module: a linear ``[r, in]`` / ``[out, r]``, a conv
    ``[r, in, kh, kw]`` / ``[out, r, 1, 1]``."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, m in modules.items():
        w = m.weight
        shape = tuple(m._logical_shape()) if hasattr(m, "_logical_shape") else tuple(w.shape)
        down = torch.randn((rank, *shape[1:]), generator=g) * scale
        up = torch.randn((shape[0], rank) + ((1, 1) if len(shape) == 4 else ()), generator=g) * scale
        pairs[name] = (down, up)
    return pairs


def kohya_key(component: str, module: str) -> str:
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[component]
    return prefix + module.replace(".", "_")


def write_kohya(path: Path, pairs: dict[tuple[str, str], tuple], alphas: dict[tuple[str, str], float]) -> Path:
    sd = {}
    for (comp, module), (down, up) in pairs.items():
        k = kohya_key(comp, module)
        sd[f"{k}.lora_down.weight"] = down.contiguous()
        sd[f"{k}.lora_up.weight"] = up.contiguous()
        sd[f"{k}.alpha"] = torch.tensor(float(alphas[(comp, module)]))
    save_file(sd, str(path))
    return path


def write_peft(path: Path, pairs: dict[tuple[str, str], tuple], lora_alpha: float | None = None) -> Path:
    """diffusers' own layout (``save_lora_weights``): ``unet.<module>.lora_A.weight``; the alpha in the
    ``lora_adapter_metadata`` JSON, keyed ``unet.lora_alpha``."""
    sd = {}
    for (comp, module), (down, up) in pairs.items():
        sd[f"{comp}.{module}.lora_A.weight"] = down.contiguous()
        sd[f"{comp}.{module}.lora_B.weight"] = up.contiguous()
    meta = {"format": "pt"}
    if lora_alpha is not None:
        comps = {c for c, _ in pairs}
        meta["lora_adapter_metadata"] = json.dumps({f"{c}.lora_alpha": lora_alpha for c in comps}
                                                   | {f"{c}.r": 4 for c in comps})
    save_file(sd, str(path), metadata=meta)
    return path


def merge(state: dict[str, torch.Tensor], module: str, down: torch.Tensor, up: torch.Tensor, factor: float) -> None:
    """``W += factor * up @ down`` on ``state[module + '.weight']`` (convs through their [out, in*kh*kw] view)."""
    w = state[module + ".weight"]
    delta = up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()
    state[module + ".weight"] = (w.double() + factor * delta.reshape(w.shape)).float()


def reference_unet(folder: Path, merges: list[tuple[str, torch.Tensor, torch.Tensor, float]]):
    """A plain diffusers UNet with the Bonsai file's weights dequantized and the LoRAs merged in."""
    from diffusers import UNet2DConditionModel

    state = dequantized_state_dict(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")
    for module, down, up, factor in merges:
        merge(state, module, down, up, factor)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(folder) / "unet"))
    unet.load_state_dict(state)
    return unet.eval()


def reference_text_encoder(folder: Path, merges):
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig.from_pretrained(Path(folder) / "text_encoder"))
    path = next((Path(folder) / "text_encoder").glob("*.safetensors"))
    state = dequantized_state_dict(path)
    for module, down, up, factor in merges:
        merge(state, module, down, up, factor)
    missing, unexpected = te.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return te.eval()
