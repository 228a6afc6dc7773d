"""Unpacked dense checkpoint (HF ``prism-ml/bonsai-image-{binary,ternary}-4B-unpacked``) -> the common form.

The base model of all packed repos (its Hub repo's file list); assumed to be
a diffusers folder with a dense 16-bit ``transformer/diffusion_pytorch_model.safetensors``
(optionally sharded with ``diffusion_pytorch_model.safetensors.index.json``) whose packed linears
(section 1) hold +-s per 128-group. File list and dtype are unverified, so the importer checks
each linear instead of trusting the assumption:

* a packed linear whose every group of 128 is exactly {-s, +s} (same |value| everywhere in the
  group) becomes a ``Q1Tensor`` with d = s, bit = not signbit(w): lossless;
* if s is not exactly an fp16 value (a bf16/fp32 source can hold such scales), or a group is not
  sign x scale (e.g. the ternary model, or an ordinary dense model), the linear is kept dense in
  its own dtype and the notes say so. Nothing is ever re-quantized.

BFL-named single files (``double_blocks.N...``) are accepted too and renamed via ``flux2_names``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quant.q1_0 import GROUP_SIZE
from ..quant.tensor import Q1Tensor
from . import (
    DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, ImportedTransformer, load_safetensors, load_safetensors_dir, read_json,
    refuse, validate_or_infer,
)
from .flux2_names import bfl_to_diffusers, diffusers_name_to_bfl, is_packed_linear


def sign_times_scale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """If every 128-group of the 2-D ``w`` is {-s, +s}: ``(positive bool [rows, cols], s [rows, G])``.

    Exact comparison in float32 (float64 for a float64 source); ``None`` otherwise.
    """
    rows, cols = w.shape
    if cols % GROUP_SIZE or not w.is_floating_point():
        return None
    wide = torch.float64 if w.dtype == torch.float64 else torch.float32  # exact for every 16/32-bit float
    g = w.to(wide).view(rows, cols // GROUP_SIZE, GROUP_SIZE)
    a = g.abs()
    s = a.amax(-1)
    if not torch.isfinite(s).all() or not bool((a == s.unsqueeze(-1)).all()):
        return None
    return ~torch.signbit(w), s


def resolve(path) -> tuple[Path, Path | None]:
    """-> (the weights file or folder, the config.json beside it if any)."""
    p = Path(path)
    if p.is_file():
        if p.name == DIFFUSERS_INDEX:
            p = p.parent
        else:
            cfg = p.parent / "config.json"
            return p, cfg if cfg.is_file() else None
    for d in (p, p / "transformer"):
        if (d / DIFFUSERS_WEIGHTS).is_file() or (d / DIFFUSERS_INDEX).is_file():
            cfg = d / "config.json"
            return d, cfg if cfg.is_file() else None
    raise refuse(p, f"holds neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX} (also looked in transformer/)",
                 expected="a diffusers transformer folder or a .safetensors file")


def import_unpacked(path, allow_dequantize: bool = False) -> ImportedTransformer:
    """Import a dense FLUX.2 transformer (diffusers folder, sharded folder or one .safetensors file).

    ``allow_dequantize`` is accepted for a uniform ``import_transformer`` call and has no effect:
    a dense source has nothing to dequantize, and non-binary linears are kept dense anyway.
    """
    src, cfg_path = resolve(path)
    if src.is_file():
        raw, _ = load_safetensors(src)
        where = src
    else:
        raw, files = load_safetensors_dir(src)
        where = files[0] if len(files) == 1 else src
    config = read_json(cfg_path) if cfg_path is not None else None
    notes: list[str] = []
    if any(diffusers_name_to_bfl(n) is None for n in raw):
        mapped, unknown = bfl_to_diffusers({n: t for n, t in raw.items() if diffusers_name_to_bfl(n) is None})
        if unknown:
            raise refuse(where, "is not a FLUX.2 transformer tensor", tensor=unknown[0],
                         expected="diffusers Flux2Transformer2DModel names (or BFL names)")
        raw = {**{n: t for n, t in raw.items() if diffusers_name_to_bfl(n) is not None}, **mapped}
        notes.append("BFL names mapped to diffusers names (qkv split, norm_out halves swapped)")

    tensors: dict[str, torch.Tensor | Q1Tensor] = {}
    dtypes: set[str] = set()
    not_binary: list[str] = []
    not_fp16: list[str] = []
    for name, t in raw.items():
        if not t.is_floating_point():
            raise refuse(where, f"dtype {t.dtype}", tensor=name, expected="a dense float tensor")
        dtypes.add(str(t.dtype).replace("torch.", ""))
        if not (is_packed_linear(name) and t.dim() == 2):
            tensors[name] = t
            continue
        hit = sign_times_scale(t)
        if hit is None:
            not_binary.append(name)
            tensors[name] = t
            continue
        positive, s = hit
        d16 = s.to(torch.float16)
        if not bool((d16.to(s.dtype) == s).all()):
            not_fp16.append(name)
            tensors[name] = t
            continue
        tensors[name] = Q1Tensor.from_signs(positive, d16, t.shape)

    n_packed = sum(isinstance(t, Q1Tensor) for t in tensors.values())
    notes.append(f"dense source ({sorted(dtypes)}): {n_packed} linears found exactly sign x scale per 128-group "
                 f"and packed losslessly to Q1_0 (d = s, an exact fp16 value)")
    if not_binary:
        notes.append(f"{len(not_binary)} block linears are not sign x scale (not every group is {{-s,+s}}, "
                     f"e.g. ternary or ordinary weights): kept dense, not re-quantized: {not_binary[:4]}"
                     + (" ..." if len(not_binary) > 4 else ""))
    if not_fp16:
        notes.append(f"{len(not_fp16)} block linears are sign x scale but some s is not exactly an fp16 value: "
                     f"kept dense, not rounded: {not_fp16[:4]}" + (" ..." if len(not_fp16) > 4 else ""))
    validate_or_infer(where, tensors, config, notes)
    return ImportedTransformer(tensors=tensors, config=config, source_layout="unpacked", notes=notes)
