"""Tiny Qwen3 text encoders written in the public Bonsai Image 4B text encoder layouts
(as their Hub repos hold them), for tests of ``bonsai_core.importers.text_encoder``.

The quantizers and writers here are deliberately independent of the importer: MLX affine
quantization (min/max per group of ``in``, uint32 words LSB first) and HQQ (group-reshaped
matrix along an axis, ``(q - zero) * scale``, rows packed in slices) are spelled out by hand from
the public descriptions (ml-explore/mlx affine quantization docs; mobiusml/hqq
``hqq/core/quantize.py`` and ``hqq/core/bitpack.py``), and every writer returns the exact
dequantized values (float64) as ground truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


UNPICKLED: list[str] = []


def _record_unpickling():
    """What unpickling a ``NotATensor`` would run; a loader that unpickles leaves a mark in UNPICKLED."""
    UNPICKLED.append("NotATensor")
    return NotATensor.__new__(NotATensor)


class NotATensor:
    """Something torch.save pickles by reference (a call to ``_record_unpickling``) that weights_only must refuse."""

    def __reduce__(self):
        return (_record_unpickling, ())


def config_with(**changes) -> dict:
    c = json.loads(json.dumps(TINY_TE_CONFIG))
    c.update(changes)
    return c


def make_reference(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random fp32 Qwen3ForCausalLM state dict (norms randomised too; no lm_head when tied)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config))
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for n, t in model.state_dict().items():
        if n == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if t.dim() == 1:  # norms: away from 1 so a wrong norm would show
            sd[n] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            sd[n] = 0.05 * torch.randn(t.shape, generator=g)
    return sd


def linear_names(config: dict) -> list[str]:
    return [f"model.layers.{i}.{m}.weight" for i in range(config["num_hidden_layers"]) for m in LINEARS]


def build_reference_model(config: dict, sd: dict[str, torch.Tensor]):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    full = dict(sd)
    if config.get("tie_word_embeddings"):
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    model.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    return model


def hidden_states(model, seed: int = 3) -> tuple[torch.Tensor, ...]:
    """Every hidden state (embeddings, each layer) and, last, the logits (so lm_head is checked too)."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return (*out.hidden_states, out.logits)


# ---------------------------------------------------------------------------------------------
# MLX affine (hand-written)
# ---------------------------------------------------------------------------------------------
def mlx_quantize(w: torch.Tensor, bits: int = 4, group: int = 64, sdtype=torch.bfloat16):
    """w [out, in] -> (uint32 words [out, in*bits/32], scales, biases [out, in/group], exact dequant float64)."""
    out, cols = w.shape
    top = 2 ** bits - 1
    g = w.to(torch.float64).reshape(out, cols // group, group)
    lo, hi = g.min(-1).values, g.max(-1).values
    scales = ((hi - lo) / top).to(sdtype)
    biases = lo.to(sdtype)
    s, b = scales.to(torch.float64).unsqueeze(-1), biases.to(torch.float64).unsqueeze(-1)
    q = torch.where(s > 0, ((g - b) / torch.where(s > 0, s, 1)).round(), torch.zeros_like(g)).clamp(0, top)
    exact = (s * q + b).reshape(out, cols)
    per = 32 // bits
    codes = q.to(torch.int64).reshape(out, cols // per, per)
    words = torch.zeros(out, cols // per, dtype=torch.int64)
    for k in range(per):
        words |= codes[..., k] << (k * bits)
    return words.to(torch.uint32), scales, biases, exact


def write_mlx_te(root, config: dict, ref: dict[str, torch.Tensor], bits: int = 4, group: int = 64,
                 shards: int = 1, dirname: str = "text_encoder-mlx-4bit", sdtype=torch.bfloat16):
    """An MLX text encoder folder (like mlx-community/Qwen3-4B-4bit). -> (folder, exact values float64)."""
    from safetensors.torch import save_file

    d = Path(root) / dirname
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg["quantization"] = {"group_size": group, "bits": bits}
    cfg["quantization_config"] = {"group_size": group, "bits": bits}
    (d / "config.json").write_text(json.dumps(cfg))
    tensors, truth = {}, {}
    for n, t in ref.items():
        if t.dim() == 2:  # linears, embedding and lm_head are all quantized by mlx-lm
            words, scales, biases, exact = mlx_quantize(t, bits, group, sdtype)
            p = n[:-len(".weight")]
            tensors[n], tensors[f"{p}.scales"], tensors[f"{p}.biases"] = words, scales, biases
            truth[n] = exact
        else:
            tensors[n] = t.to(torch.bfloat16)
            truth[n] = tensors[n].to(torch.float64)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        names = sorted(tensors)
        wmap = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(d / fname))
            wmap.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return d, truth


# ---------------------------------------------------------------------------------------------
# HQQ (hand-written)
# ---------------------------------------------------------------------------------------------
def hqq_quantize(w: torch.Tensor, nbits: int = 4, group: int = 64, axis: int = 1, sdtype=torch.float16):
    """w [out, in] -> (packed uint8, scale, zero, exact dequant float64 [out, in]).

    Group-reshaped matrix [-1, group] (axis 1) or [group, -1] (axis 0); min/max along ``axis``;
    q = round(W/scale + zero); stored scale is the dequant step, zero is a float (not rounded).
    Rows packed in 8/nbits equal slices, the first slice in the highest bits.
    """
    top = 2 ** nbits - 1
    W = w.to(torch.float64)
    W = W.reshape(-1, group) if axis == 1 else W.reshape(group, -1)
    lo, hi = W.amin(dim=axis, keepdim=True), W.amax(dim=axis, keepdim=True)
    step = (hi - lo) / top
    scale = step.to(sdtype)
    zero = (-lo / step).to(sdtype)
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    q = (W / s + z).round().clamp(0, top)
    exact = ((q - z) * s).reshape(w.shape)
    per = 8 // nbits
    rows = q.shape[0] // per
    qi = q.to(torch.int64)
    packed = torch.zeros(rows, q.shape[1], dtype=torch.int64)
    for k in range(per):
        packed |= qi[k * rows:(k + 1) * rows] << (nbits * (per - 1 - k))
    return packed.to(torch.uint8), scale, zero, exact


def _encode(v):
    """hqq's safetensors encoding of a meta value, written by hand (ints int32, bools uint8, strings char codes)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, torch.Size):
        return torch.tensor(list(v))
    if isinstance(v, torch.dtype):
        v = str(v)
    if isinstance(v, bool):
        return torch.tensor(int(v), dtype=torch.uint8)
    if isinstance(v, int):
        return torch.tensor(v, dtype=torch.int32)
    if isinstance(v, str):
        return torch.tensor([ord(c) for c in v], dtype=torch.uint8)
    raise TypeError(type(v))


def hqq_leaves(w: torch.Tensor, nbits=4, group=64, axis=1, encoded=False, view_as_float=False):
    packed, scale, zero, exact = hqq_quantize(w, nbits, group, axis)
    W_q = packed.view(torch.float16) if view_as_float else packed
    leaves = {
        "W_q": W_q, "nbits": nbits, "group_size": group, "shape": torch.Size(w.shape), "scale": scale,
        "zero": zero, "axis": axis, "packing": {8: "8bit_u8", 4: "4bit_u8", 2: "2bit_u8"}[nbits],
        "unpack_view_dtype": torch.uint8, "view_as_float": view_as_float, "compute_dtype": torch.float16,
        "quant_scale": False, "quant_zero": False, "offload_meta": False, "stores_quant_config": True,
        "channel_wise": True, "optimize": True, "round_zero": False,
    }
    if encoded:
        leaves = {k: _encode(v) for k, v in leaves.items()}
        leaves["encoded_state_dict"] = _encode(True)
    return leaves, exact


def write_hqq_te(root, config: dict, ref: dict[str, torch.Tensor], nbits=4, group=64, axis=1, encoded=False,
                 view_as_float=False, dirname="text_encoder-hqq-4bit", tied_head_copy=True):
    """An HQQ save folder: config.json + qmodel.pt = {leaf module: state dict}. -> (folder, exact values)."""
    d = Path(root) / dirname
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    lin = set(linear_names(config))
    modules, truth = {}, {}
    for n, t in ref.items():
        mod, leaf = n.rsplit(".", 1)
        if n in lin:
            modules[mod], truth[n] = hqq_leaves(t, nbits, group, axis, encoded, view_as_float)
        else:
            v = t.to(torch.float16)
            modules.setdefault(mod, {})[leaf] = v
            truth[n] = v.to(torch.float64)
    if config.get("tie_word_embeddings") and tied_head_copy:
        # hqq serializes every leaf module: the tied lm_head shares the embedding's tensor
        modules["lm_head"] = {"weight": modules["model.embed_tokens"]["weight"]}
    torch.save(modules, d / "qmodel.pt")
    return d, truth
