"""FLUX.2 [klein] transformer tensor names: BFL / sd.cpp / ComfyUI  <->  diffusers.

The common form of every importer uses the diffusers ``Flux2Transformer2DModel`` state-dict
names (diffusers ``src/diffusers/models/transformers/transformer_flux2.py``). Single-file and GGUF
checkpoints use Black Forest Labs' original names. The correspondence below follows diffusers'
``scripts/convert_flux2_to_diffusers.py`` (and the same table in
``loaders/single_file_utils.py``) and leejet/stable-diffusion.cpp ``src/model/diffusion/flux.hpp``:

* ``img_in`` -> ``x_embedder``; ``txt_in`` -> ``context_embedder``;
  ``time_in.in_layer``/``out_layer`` -> ``time_guidance_embed.timestep_embedder.linear_1``/``linear_2``
  (``guidance_in`` likewise to ``guidance_embedder``, absent in Klein);
* ``double_stream_modulation_img.lin`` -> ``double_stream_modulation_img.linear`` (also ``_txt`` and
  ``single_stream_modulation``);
* ``final_layer.linear`` -> ``proj_out``; ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear``
  with its two halves (rows) swapped: BFL orders (shift, scale), diffusers (scale, shift);
* ``double_blocks.N.img_attn.qkv`` = rows of ``to_q, to_k, to_v`` stacked on dim 0
  (``txt_attn.qkv`` = ``add_q_proj, add_k_proj, add_v_proj``). Splitting a block-quantized fused
  weight is exact: Q1_0 blocks run along ``in`` and never cross rows;
* ``img_attn.proj`` -> ``attn.to_out.0``; ``txt_attn.proj`` -> ``attn.to_add_out``;
  ``img_mlp.0``/``.2`` -> ``ff.linear_in``/``linear_out``; ``txt_mlp.*`` -> ``ff_context.*``;
  ``{img,txt}_attn.norm.{query,key}_norm.scale`` -> ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}`` ``.weight``;
* ``single_blocks.N.linear1`` -> ``attn.to_qkv_mlp_proj``; ``linear2`` -> ``attn.to_out``;
  ``norm.{query,key}_norm.scale`` -> ``attn.norm_{q,k}.weight``.

Row operations (split, concatenate, swap halves) work on dense tensors and on ``Q1Tensor``
alike, so a Q1_0 tensor is renamed without being dequantized.
"""

from __future__ import annotations

import re
from typing import Union

import torch

from ..quant.tensor import Q1Tensor

Tensorish = Union[torch.Tensor, Q1Tensor]

# A prefix some single-file checkpoints put in front of every transformer tensor.
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# ---------------------------------------------------------------------------------------------
# The linears that Bonsai Image 4B stores as binary codes (spec section 1), diffusers names.
# ---------------------------------------------------------------------------------------------
PACKED_LINEAR_RE = re.compile(
    r"^(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
    r"|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out))\.weight$"
)


def is_packed_linear(name: str) -> bool:
    """True for the diffusers names of the block linears that Bonsai models store as binary codes."""
    return PACKED_LINEAR_RE.match(name) is not None


# ---------------------------------------------------------------------------------------------
# One-to-one renames
# ---------------------------------------------------------------------------------------------
_TOP_RENAMES = {  # BFL module path -> diffusers module path (parameter suffix kept)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # + swap halves (see SWAPPED_HALVES)
}
_DOUBLE_RENAMES = {  # inside double_blocks.N / transformer_blocks.N
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_DOUBLE_FUSED = {  # fused BFL qkv -> the three diffusers projections, in row order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_RENAMES = {  # inside single_blocks.N / single_transformer_blocks.N
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_NORM_MODULES_BFL = ("query_norm", "key_norm")  # their parameter is ``.scale`` in BFL, ``.weight`` in diffusers

SWAPPED_HALVES_DIFFUSERS = "norm_out.linear"
SWAPPED_HALVES_BFL = "final_layer.adaLN_modulation.1"

_INV_TOP = {v: k for k, v in _TOP_RENAMES.items()}
_INV_DOUBLE = {v: k for k, v in _DOUBLE_RENAMES.items()}
_INV_SINGLE = {v: k for k, v in _SINGLE_RENAMES.items()}
_INV_FUSED = {part: (fused, i) for fused, parts in _DOUBLE_FUSED.items() for i, part in enumerate(parts)}

_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")
_DIFF_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(.+)\.(weight|bias)$")


def strip_bfl_prefix(name: str) -> str:
    for p in BFL_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def bfl_name_to_diffusers(name: str) -> list[str] | None:
    """Diffusers name(s) of one BFL tensor name: three names for a fused qkv, else one.

    Returns ``None`` for a name that is not part of the FLUX.2 transformer. Row transforms (the
    qkv split, the norm_out half swap) are not applied here: see ``bfl_to_diffusers``.
    """
    name = strip_bfl_prefix(name)
    m = _BLOCK_RE.match(name)
    if m:
        kind, idx, inner, param = m.groups()
        if param == "scale":
            if not inner.endswith(_NORM_MODULES_BFL):
                return None
            param = "weight"
        elif inner.endswith(_NORM_MODULES_BFL):
            return None  # BFL norms carry ``.scale``, never ``.weight``
        if kind == "double_blocks":
            if inner in _DOUBLE_FUSED:
                return [f"transformer_blocks.{idx}.{p}.{param}" for p in _DOUBLE_FUSED[inner]]
            new = _DOUBLE_RENAMES.get(inner)
            return None if new is None else [f"transformer_blocks.{idx}.{new}.{param}"]
        new = _SINGLE_RENAMES.get(inner)
        return None if new is None else [f"single_transformer_blocks.{idx}.{new}.{param}"]
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_RENAMES:
        return [f"{_TOP_RENAMES[m.group(1)]}.{m.group(2)}"]
    return None


def split_by_naming(tensors: dict) -> tuple[dict, dict]:
    """``(bfl_named, diffusers_named)``: a GGUF may carry either naming (or, wrongly, both)."""
    diff = {n: t for n, t in tensors.items() if diffusers_name_to_bfl(n) is not None}
    return {n: t for n, t in tensors.items() if n not in diff}, diff


def diffusers_name_to_bfl(name: str) -> tuple[str, int] | None:
    """The BFL name holding a diffusers tensor, and which third of a fused qkv it is (-1 if none).

    Returns ``None`` for a name that is not part of the FLUX.2 transformer.
    """
    m = _DIFF_BLOCK_RE.match(name)
    if m:
        kind, idx, inner, param = m.groups()
        is_norm = inner.split(".")[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
        if is_norm and param != "weight":
            return None
        if kind == "transformer_blocks":
            if inner in _INV_FUSED:
                fused, third = _INV_FUSED[inner]
                return f"double_blocks.{idx}.{fused}.{param}", third
            old = _INV_DOUBLE.get(inner)
            if old is None:
                return None
        else:
            old = _INV_SINGLE.get(inner)
            if old is None:
                return None
            kind = "single_blocks"
        kind = "double_blocks" if kind == "transformer_blocks" else kind
        return f"{kind}.{idx}.{old}.{'scale' if is_norm else param}", -1
    m = _TOP_RE.match(name)
    if m and m.group(1) in _INV_TOP:
        return f"{_INV_TOP[m.group(1)]}.{m.group(2)}", -1
    return None


# ---------------------------------------------------------------------------------------------
# Row operations on dense tensors and Q1Tensor
# ---------------------------------------------------------------------------------------------
def shape_of(t: Tensorish) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Q1Tensor) else tuple(int(s) for s in t.shape)


def split_rows(t: Tensorish, parts: int) -> list[Tensorish]:
    """Split along dim 0 into ``parts`` equal pieces (exact for Q1Tensor: blocks never cross rows)."""
    rows = shape_of(t)[0]
    if rows % parts:
        raise ValueError(f"{rows} rows do not split into {parts} equal parts")
    n = rows // parts
    if isinstance(t, Q1Tensor):
        return [Q1Tensor(t.qs[i * n:(i + 1) * n].clone(), t.d[i * n:(i + 1) * n].clone(),
                             (n, *t.shape[1:])) for i in range(parts)]
    return [t[i * n:(i + 1) * n].clone() for i in range(parts)]


def cat_rows(ts: list[Tensorish]) -> Tensorish:
    """Concatenate along dim 0; all parts must be of one kind (all packed, or all dense of one dtype)."""
    if all(isinstance(t, Q1Tensor) for t in ts):
        tails = {t.shape[1:] for t in ts}
        if len(tails) != 1:
            raise ValueError(f"packed parts have different shapes {[t.shape for t in ts]}")
        return Q1Tensor(torch.cat([t.qs for t in ts]), torch.cat([t.d for t in ts]),
                            (sum(t.shape[0] for t in ts), *ts[0].shape[1:]))
    if any(isinstance(t, Q1Tensor) for t in ts):
        raise ValueError("cannot fuse packed and dense parts into one tensor")
    if len({t.dtype for t in ts}) != 1:
        raise ValueError(f"cannot fuse parts of different dtypes {[t.dtype for t in ts]}")
    return torch.cat(ts, dim=0)


def swap_halves(t: Tensorish) -> Tensorish:
    """Swap the two halves along dim 0 (shift,scale <-> scale,shift). Its own inverse."""
    a, b = split_rows(t, 2)
    return cat_rows([b, a])


# ---------------------------------------------------------------------------------------------
# Whole state dicts
# ---------------------------------------------------------------------------------------------
def bfl_to_diffusers(tensors: dict[str, Tensorish]) -> tuple[dict[str, Tensorish], list[str]]:
    """Map a BFL-named state dict to diffusers names (splitting qkv, swapping norm_out halves).

    Returns ``(tensors, unknown)``: the mapped dict and the BFL names that are not FLUX.2
    transformer tensors (left for the caller to refuse or report).
    """
    out: dict[str, Tensorish] = {}
    unknown: list[str] = []
    for name, t in tensors.items():
        new = bfl_name_to_diffusers(name)
        if new is None:
            unknown.append(name)
            continue
        bare = strip_bfl_prefix(name)
        if len(new) == 3:
            for n, part in zip(new, split_rows(t, 3)):
                out[n] = part
        elif bare.startswith(SWAPPED_HALVES_BFL + "."):
            out[new[0]] = swap_halves(t)
        else:
            out[new[0]] = t
    return out, unknown


def diffusers_to_bfl(tensors: dict[str, Tensorish]) -> tuple[dict[str, Tensorish], list[str]]:
    """Map a diffusers-named state dict to BFL names (fusing q/k/v, swapping norm_out halves).

    Returns ``(tensors, unknown)``. A fused qkv needs all three parts, of one kind.
    """
    out: dict[str, Tensorish] = {}
    unknown: list[str] = []
    fused: dict[str, list] = {}
    for name, t in tensors.items():
        hit = diffusers_name_to_bfl(name)
        if hit is None:
            unknown.append(name)
            continue
        bfl, third = hit
        if third >= 0:
            fused.setdefault(bfl, [None, None, None])[third] = (name, t)
        elif name.startswith(SWAPPED_HALVES_DIFFUSERS + "."):
            out[bfl] = swap_halves(t)
        else:
            out[bfl] = t
    for bfl, parts in fused.items():
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            have = [p[0] for p in parts if p is not None]
            raise ValueError(f"{bfl} needs q, k and v; only {have} were given")
        out[bfl] = cat_rows([p[1] for p in parts])
    return out, unknown


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``Flux2Transformer2DModel(**config)`` (no biases: Klein has none) and its shape."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config["attention_head_dim"])
    dim = heads * head_dim
    hidden = int(dim * float(config.get("mlp_ratio", 3.0)))
    in_ch = int(config.get("in_channels", 128))
    out_ch = int(config.get("out_channels") or in_ch)
    patch = int(config.get("patch_size", 1))
    tgc = int(config.get("timestep_guidance_channels", 256))
    jad = int(config["joint_attention_dim"])
    s: dict[str, tuple[int, ...]] = {
        "x_embedder.weight": (dim, in_ch),
        "context_embedder.weight": (dim, jad),
        "time_guidance_embed.timestep_embedder.linear_1.weight": (dim, tgc),
        "time_guidance_embed.timestep_embedder.linear_2.weight": (dim, dim),
        "double_stream_modulation_img.linear.weight": (6 * dim, dim),
        "double_stream_modulation_txt.linear.weight": (6 * dim, dim),
        "single_stream_modulation.linear.weight": (3 * dim, dim),
        "norm_out.linear.weight": (2 * dim, dim),
        "proj_out.weight": (patch * patch * out_ch, dim),
    }
    if config.get("guidance_embeds", True):
        s["time_guidance_embed.guidance_embedder.linear_1.weight"] = (dim, tgc)
        s["time_guidance_embed.guidance_embedder.linear_2.weight"] = (dim, dim)
    for i in range(int(config["num_layers"])):
        p = f"transformer_blocks.{i}."
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            s[f"{p}attn.{n}.weight"] = (dim, dim)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{p}attn.{n}.weight"] = (head_dim,)
        for ff in ("ff", "ff_context"):
            s[f"{p}{ff}.linear_in.weight"] = (2 * hidden, dim)
            s[f"{p}{ff}.linear_out.weight"] = (dim, hidden)
    for j in range(int(config["num_single_layers"])):
        p = f"single_transformer_blocks.{j}.attn."
        s[f"{p}to_qkv_mlp_proj.weight"] = (3 * dim + 2 * hidden, dim)
        s[f"{p}to_out.weight"] = (dim, dim + hidden)
        s[f"{p}norm_q.weight"] = (head_dim,)
        s[f"{p}norm_k.weight"] = (head_dim,)
    return s


def infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The shape-derived part of a diffusers config, from diffusers-named tensor shapes.

    Fills what the shapes determine (widths, heads, layer counts, guidance_embeds). RoPE axes,
    rope_theta and eps are not visible in any tensor and are left out. Raises KeyError /
    ValueError when a needed tensor is missing or inconsistent.
    """
    dim, in_ch = shapes["x_embedder.weight"]
    head_dim = None
    for n in ("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight"):
        if n in shapes:
            head_dim = shapes[n][0]
            break
    if head_dim is None or dim % head_dim:
        raise ValueError(f"cannot infer attention_head_dim (dim {dim}, norm_q {head_dim})")
    hidden = None
    if "transformer_blocks.0.ff.linear_out.weight" in shapes:
        hidden = shapes["transformer_blocks.0.ff.linear_out.weight"][1]
    elif "single_transformer_blocks.0.attn.to_out.weight" in shapes:
        hidden = shapes["single_transformer_blocks.0.attn.to_out.weight"][1] - dim
    if hidden is None:
        raise ValueError("cannot infer the MLP width: no block found")
    proj = shapes["proj_out.weight"][0]

    def count(prefix: str) -> int:
        idx = {int(n.split(".")[1]) for n in shapes if n.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    return {
        "patch_size": 1,
        "in_channels": int(in_ch),
        "out_channels": None if proj == in_ch else int(proj),
        "num_layers": count("transformer_blocks."),
        "num_single_layers": count("single_transformer_blocks."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(dim // head_dim),
        "joint_attention_dim": int(shapes["context_embedder.weight"][1]),
        "timestep_guidance_channels": int(shapes["time_guidance_embed.timestep_embedder.linear_1.weight"][1]),
        "mlp_ratio": hidden / dim,
        "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in shapes,
    }
