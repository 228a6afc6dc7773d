"""Tiny FLUX.2 [klein]-shaped transformers with binary weights, written in every public Bonsai
Image 4B layout, for importer and loader tests.

Importable by any test: ``from tests.flux2_fixtures import make_ground_truth, write_gguf_fixture, ...``.

The writers here are deliberately independent of ``bonsai_core.importers``: BFL names, the fused
qkv, the norm_out half swap, GGUF bytes, gemlite and MLX bit packing are all spelled out by hand,
so the importers are tested against a second implementation of the spec, not against themselves.
Only ``Q1Tensor`` (the project's Q1_0 container) is shared, as the ground-truth type.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonsai_core.quant.tensor import Q1Tensor

# num_layers 1, num_single_layers 2, 2 heads x 64 -> dim 128, hidden 384: every block linear's
# in_features (128, 384, 512) is a multiple of 128. axes_dims_rope sums to head_dim 64.
TINY_CONFIG = {
    "_class_name": "Flux2Transformer2DModel",
    "_diffusers_version": "0.36.0",
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 256,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [16, 16, 16, 16],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}

DOUBLE_PACKED = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
                 "ff_context.linear_in", "ff_context.linear_out"]
SINGLE_PACKED = ["attn.to_qkv_mlp_proj", "attn.to_out"]


def packed_names(config: dict = TINY_CONFIG) -> list[str]:
    names = [f"transformer_blocks.{i}.{m}.weight" for i in range(config["num_layers"]) for m in DOUBLE_PACKED]
    names += [f"single_transformer_blocks.{j}.{m}.weight"
              for j in range(config["num_single_layers"]) for m in SINGLE_PACKED]
    return names


def model_kwargs(config: dict) -> dict:
    return {k: (tuple(v) if k == "axes_dims_rope" else v) for k, v in config.items() if not k.startswith("_")}


def build_model(config: dict = TINY_CONFIG, state_dict: dict | None = None):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(**model_kwargs(config)).to(torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    return model


@torch.no_grad()
def forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    h = torch.randn(1, 16, cfg.in_channels, generator=g)
    ctx = torch.randn(1, 8, cfg.joint_attention_dim, generator=g)
    img_ids = torch.zeros(16, 4)
    img_ids[:, 1] = torch.arange(16) // 4
    img_ids[:, 2] = torch.arange(16) % 4
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8)
    return model(hidden_states=h, encoder_hidden_states=ctx, timestep=torch.tensor([0.7]),
                 img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


@dataclass
class GroundTruth:
    """What every layout must import to: diffusers names; bf16 dense tensors; Q1Tensor linears."""

    config: dict
    tensors: dict
    signs: dict = field(default_factory=dict)   # packed name -> bool [out, in] (True = +s)
    scales: dict = field(default_factory=dict)  # packed name -> fp16 [out, in/128]

    def dense(self, dtype=torch.float32) -> dict:
        return {n: (t.dequantize(dtype) if isinstance(t, Q1Tensor) else t.to(dtype)) for n, t in self.tensors.items()}


def make_ground_truth(seed: int = 0, config: dict = TINY_CONFIG) -> GroundTruth:
    """Random tiny model: block linears binary (sign x fp16 scale, scales also exact in bf16), rest bf16."""
    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed + 1)
    packed = set(packed_names(config))
    gt = GroundTruth(config=dict(config), tensors={})
    for name, p in model.state_dict().items():
        p = p.detach().clone()
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
            p = 1 + 0.1 * torch.randn(p.shape, generator=g)
        if name in packed:
            out, cols = p.shape
            signs = torch.rand(out, cols, generator=g) < 0.5
            s = 0.02 + 0.04 * torch.rand(out, cols // 128, generator=g)
            s = s.to(torch.bfloat16).to(torch.float16)  # exact in both bf16 and fp16
            if name == packed_names(config)[0]:
                s[0, 0] = 0.0  # one all-zero group: the edge case of every convention
            gt.signs[name], gt.scales[name] = signs, s
            gt.tensors[name] = Q1Tensor.from_signs(signs, s, (out, cols))
        else:
            gt.tensors[name] = p.to(torch.bfloat16)
    return gt


# ---------------------------------------------------------------------------------------------
# BFL names, spelled out (diffusers scripts/convert_flux2_to_diffusers.py, sd.cpp flux.hpp)
# ---------------------------------------------------------------------------------------------
def bfl_tensors(gt: GroundTruth) -> dict:
    """name -> ("bf16", tensor) | ("q1", signs, scales): the ground truth under BFL names."""
    T, cfg = gt.tensors, gt.config

    def dense(n):
        return ("bf16", T[n])

    def q1(*names):
        return ("q1", torch.cat([gt.signs[n] for n in names]), torch.cat([gt.scales[n] for n in names]))

    shift_scale = T["norm_out.linear.weight"]
    half = shift_scale.shape[0] // 2
    out = {
        "img_in.weight": dense("x_embedder.weight"),
        "txt_in.weight": dense("context_embedder.weight"),
        "time_in.in_layer.weight": dense("time_guidance_embed.timestep_embedder.linear_1.weight"),
        "time_in.out_layer.weight": dense("time_guidance_embed.timestep_embedder.linear_2.weight"),
        "double_stream_modulation_img.lin.weight": dense("double_stream_modulation_img.linear.weight"),
        "double_stream_modulation_txt.lin.weight": dense("double_stream_modulation_txt.linear.weight"),
        "single_stream_modulation.lin.weight": dense("single_stream_modulation.linear.weight"),
        "final_layer.linear.weight": dense("proj_out.weight"),
        # diffusers (scale, shift) -> BFL (shift, scale)
        "final_layer.adaLN_modulation.1.weight": ("bf16", torch.cat([shift_scale[half:], shift_scale[:half]])),
    }
    for i in range(cfg["num_layers"]):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out[b + "img_attn.qkv.weight"] = q1(d + "attn.to_q.weight", d + "attn.to_k.weight", d + "attn.to_v.weight")
        out[b + "txt_attn.qkv.weight"] = q1(d + "attn.add_q_proj.weight", d + "attn.add_k_proj.weight",
                                            d + "attn.add_v_proj.weight")
        out[b + "img_attn.proj.weight"] = q1(d + "attn.to_out.0.weight")
        out[b + "txt_attn.proj.weight"] = q1(d + "attn.to_add_out.weight")
        out[b + "img_mlp.0.weight"] = q1(d + "ff.linear_in.weight")
        out[b + "img_mlp.2.weight"] = q1(d + "ff.linear_out.weight")
        out[b + "txt_mlp.0.weight"] = q1(d + "ff_context.linear_in.weight")
        out[b + "txt_mlp.2.weight"] = q1(d + "ff_context.linear_out.weight")
        out[b + "img_attn.norm.query_norm.scale"] = dense(d + "attn.norm_q.weight")
        out[b + "img_attn.norm.key_norm.scale"] = dense(d + "attn.norm_k.weight")
        out[b + "txt_attn.norm.query_norm.scale"] = dense(d + "attn.norm_added_q.weight")
        out[b + "txt_attn.norm.key_norm.scale"] = dense(d + "attn.norm_added_k.weight")
    for j in range(cfg["num_single_layers"]):
        b, d = f"single_blocks.{j}.", f"single_transformer_blocks.{j}."
        out[b + "linear1.weight"] = q1(d + "attn.to_qkv_mlp_proj.weight")
        out[b + "linear2.weight"] = q1(d + "attn.to_out.weight")
        out[b + "norm.query_norm.scale"] = dense(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = dense(d + "attn.norm_k.weight")
    return out


# ---------------------------------------------------------------------------------------------
# GGUF (a hand-rolled GGUF v3 writer, like stable-diffusion.cpp's: no key/values at all)
# ---------------------------------------------------------------------------------------------
GGML_F32, GGML_F16, GGML_Q8_0, GGML_BF16, GGML_Q1_0 = 0, 1, 8, 30, 41


def q1_0_block_bytes(signs: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """[out, in] signs + [out, in/128] fp16 scales -> GGUF Q1_0 bytes [out, in/128*18] (d LE, then qs LSB first)."""
    out, cols = signs.shape
    nb = cols // 128
    bits = signs.numpy().astype(np.uint8).reshape(out, nb, 16, 8)
    qs = (bits << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)  # [out, nb, 16]
    d = scales.numpy().astype("<f2").view(np.uint8).reshape(out, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(out, nb * 18)


def write_raw_gguf(path, entries: list[tuple[str, list[int], int, bytes]], kv: dict | None = None,
                   alignment: int = 32) -> Path:
    """entries: (name, ne (innermost first), ggml type id, data bytes). Types are plain ints."""
    path = Path(path)
    kv = kv or {}
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(entries), len(kv)))
    for k, v in kv.items():  # string values only (type 8)
        kb, vb = k.encode(), v.encode()
        head += struct.pack("<Q", len(kb)) + kb + struct.pack("<IQ", 8, len(vb)) + vb
    offset, blobs = 0, []
    for name, ne, ttype, data in entries:
        nb = name.encode()
        head += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(ne))
        head += b"".join(struct.pack("<Q", n) for n in ne) + struct.pack("<IQ", ttype, offset)
        pad = (-len(data)) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head += b"\0" * ((-len(head)) % alignment)
    path.write_bytes(bytes(head) + b"".join(blobs))
    return path


def write_gguf_fixture(path, gt: GroundTruth, mod_q8_0: bool = False, prefix: str = "",
                       kv: dict | None = None) -> tuple[Path, dict]:
    """The community layout: BFL names, block linears Q1_0, everything else BF16; ``mod_q8_0`` stores
    the two double-stream modulation weights as Q8_0 (the ``mod_q8_0-q1_0`` variant).

    Returns (path, expected tensors after import: ground truth, with Q8_0 ones dequantized to bf16).
    """
    import gguf
    from gguf.quants import dequantize, quantize

    expected = dict(gt.tensors)
    entries = []
    for name, item in bfl_tensors(gt).items():
        if item[0] == "q1":
            signs, scales = item[1], item[2]
            entries.append((prefix + name, [signs.shape[1], signs.shape[0]], GGML_Q1_0,
                            q1_0_block_bytes(signs, scales).tobytes()))
            continue
        t = item[1]
        if mod_q8_0 and name.startswith("double_stream_modulation_"):
            x = t.to(torch.float32).numpy()
            q = quantize(x, gguf.GGMLQuantizationType.Q8_0)
            diff = name.replace(".lin.", ".linear.")
            expected[diff] = torch.from_numpy(dequantize(q, gguf.GGMLQuantizationType.Q8_0)).to(torch.bfloat16)
            entries.append((prefix + name, list(reversed(t.shape)), GGML_Q8_0, q.tobytes()))
            continue
        entries.append((prefix + name, list(reversed(t.shape)), GGML_BF16,
                        t.contiguous().view(torch.int16).numpy().tobytes()))
    return write_raw_gguf(path, entries, kv=kv), expected


# ---------------------------------------------------------------------------------------------
# gemlite (state_dict.pt + quantization_config.json, PrismML image-studio / mobiusml gemlite pack())
# ---------------------------------------------------------------------------------------------
def gemlite_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] -> W_q uint8 [in*bits/8, out]: W_q[k, r] holds q[r, k*E + i] at bit i*bits."""
    out, cols = codes.shape
    per = 8 // bits
    c = codes.to(torch.int32).reshape(out, cols // per, per)
    packed = (c << (torch.arange(per, dtype=torch.int32) * bits)).sum(-1)
    return packed.to(torch.uint8).t().contiguous()


def gemlite_metadata(bits: int, mode: int, meta_dtype: int) -> torch.Tensor:
    # scaled_activations, W_nbits, group_size, unpack_mask, elements_per_sample, input_dtype,
    # output_dtype, acc_dtype, meta_dtype, channel_scale_mode, W_group_mode, data_contiguous
    return torch.tensor([0, bits, 128, (1 << bits) - 1, 8 // bits, 1, 1, 0, meta_dtype, 0, mode, 1],
                        dtype=torch.int32)


def write_gemlite_fixture(root, gt: GroundTruth, convention: str = "mode4", scale_dtype=torch.float16,
                          fp32_perturb: bool = False, ternary: bool = False, nested: bool = False) -> tuple[Path, dict]:
    """A repo folder holding ``transformer-gemlite-int1/`` (``-int2`` when ``ternary``).

    convention: "mode4" (w = q*scale + zero: scale = 2s, zero = -s), "mode3" (w = (q - zero)*scale:
    scale = 2s, zero = 0.5), "mode4_negative" (scale = -2s, zero = +s, bits inverted), or
    "asymmetric" (scale = 2s, zero = -s/2: values -s/2, +3s/2, not sign x scale).
    ``fp32_perturb``: fp32 scales that are s*(1 + 2^-20), so the importer must round them to fp16.
    ``ternary``: bits 2, codes {0,1,2} with w = (q - 1)*s (mode 3, zero 1); some weights 0.
    Returns (repo path, expected dense-or-packed tensors).
    """
    root = Path(root)
    d = root / ("transformer-gemlite-int2" if ternary else "transformer-gemlite-int1")
    d.mkdir(parents=True, exist_ok=True)
    bits = 2 if ternary else 1
    meta_id = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[scale_dtype]
    sd: dict = {}
    expected = dict(gt.tensors)
    for name, t in gt.tensors.items():
        if not isinstance(t, Q1Tensor):
            sd[name] = t.clone()
            continue
        fqn = name[:-len(".weight")]
        signs, s = gt.signs[name], gt.scales[name].to(torch.float32)  # s: [out, G]
        out, cols = signs.shape
        if fp32_perturb:
            s = s * (1 + 2.0 ** -20)
        if ternary:
            g = torch.Generator().manual_seed(cols)
            zero_mask = torch.rand(out, cols, generator=g) < 0.3
            codes = torch.where(zero_mask, 1, torch.where(signs, 2, 0))
            scale, zero, mode = s, torch.ones_like(s), 3
            expected[name] = ((codes.to(torch.float32) - 1).view(out, -1, 128) * s.unsqueeze(-1)).view(out, cols)
        elif convention == "mode4":
            codes, scale, zero, mode = signs.to(torch.int32), 2 * s, -s, 4
        elif convention == "mode3":
            codes, scale, zero, mode = signs.to(torch.int32), 2 * s, torch.full_like(s, 0.5), 3
        elif convention == "mode4_negative":
            codes, scale, zero, mode = (~signs).to(torch.int32), -2 * s, s, 4
        elif convention == "asymmetric":
            codes, scale, zero, mode = signs.to(torch.int32), 2 * s, -s / 2, 4
        else:
            raise ValueError(convention)
        leaves = {
            "W_q": gemlite_pack(codes, bits),
            "scales": scale.t().contiguous().to(scale_dtype),  # [in/128, out]
            "zeros": zero.t().contiguous().to(scale_dtype),
            "metadata": gemlite_metadata(bits, mode, meta_id),
            "orig_shape": torch.tensor([out, cols], dtype=torch.int32),
        }
        if nested:
            sd[fqn] = leaves
        else:
            for k, v in leaves.items():
                sd[f"{fqn}.{k}"] = v
    torch.save(sd, d / "state_dict.pt")
    (d / "config.json").write_text(json.dumps(gt.config))
    (d / "quantization_config.json").write_text(json.dumps({
        "bits": bits, "group_size": 128, "packing_bitwidth": 8, "format": f"gemlite-int{bits}-g128",
        "quantized_fqns": [n[:-len(".weight")] for n in packed_names(gt.config)]}))
    (d / "gemlite_autotune.json").write_text("{}")
    return root, expected


# ---------------------------------------------------------------------------------------------
# MLX (transformer-packed-mflux/, MLX affine quantization bits 1 / 2, group 128)
# ---------------------------------------------------------------------------------------------
def mlx_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] -> uint32 [out, in*bits/32]: word j holds column j*(32/bits) + k at bit k*bits."""
    out, cols = codes.shape
    per = 32 // bits
    c = codes.to(torch.int64).reshape(out, cols // per, per)
    return (c << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1).to(torch.uint32)


def write_mlx_fixture(root, gt: GroundTruth, scale_dtype=torch.bfloat16, negative_scale: bool = False,
                      ternary: bool = False) -> tuple[Path, dict]:
    """A repo folder holding ``transformer-packed-mflux/``.

    Binary: q = 1 for +s, scales = 2s, biases = -s. ``negative_scale``: every other group written
    as scales = -2s, biases = +s with inverted codes (what MLX's own quantizer may emit).
    ``ternary``: bits 2, codes {0,1,2}, scales = s, biases = -s (w = -s, 0, +s).
    """
    from safetensors.torch import save_file

    root = Path(root)
    d = root / "transformer-packed-mflux"
    d.mkdir(parents=True, exist_ok=True)
    bits = 2 if ternary else 1
    st: dict = {}
    expected = dict(gt.tensors)
    for name, t in gt.tensors.items():
        if not isinstance(t, Q1Tensor):
            st[name] = t.contiguous()
            continue
        pre = name[:-len(".weight")]
        signs, s = gt.signs[name], gt.scales[name].to(torch.float32)
        out, cols = signs.shape
        if ternary:
            g = torch.Generator().manual_seed(cols + 1)
            codes = torch.where(torch.rand(out, cols, generator=g) < 0.3, 1, torch.where(signs, 2, 0))
            scales, biases = s, -s
            expected[name] = ((codes.to(torch.float32) - 1).view(out, -1, 128) * s.unsqueeze(-1)).view(out, cols)
        else:
            codes = signs.to(torch.int64)
            scales, biases = 2 * s, -s
            if negative_scale:
                neg = torch.zeros_like(s, dtype=torch.bool)
                neg[:, ::2] = True
                codes = torch.where(neg.repeat_interleave(128, dim=1), 1 - codes, codes)
                scales, biases = torch.where(neg, -scales, scales), torch.where(neg, -biases, biases)
        st[name] = mlx_pack(codes, bits)
        st[f"{pre}.scales"] = scales.to(scale_dtype).contiguous()
        st[f"{pre}.biases"] = biases.to(scale_dtype).contiguous()
    save_file(st, str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps(gt.config))
    (d / "quantization_config.json").write_text(json.dumps({"bits": bits, "group_size": 128, "skip_patterns": []}))
    (d / "checkpoint_manifest.json").write_text("{}")
    return root, expected


# ---------------------------------------------------------------------------------------------
# Unpacked (dense diffusers transformer)
# ---------------------------------------------------------------------------------------------
def write_unpacked_fixture(root, gt: GroundTruth, dtype=torch.bfloat16, sharded: bool = False,
                           override: dict | None = None) -> Path:
    """A repo folder holding ``transformer/`` with the dense weights (binary linears as +-s values)."""
    from safetensors.torch import save_file

    root = Path(root)
    d = root / "transformer"
    d.mkdir(parents=True, exist_ok=True)
    dense = {n: t.contiguous() for n, t in gt.dense(dtype).items()}
    dense.update(override or {})
    (d / "config.json").write_text(json.dumps(gt.config))
    if not sharded:
        save_file(dense, str(d / "diffusion_pytorch_model.safetensors"))
        return root
    names = sorted(dense)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    wmap = {}
    for fname, ns in shards.items():
        save_file({n: dense[n] for n in ns}, str(d / fname))
        wmap.update({n: fname for n in ns})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": wmap}))
    return root
