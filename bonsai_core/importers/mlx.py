"""MLX payload (HF ``prism-ml/bonsai-image-binary-4B-mlx-1bit``; ternary ``...-ternary-4B-mlx-2bit``)
-> the common form.

Facts used (file list from mflux's
``BonsaiImageWeightDefinition`` download patterns and Blaizzy/mlx-vlm ``download.py``; packing from
MLX's affine quantization, PrismML's 1-bit LLM cards and the mflux-prism tests):

* ``transformer-packed-mflux/`` holds ``diffusion_pytorch_model.safetensors``,
  ``quantization_config.json`` (``bits`` 1 or 2, ``group_size`` 128, ``skip_patterns``),
  ``config.json`` (diffusers config) and ``checkpoint_manifest.json`` (ignored);
* a linear is packed iff ``<prefix>.scales`` exists: ``<prefix>.weight`` is uint32
  ``[out, in*bits/32]``, ``.scales`` and ``.biases`` are ``[out, in/128]`` floats whose dtype is read
  from the file header (the packer writes bf16, the cards say fp16);
* along ``in``, LSB first: word j of row r holds column ``j*(32/bits) + k`` at bit ``k*bits``;
  dequant ``w = scale*q + bias``. Binary: q=0 -> ``bias``, q=1 -> ``scale + bias``.

Nothing is assumed about the sign of ``scale`` (MLX's own quantizer can emit negative scales): the
two values of every group are computed exactly and must be -s and +s; when q=1 is the negative one,
that group's bits are inverted. With 1 bit, the uint32 words seen as little-endian bytes are
exactly Q1_0's ``qs`` (byte c/8, bit c%8 holds column c), so the bits are moved, never recomputed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..quant.q1_0 import GROUP_SIZE
from ..quant.tensor import Q1Tensor
from . import (
    DIFFUSERS_WEIGHTS, MLX_DIR, ImportedTransformer, load_safetensors, read_json, refuse, scales_to_fp16,
    validate_or_infer,
)

TERNARY_FIX = ("Ternary {-1,0,+1} weights cannot be stored as Q1_0 (binary +-s) without loss. "
               "Use the binary model (prism-ml/bonsai-image-binary-4B-mlx-1bit), or pass "
               "allow_dequantize=True to import these linears as dense 16-bit weights (large, slow)")


def resolve_dir(path) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / DIFFUSERS_WEIGHTS).is_file() and (p / "quantization_config.json").is_file():
        return p
    if (p / MLX_DIR / DIFFUSERS_WEIGHTS).is_file():
        return p / MLX_DIR
    raise refuse(p, f"holds no {DIFFUSERS_WEIGHTS} with quantization_config.json",
                 expected=f"an MLX packed transformer folder or a repo holding {MLX_DIR}/")


def _codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words [out, W] -> codes [out, W*32/bits] (column j*per + k at bit k*bits of word j)."""
    per = 32 // bits
    w = words.view(torch.int32)  # same bits; & mask after the shift undoes the arithmetic shift's sign fill
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)


def import_mlx(path, allow_dequantize: bool = False,
               dequantize_dtype: torch.dtype = torch.bfloat16) -> ImportedTransformer:
    """Import an MLX packed transformer folder (or the repo folder holding ``transformer-packed-mflux/``).

    1-bit linears become ``Q1Tensor`` losslessly when every group is {-s, +s}; otherwise, and for
    2-bit (ternary) files, the import is refused unless ``allow_dequantize=True`` (dense ``dequantize_dtype``).
    """
    d = resolve_dir(path)
    qcfg_path = d / "quantization_config.json"
    qcfg = read_json(qcfg_path)
    bits = qcfg.get("bits")
    gs = qcfg.get("group_size")
    if bits not in (1, 2):
        raise refuse(qcfg_path, f"bits = {bits!r}", expected="1 (binary) or 2 (ternary)")
    if gs != GROUP_SIZE:
        raise refuse(qcfg_path, f"group_size = {gs!r}", expected=f"{GROUP_SIZE} (the only size Bonsai uses)")
    notes = [f"MLX quantization_config: bits={bits}, group_size={gs}, skip_patterns={qcfg.get('skip_patterns')!r}"]
    config = read_json(d / "config.json") if (d / "config.json").is_file() else None
    st_path = d / DIFFUSERS_WEIGHTS
    raw, _meta = load_safetensors(st_path)
    if sys.byteorder != "little":
        raise refuse(st_path, "cannot be repacked on a big-endian host", expected="a little-endian machine")

    prefixes = sorted(n[:-len(".scales")] for n in raw if n.endswith(".scales"))
    consumed: set[str] = set()
    tensors: dict[str, torch.Tensor | Q1Tensor] = {}
    per = 32 // bits
    max_err, n_rounded, sdtypes, dense, flipped = 0.0, 0, set(), [], 0
    for pre in prefixes:
        name = f"{pre}.weight"
        words, scales, biases = raw.get(name), raw[f"{pre}.scales"], raw.get(f"{pre}.biases")
        if words is None:
            raise refuse(st_path, "is missing", tensor=name, expected=f"uint32 packed codes beside {pre}.scales")
        if biases is None:
            raise refuse(st_path, "is missing", tensor=f"{pre}.biases", expected=f"affine biases beside {pre}.scales")
        consumed.update({name, f"{pre}.scales", f"{pre}.biases"})
        if words.dtype != torch.uint32 or words.dim() != 2:
            raise refuse(st_path, f"is {words.dtype} {list(words.shape)}", tensor=name,
                         expected="uint32 [out, in*bits/32]")
        out, cols = words.shape[0], words.shape[1] * per
        G = cols // GROUP_SIZE
        for leaf, v in (("scales", scales), ("biases", biases)):
            if not v.is_floating_point() or tuple(v.shape) != (out, G):
                raise refuse(st_path, f"is {v.dtype} {list(v.shape)}", tensor=f"{pre}.{leaf}",
                             expected=f"float [{out}, {G}] = [out, in/128] for {name} {list(words.shape)} "
                                      f"at {bits} bit(s)")
        sdtypes.add(str(scales.dtype).replace("torch.", ""))
        sc, bi = scales.to(torch.float64), biases.to(torch.float64)

        if bits == 2 or allow_dequantize and not bool((bi == -(sc + bi)).all()):
            if not allow_dequantize:
                raise refuse(st_path, "is a 2-bit ternary MLX linear", tensor=name, expected="1-bit binary codes",
                             fix=TERNARY_FIX)
            q = _codes(words, bits).to(torch.float64).view(out, G, GROUP_SIZE)
            tensors[name] = (q * sc.unsqueeze(-1) + bi.unsqueeze(-1)).reshape(out, cols).to(dequantize_dtype)
            dense.append(name)
            continue

        v0, v1 = bi, sc + bi  # values of q = 0 and q = 1, exact in float64
        bad = v0 != -v1
        if bad.any():
            r, g = (int(i) for i in bad.nonzero()[0])
            raise refuse(st_path, f"group {g} of row {r} decodes to {float(v0[r, g])!r} (q=0) and "
                                  f"{float(v1[r, g])!r} (q=1); this file is not sign x scale",
                         tensor=name, expected="-s and +s in every group (bias == -scale/2)",
                         fix="pass allow_dequantize=True to import it as a dense 16-bit weight")
        try:
            d16, n_inexact, err = scales_to_fp16(v1.abs())
        except ValueError as e:
            raise refuse(st_path, f"scale cannot be stored as fp16: {e}", tensor=name,
                         expected="scales within fp16's range") from None
        n_rounded += n_inexact
        max_err = max(max_err, err)
        qs = words.contiguous().view(torch.uint8).view(out, G * 16)  # little-endian words = Q1_0 qs bytes
        # [out, G]: w steps by +scale from q=0 to q=1, so where scale < 0 (or is -0.0 in an all-zero
        # group) q=1 is -s: invert the group's bits. For nonzero groups sign(scale) == sign(v1).
        flip = torch.signbit(scales)
        if flip.any():
            flipped += int(flip.sum())
            qs = (qs.view(out, G, 16) ^ (flip.to(torch.uint8) * 255).unsqueeze(-1)).view(out, G * 16)
        else:
            qs = qs.clone()
        tensors[name] = Q1Tensor(qs, d16, (out, cols))

    for n, t in raw.items():
        if n in consumed:
            continue
        if n.endswith(".biases"):
            raise refuse(st_path, "has no matching .scales", tensor=n, expected="scales and biases in pairs")
        if not t.is_floating_point():
            raise refuse(st_path, f"dtype {t.dtype} without .scales", tensor=n,
                         expected="a float tensor (packed weights come with .scales and .biases)")
        tensors[n] = t

    n_packed = sum(isinstance(t, Q1Tensor) for t in tensors.values())
    if n_packed:
        notes.append(f"{n_packed} binary linears moved bit for bit into Q1_0 (uint32 words as little-endian "
                     f"bytes = qs); every group checked: bias == -(scale+bias), i.e. values -s and +s")
        if flipped:
            notes.append(f"{flipped} groups had a negative scale (q=1 -> -s): their bits were inverted exactly")
        notes.append(f"scale+bias stored as {sorted(sdtypes)}; " + (
            f"s rounded to fp16 in {n_rounded} groups: max rel err {max_err:.3g}" if n_rounded
            else "s converted to fp16 exactly"))
    if dense:
        notes.append(f"allow_dequantize: {len(dense)} {'ternary' if bits == 2 else 'non-binary'} linears "
                     f"dequantized (w = scale*q + bias) to dense {dequantize_dtype}, not Q1_0")
    validate_or_infer(st_path, tensors, config, notes)
    return ImportedTransformer(tensors=tensors, config=config, source_layout="mlx", notes=notes)
