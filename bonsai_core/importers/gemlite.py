"""Gemlite payload (HF ``prism-ml/bonsai-image-binary-4B-gemlite-1bit``; ternary ``...-ternary-4B-gemlite-2bit``)
-> the common form.

Facts used (PrismML image-studio
``backend_gpu/pipeline_gpu.py`` as vendored in github fufulog/Bonsai-Image-Demo and
solai25/ComfyUI-Bonsai-4B-2Bit; gemlite ``pack()`` in github mobiusml/gemlite ``gemlite/core.py``):

* the transformer folder ``transformer-gemlite-int1/`` holds ``state_dict.pt`` (a torch pickle),
  ``config.json`` (diffusers config), ``quantization_config.json`` (``bits``, ``group_size``,
  ``packing_bitwidth``) and ``gemlite_autotune.json`` (a kernel cache, ignored here);
* ``state_dict.pt`` is read ONLY with ``torch.load(..., weights_only=True)``, PyTorch's restricted
  loader that admits tensors and plain containers and refuses every other object;
* 16-bit tensors carry their plain diffusers names; each packed linear ``<fqn>`` has the leaves
  ``W_q, scales, zeros, metadata, orig_shape``:
  ``W_q`` uint8 ``[in*bits/8, out]`` with ``q[r, k*E + i] = (W_q[k, r] >> (i*bits)) & mask``, E = 8/bits;
  ``scales``/``zeros`` ``[in/128, out]``; ``metadata`` int32[12] whose index 10 is ``W_group_mode``
  (4: w = q*scale + zero; 3: w = (q - zero)*scale; 2: w = q*scale); ``orig_shape`` = [out, in].

The binary scale/zero convention is unverified, so nothing is assumed: the two values a group can
take (q = 0 and q = 1) are computed exactly from (scale, zero, mode) and accepted only if they are
-s and +s. With 1 bit and E = 8, ``W_q`` transposed is byte for byte the ``qs`` of Q1_0 (LSB
first along ``in``), so the bits are moved, never recomputed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quant.q1_0 import GROUP_SIZE
from ..quant.tensor import Q1Tensor
from . import (GEMLITE_DIRS, ImportedTransformer, load_pt_weights_only, read_json, refuse, scales_to_fp16,
               validate_or_infer)

LEAVES = ("W_q", "scales", "zeros", "metadata", "orig_shape", "bias")
META_W_NBITS, META_GROUP_SIZE, META_W_GROUP_MODE = 1, 2, 10

TERNARY_FIX = ("Ternary {-1,0,+1} weights cannot be stored as Q1_0 (binary +-s) without loss. "
               "Use the binary model (prism-ml/bonsai-image-binary-4B-gemlite-1bit), or pass "
               "allow_dequantize=True to import these linears as dense 16-bit weights (large, slow)")


def resolve_dir(path) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / "state_dict.pt").is_file():
        return p
    for d in GEMLITE_DIRS:
        if (p / d / "state_dict.pt").is_file():
            return p / d
    raise refuse(p, "holds no state_dict.pt", expected=f"a gemlite transformer folder or a repo holding {GEMLITE_DIRS[0]}/")


def _load_pt(path: Path) -> dict:
    return load_pt_weights_only(path, what="a gemlite state_dict.pt",
                                expected="a state dict of tensors and plain containers only")


def _int_list(v, path, tensor) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [int(x) for x in v.flatten().tolist()]
    if isinstance(v, (list, tuple, torch.Size)):
        return [int(x) for x in v]
    raise refuse(path, f"is a {type(v).__name__}", tensor=tensor, expected="an int tensor or list")


def _split_state_dict(sd: dict, path: Path):
    """-> (plain 16-bit tensors, {fqn: {leaf: value}}), accepting flat '<fqn>.W_q' keys or nested dicts."""
    packed: dict[str, dict] = {}
    plain: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            if "W_q" not in v:
                raise refuse(path, "is a dict without 'W_q'", tensor=str(k), expected="a tensor or a gemlite layer dict")
            packed[str(k)] = dict(v)
    fqns = {k[:-len(".W_q")] for k in sd if isinstance(k, str) and k.endswith(".W_q")}
    for k, v in sd.items():
        if isinstance(v, dict):
            continue
        head, _, leaf = str(k).rpartition(".")
        if head in fqns and leaf in LEAVES:
            packed.setdefault(head, {})[leaf] = v
            continue
        if not isinstance(v, torch.Tensor):
            raise refuse(path, f"is a {type(v).__name__}", tensor=str(k), expected="a tensor")
        plain[str(k)] = v
    return plain, packed


def _group_values(scale: torch.Tensor, zero: torch.Tensor | None, mode: int, path, tensor):
    """The exact values of q = 0 and q = 1 per group, in float64, for gemlite's W_group_mode."""
    s = scale.to(torch.float64)
    if mode == 2:
        return torch.zeros_like(s), s
    if zero is None:
        raise refuse(path, f"W_group_mode {mode} needs zeros, but there are none", tensor=tensor,
                     expected="a 'zeros' leaf")
    z = zero.to(torch.float64)
    if mode == 4:
        return z.expand_as(s), s + z
    if mode == 3:
        return (-z * s), (1 - z) * s
    raise refuse(path, f"W_group_mode {mode}", tensor=tensor, expected="2 (q*s), 3 ((q-z)*s) or 4 (q*s+z)")


def _decode_codes(W_q: torch.Tensor, bits: int, out: int, cols: int) -> torch.Tensor:
    """uint8 [in*bits/8, out] -> int codes [out, in] (LSB first along in)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    w = W_q.to(torch.int32)
    q = torch.stack([(w >> (i * bits)) & mask for i in range(per)], dim=-1)  # [in/per, out, per]
    return q.permute(1, 0, 2).reshape(out, cols)


def import_gemlite(path, allow_dequantize: bool = False,
                   dequantize_dtype: torch.dtype = torch.bfloat16) -> ImportedTransformer:
    """Import a gemlite transformer folder (or the repo folder holding ``transformer-gemlite-int1/``).

    1-bit linears become ``Q1Tensor`` losslessly when every group is {-s, +s}. 2-bit (ternary)
    linears are refused unless ``allow_dequantize=True``, which stores them dense in ``dequantize_dtype``.
    """
    d = resolve_dir(path)
    qcfg_path = d / "quantization_config.json"
    qcfg = read_json(qcfg_path)
    bits = qcfg.get("bits")
    gs = qcfg.get("group_size", GROUP_SIZE)
    pbw = qcfg.get("packing_bitwidth", 8)
    if bits not in (1, 2):
        raise refuse(qcfg_path, f"bits = {bits!r}", expected="1 (binary) or 2 (ternary)")
    if gs != GROUP_SIZE:
        raise refuse(qcfg_path, f"group_size = {gs!r}", expected=f"{GROUP_SIZE} (Q1_0's group)")
    if pbw != 8:
        raise refuse(qcfg_path, f"packing_bitwidth = {pbw!r}", expected="8 (uint8 W_q, as Bonsai ships)")
    notes = [f"gemlite quantization_config: bits={bits}, group_size={gs}, packing_bitwidth={pbw}"
             + (f", format={qcfg['format']!r}" if "format" in qcfg else "")]
    config = read_json(d / "config.json") if (d / "config.json").is_file() else None

    sd_path = d / "state_dict.pt"
    plain, packed = _split_state_dict(_load_pt(sd_path), sd_path)
    listed = qcfg.get("quantized_fqns")
    if isinstance(listed, list):
        missing = sorted(set(map(str, listed)) - set(packed))
        if missing:
            raise refuse(sd_path, "is listed in quantized_fqns but has no W_q", tensor=missing[0],
                         expected="W_q, scales, zeros, metadata, orig_shape leaves")
        extra = sorted(set(packed) - set(map(str, listed)))
        if extra:
            notes.append(f"{len(extra)} packed linears not listed in quantized_fqns (imported anyway): {extra[:3]}")

    tensors: dict[str, torch.Tensor | Q1Tensor] = {}
    for name, t in plain.items():
        if not t.is_floating_point():
            raise refuse(sd_path, f"dtype {t.dtype}", tensor=name, expected="a 16/32-bit float tensor")
        tensors[name] = t
    max_err, n_rounded, scale_dtypes, dense_ternary = 0.0, 0, set(), []
    for fqn, leaves in sorted(packed.items()):
        name = f"{fqn}.weight"
        if name in tensors:
            raise refuse(sd_path, "is present both dense and as gemlite leaves", tensor=name,
                         expected="one of the two")
        if "bias" in leaves and leaves["bias"] is not None:
            raise refuse(sd_path, "has a bias", tensor=f"{fqn}.bias", expected="no bias (FLUX.2 linears have none)")
        for leaf in ("W_q", "scales", "metadata", "orig_shape"):
            if leaves.get(leaf) is None:
                raise refuse(sd_path, f"has no '{leaf}' leaf", tensor=fqn,
                             expected="W_q, scales, zeros, metadata, orig_shape")
        meta = _int_list(leaves["metadata"], sd_path, f"{fqn}.metadata")
        if len(meta) < 12:
            raise refuse(sd_path, f"has {len(meta)} entries", tensor=f"{fqn}.metadata", expected="12 int32 values")
        shape = _int_list(leaves["orig_shape"], sd_path, f"{fqn}.orig_shape")
        if len(shape) != 2:
            raise refuse(sd_path, f"is {shape}", tensor=f"{fqn}.orig_shape", expected="[out, in]")
        out, cols = shape
        if meta[META_W_NBITS] != bits or meta[META_GROUP_SIZE] != GROUP_SIZE:
            raise refuse(sd_path, f"metadata says W_nbits={meta[META_W_NBITS]}, group_size={meta[META_GROUP_SIZE]}",
                         tensor=f"{fqn}.metadata", expected=f"W_nbits={bits}, group_size={GROUP_SIZE} "
                                                           f"(quantization_config.json)")
        if cols % GROUP_SIZE:
            raise refuse(sd_path, f"in_features {cols}", tensor=name, expected="a multiple of 128")
        mode = meta[META_W_GROUP_MODE]
        W_q = leaves["W_q"]
        if not isinstance(W_q, torch.Tensor) or W_q.dtype not in (torch.uint8, torch.int8):
            raise refuse(sd_path, f"is {getattr(W_q, 'dtype', type(W_q).__name__)}", tensor=f"{fqn}.W_q",
                         expected="uint8 (packing_bitwidth 8)")
        W_q = W_q.view(torch.uint8)
        want_wq = (cols * bits // 8, out)
        if tuple(W_q.shape) != want_wq:
            raise refuse(sd_path, f"has shape {list(W_q.shape)}", tensor=f"{fqn}.W_q",
                         expected=f"{list(want_wq)} = [in*bits/8, out] for orig_shape {shape}")
        G = cols // GROUP_SIZE
        scale = leaves["scales"]
        zero = leaves.get("zeros")
        for leaf, v in (("scales", scale), ("zeros", zero)):
            if v is None:
                continue
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise refuse(sd_path, f"is {getattr(v, 'dtype', type(v).__name__)}", tensor=f"{fqn}.{leaf}",
                             expected="a float tensor")
            if tuple(v.shape) != (G, out) and v.numel() != 1:
                raise refuse(sd_path, f"has shape {list(v.shape)}", tensor=f"{fqn}.{leaf}",
                             expected=f"[{G}, {out}] = [in/128, out] (or one value for the whole tensor)")
        scale_dtypes.add(str(scale.dtype).replace("torch.", ""))
        scale_b = scale.reshape(()).expand(G, out) if scale.numel() == 1 else scale
        zero_b = None if zero is None else (zero.reshape(()).expand(G, out) if zero.numel() == 1 else zero)

        if bits == 2:
            if not allow_dequantize:
                raise refuse(sd_path, "is a 2-bit ternary gemlite linear", tensor=name,
                             expected="1-bit binary codes", fix=TERNARY_FIX)
            q = _decode_codes(W_q, 2, out, cols).to(torch.float64).view(out, G, GROUP_SIZE)
            s = scale_b.to(torch.float64).t().unsqueeze(-1)
            z = None if zero_b is None else zero_b.to(torch.float64).t().unsqueeze(-1)
            if mode == 4:
                w = q * s + z
            elif mode == 3:
                w = (q - z) * s
            elif mode == 2:
                w = q * s
            else:
                raise refuse(sd_path, f"W_group_mode {mode}", tensor=name, expected="2, 3 or 4")
            tensors[name] = w.reshape(out, cols).to(dequantize_dtype)
            dense_ternary.append(name)
            continue

        v0, v1 = _group_values(scale_b, zero_b, mode, sd_path, name)  # [G, out]
        bad = v0 != -v1
        if bad.any():
            g, r = (int(i) for i in bad.nonzero()[0])
            raise refuse(sd_path, f"group {g} of row {r} decodes to the two values {float(v0[g, r])!r} (q=0) and "
                                  f"{float(v1[g, r])!r} (q=1) with W_group_mode {mode}; this file is not sign x scale",
                         tensor=name, expected="-s and +s in every group (a binary Bonsai checkpoint)")
        s = v1.abs()
        try:
            d16, n_inexact, err = scales_to_fp16(s)
        except ValueError as e:
            raise refuse(sd_path, f"scale cannot be stored as fp16: {e}", tensor=name,
                         expected="scales within fp16's range") from None
        n_rounded += n_inexact
        max_err = max(max_err, err)
        qs = W_q.t().contiguous()  # [out, in/8]: Q1_0's qs layout exactly (LSB first along in)
        # In every mode the step from q=0 to q=1 is +scale, so a negative scale (or -0.0 in an all-zero
        # group) means q=1 is -s: invert that group's bits. Nonzero groups: sign(scale) == sign(v1).
        flip = torch.signbit(scale_b).t()
        if flip.any():
            qs = (qs.view(out, G, 16) ^ (flip.to(torch.uint8) * 255).unsqueeze(-1)).view(out, G * 16)
        tensors[name] = Q1Tensor(qs, d16.t().contiguous(), (out, cols))

    n_packed = sum(isinstance(t, Q1Tensor) for t in tensors.values())
    notes.append(f"{n_packed} binary linears moved bit for bit into Q1_0 (W_q transposed = qs); "
                 f"scale/zero stored as {sorted(scale_dtypes)}")
    if n_packed:
        notes.append("binary groups checked: q=0 -> -s and q=1 -> +s exactly (or the reverse, bits inverted) "
                     "for every group, from scale, zero and W_group_mode")
        if n_rounded:
            notes.append(f"scale rounded to fp16 in {n_rounded} groups: max rel err {max_err:.3g}")
        else:
            notes.append(f"scales {sorted(scale_dtypes)} converted to fp16 exactly")
    if dense_ternary:
        notes.append(f"allow_dequantize: {len(dense_ternary)} ternary linears dequantized by W_group_mode to "
                     f"dense {dequantize_dtype} (not Q1_0; larger and slower)")

    validate_or_infer(sd_path, tensors, config, notes)
    return ImportedTransformer(tensors=tensors, config=config, source_layout="gemlite", notes=notes)
