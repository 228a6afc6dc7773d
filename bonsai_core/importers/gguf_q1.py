"""GGUF with Q1_0 blocks (community files such as huggingface.co/Green-Sky/bonsai-image-binary-4B-GGUF,
written by leejet/stable-diffusion.cpp) <-> the common form.

Format facts (llama.cpp's ggml ``Q1_0`` block and the ``gguf`` package's reader):

* ggml type ``Q1_0`` = 41: 128 weights in 18 bytes, fp16 ``d`` (little-endian) then 16 bytes ``qs``;
  weight j: bit ``(qs[j/8] >> (j%8)) & 1``, value ``+d`` if set else ``-d`` (ggml-org/ggml
  ``src/ggml-common.h``, ``src/ggml-quants.c``; llama.cpp PR 21273). The block is exactly
  ``bonsai_core.quant.q1_0``'s, so tensors move across without re-quantizing.
* ``ne[0]`` is the innermost dimension (``in`` of a linear); blocks run along it; rows by ``out``.
* Tensor names are BFL-style (``double_blocks.N.img_attn.qkv.weight`` ...), mapped by ``flux2_names``.
* Old ``gguf`` readers reject type 41 (github city96/ComfyUI-GGUF issue 457), so tensor types are
  taken here as plain integers: the package's reader parses the header and key/values, and the
  tensor table is read by our own ``_build_tensors`` without converting the type id to an enum.
* The ``mod_q8_0`` variant stores the two double-stream modulation weights as ``Q8_0`` (type 8):
  those are dequantized (with the gguf package's own Q8_0 code) to bf16, and the notes say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BonsaiCheckpointError
from ..quant.q1_0 import BLOCK_BYTES, GGML_TYPE_Q1_0, GROUP_SIZE
from ..quant import q4_affine
from ..quant.tensor import Q1Tensor, Q4Tensor
from . import ImportedTransformer, Tensorish, refuse, validate_or_infer
from .flux2_names import (
    bfl_to_diffusers, diffusers_to_bfl, split_by_naming, strip_bfl_prefix,
)

GGML_F32, GGML_F16, GGML_Q8_0, GGML_BF16 = 0, 1, 8, 30
GGML_Q2_0 = 42
# type id -> (weights per block, bytes per block) for the types this importer reads
_SIZES = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_BF16: (1, 2), GGML_Q8_0: (32, 34),
          GGML_TYPE_Q1_0: (GROUP_SIZE, BLOCK_BYTES)}
_TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_BF16: "BF16", GGML_Q8_0: "Q8_0",
               GGML_TYPE_Q1_0: "Q1_0", GGML_Q2_0: "Q2_0"}


def _type_name(t: int) -> str:
    if t in _TYPE_NAMES:
        return f"{_TYPE_NAMES[t]} (type {t})"
    try:
        from gguf import GGMLQuantizationType
        return f"{GGMLQuantizationType(t).name} (type {t})"
    except Exception:
        return f"type {t} (unknown to this gguf package)"


def _gguf():
    try:
        import gguf  # noqa: F401
        return gguf
    except ImportError:
        raise BonsaiCheckpointError(
            "reading or writing .gguf files needs the 'gguf' package: pip install 'comfyui-bonsai[gguf]'"
        ) from None


def _raw_reader(path: Path):
    """A GGUFReader whose tensor table keeps type ids as integers (old enums lack 41)."""
    gguf = _gguf()

    class RawGGUFReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # noqa: D401 - overrides the package's method
            self.raw_tensors = []
            for f in fields:
                _nlen, name_data, _ndims, dims, raw_dtype, offset_tensor = f.parts
                self.raw_tensors.append((str(bytes(name_data), encoding="utf-8"),
                                         [int(x) for x in dims], int(raw_dtype[0]),
                                         int(start_offs + int(offset_tensor[0]))))
            self.tensors = []

    try:
        return RawGGUFReader(str(path), "r")
    except Exception as e:  # the package raises ValueError/KeyError/IndexError on broken headers
        raise refuse(path, f"not a readable GGUF file ({type(e).__name__}: {e})",
                     expected="a complete GGUF v2/v3 file (truncated download?)") from None


def _check_fixed_header(path: Path, size: int) -> None:
    """Magic, version and the two counts, checked before the gguf package parses anything: a
    count no file of this size can hold would make the parser loop or allocate for a long time."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise refuse(path, f"starts with {head[:4]!r} and holds {size} bytes",
                     expected="a GGUF file (magic 'GGUF', 24-byte fixed header)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise refuse(path, f"is GGUF version {version}", expected="GGUF version 2 or 3")
    n_tensors = int.from_bytes(head[8:16], "little")
    n_kv = int.from_bytes(head[16:24], "little")
    # a tensor record is at least 8 (name length) + 4 (dims) + 8 (one dim) + 4 (type) + 8 (offset) bytes,
    # a key/value at least 8 + 4 + 1
    if n_tensors * 32 + n_kv * 13 > size:
        raise refuse(path, f"claims {n_tensors} tensors and {n_kv} key/values in {size} bytes",
                     expected="counts the file can hold (the file is corrupt or truncated)")


def _kv_string(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        v = f.contents()
    except Exception:
        return None
    return v if isinstance(v, str) else None


def read_gguf_raw(path) -> tuple[dict[str, Tensorish], list[str]]:
    """Every tensor of a ``.gguf`` under the file's own (BFL) names, checked: Q1_0 as ``Q1Tensor``,
    BF16/F16/F32 as they are, Q8_0 dequantized to bf16. Returns ``(tensors, notes)``.

    The gguf package memory-maps the file and parses only the header here (the tensor table is read
    by ``_raw_reader`` as plain records); each tensor's bytes are copied out of the map once, so
    nothing refers to the file afterwards."""
    path = Path(path)
    from ..validate import check_regular_file

    size = check_regular_file(path, ".gguf file")  # never opens a FIFO or folder
    _check_fixed_header(path, size)
    reader = _raw_reader(path)
    if reader.byte_order != "I":
        raise refuse(path, "is a big-endian GGUF", expected="a little-endian GGUF (every published one is)")
    size = path.stat().st_size
    notes: list[str] = []
    arch = _kv_string(reader, "general.architecture")
    notes.append(f"GGUF general.architecture = {arch!r}" if arch is not None
                 else "GGUF has no general.architecture key (as stable-diffusion.cpp writes it)")
    raw: dict[str, torch.Tensor | Q1Tensor] = {}
    q8: list[str] = []
    stripped = 0
    data_start = int(getattr(reader, "data_offset", 0))
    regions: list[tuple[int, int, str]] = []
    for name, ne, ttype, offset in reader.raw_tensors:
        if not 1 <= len(ne) <= 4 or any(n < 1 or n > 1 << 32 for n in ne):
            raise refuse(path, f"has dimensions ne {ne}", tensor=name,
                         expected="1 to 4 dimensions, each from 1 to 2^32 (the file is corrupt)")
        torch_shape = tuple(reversed(ne))
        if ttype == GGML_Q2_0:
            raise refuse(path, f"is {_type_name(ttype)}, a 2-bit (ternary) code", tensor=name,
                         expected="Q1_0 binary blocks",
                         fix="Ternary {-1,0,+1} weights cannot be stored as Q1_0 without loss; "
                             "use the binary Bonsai Image 4B GGUF instead")
        if ttype not in _SIZES:
            raise refuse(path, f"has tensor type {_type_name(ttype)}", tensor=name,
                         expected="Q1_0 (41), BF16 (30), F16 (1), F32 (0) or Q8_0 (8)")
        per_block, block_bytes = _SIZES[ttype]
        numel = 1
        for n in ne:
            numel *= n
        if not ne or ne[0] % per_block:
            raise refuse(path, f"has ne {ne}, whose ne[0] is not a multiple of {per_block}", tensor=name,
                         expected=f"rows made of whole {_TYPE_NAMES[ttype]} blocks")
        nbytes = numel // per_block * block_bytes
        if offset + nbytes > size or offset < data_start:
            raise refuse(path, f"its data spans bytes {offset}..{offset + nbytes} but the file's tensor data is "
                               f"bytes {data_start}..{size}", tensor=name,
                         expected="a complete file (truncated download?)")
        regions.append((offset, offset + nbytes, name))
        buf = np.array(reader.data[offset:offset + nbytes], dtype=np.uint8, copy=True)
        rows = numel // ne[0]
        if ttype == GGML_TYPE_Q1_0:
            if len(ne) != 2:
                raise refuse(path, f"is Q1_0 with {len(ne)} dimensions {list(torch_shape)}", tensor=name,
                             expected="a 2-D linear weight [out, in]")
            blocks = torch.from_numpy(buf).reshape(rows, nbytes // rows)
            t = Q1Tensor.from_blocks(blocks, torch_shape)
            finite = torch.isfinite(t.d)
            if not finite.all():
                row, group = (~finite).nonzero()[0].tolist()
                raise refuse(path, f"has a NaN/inf scale at row {row}, group {group} "
                                   f"({float(t.d[row, group])})", tensor=name,
                             expected="finite fp16 scales (the file is corrupt: download it again)")
        elif ttype == GGML_Q8_0:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize
            dense = dequantize(buf.reshape(rows, nbytes // rows), GGMLQuantizationType.Q8_0)
            t = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(torch_shape).to(torch.bfloat16)
            q8.append(name)
        elif ttype == GGML_BF16:
            t = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16).reshape(torch_shape)
        elif ttype == GGML_F16:
            t = torch.from_numpy(buf.view(np.float16)).reshape(torch_shape)
        else:
            t = torch.from_numpy(buf.view(np.float32)).reshape(torch_shape)
        if strip_bfl_prefix(name) != name:
            stripped += 1
        if name in raw:
            raise refuse(path, "appears twice", tensor=name, expected="unique tensor names")
        raw[name] = t
    regions.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(regions, regions[1:]):
        if b1 < e0:
            raise refuse(path, f"its data (bytes {b1}..{e1}) overlaps tensor '{n0}' (bytes {b0}..{e0})", tensor=n1,
                         expected="every tensor in its own region (the file is corrupt)")
    if stripped:
        notes.append(f"removed the 'model.diffusion_model.'/'diffusion_model.' prefix from {stripped} tensor names")
    if q8:
        notes.append(f"Q8_0 tensors dequantized to bf16 (d*q in fp32, then rounded to bf16): {', '.join(q8)}")
    del reader  # releases the memory map; every tensor above is a copy
    return raw, notes


def read_gguf(path, allow_dequantize: bool = False) -> ImportedTransformer:
    """Read a FLUX.2 [klein] ``.gguf`` (BFL names; Q1_0, BF16/F16/F32, Q8_0) into the common form.

    ``allow_dequantize`` is accepted for a uniform ``import_transformer`` call; it does not make
    Q2_0 (ternary) or other types importable (Q8_0 is always dequantized, with a note).
    """
    path = Path(path)
    raw, notes = read_gguf_raw(path)

    # BFL names -> diffusers names; a file already in diffusers names passes through
    bfl_part, diff_part = split_by_naming(raw)
    try:
        tensors, unknown = bfl_to_diffusers(bfl_part)
    except ValueError as e:
        raise refuse(path, f"cannot be mapped to diffusers names ({e})") from None
    if unknown:
        raise refuse(path, "is not a FLUX.2 transformer tensor", tensor=unknown[0],
                     expected="BFL names such as double_blocks.N.img_attn.qkv.weight "
                              f"({len(unknown)} unknown names)")
    if diff_part:
        notes.append(f"{len(diff_part)} tensors already carried diffusers names")
        for n, t in diff_part.items():
            if n in tensors:
                raise refuse(path, "is present under both its BFL and its diffusers name", tensor=n)
            tensors[n] = t
    notes.append("BFL names mapped to diffusers names: fused qkv split into q/k/v rows (exact), "
                 "final_layer.adaLN_modulation.1 halves swapped into norm_out.linear")

    validate_or_infer(path, tensors, None, notes)
    return ImportedTransformer(tensors=tensors, config=None, source_layout="gguf_q1", notes=notes)


def write_gguf(path, tensors: dict, arch: str = "flux", with_counts: bool = False):
    """Write diffusers-named tensors as a BFL-named ``.gguf`` (Q1_0 raw type-41 blocks, BF16/F16/F32).

    ``arch`` goes into ``general.architecture`` (the gguf package's writer always writes that key;
    stable-diffusion.cpp ignores it, ComfyUI-GGUF keys image models on it: "flux" is assumed to
    be accepted there [unverified for FLUX.2]). Written to a temporary name, then renamed.
    ``with_counts``: return ``(path, {"Q1_0": n, "dense": m})``, counted in the file as written (BFL
    names fuse q/k/v into one qkv tensor, so the file holds fewer tensors than the model has names).
    """
    gguf = _gguf()
    path = Path(path)
    try:
        bfl, unknown = diffusers_to_bfl(tensors)
    except ValueError as e:
        raise refuse(path, f"cannot build BFL tensors ({e})") from None
    if unknown:
        raise refuse(path, "is not a FLUX.2 transformer tensor in diffusers naming", tensor=unknown[0],
                     expected="diffusers Flux2Transformer2DModel names")
    try:
        q1 = gguf.GGMLQuantizationType(GGML_TYPE_Q1_0)
        gguf.GGML_QUANT_SIZES[q1]
    except (ValueError, KeyError):
        raise BonsaiCheckpointError(
            f"{path}: the installed gguf package does not know Q1_0 (type 41); pip install -U 'gguf>=0.19'") from None
    counts = {"Q1_0": sum(isinstance(t, Q1Tensor) for t in bfl.values())}
    counts["dense"] = len(bfl) - counts["Q1_0"]
    from ..checkpoint import partial_name

    tmp = path.with_name(partial_name(path.name))
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for name, t in bfl.items():
            add_tensor(writer, gguf, path, name, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if tmp.exists():
            tmp.unlink()
        raise
    return (path, counts) if with_counts else path


def add_tensor(writer, gguf, path: Path, name: str, t: torch.Tensor) -> None:
    """One tensor into a ``gguf.GGUFWriter``: Q1_0 blocks as they are, a Q4_AFFINE weight as the
    standard type that holds it exactly (Q4_1: fp16 scale and bias per 32; refused when a scale or
    bias is not an fp16 value, as an HQQ bias -(zero*scale) in float32 usually is), dense 16/32-bit
    floats as themselves."""
    if isinstance(t, Q1Tensor):
        if len(t.shape) != 2 or t.cols % GROUP_SIZE:
            raise refuse(path, f"packed shape {list(t.shape)}", tensor=name,
                         expected="2-D [out, in] with in a multiple of 128 (GGUF Q1_0 rows hold whole blocks)")
        writer.add_tensor(name, t.to_blocks().contiguous().numpy(), raw_dtype=gguf.GGMLQuantizationType(GGML_TYPE_Q1_0))
    elif isinstance(t, Q4Tensor):
        try:
            blocks = q4_affine.to_gguf_q4_1(t.qs.cpu(), t.scale.cpu(), t.bias.cpu(), name)
        except ValueError as e:
            raise refuse(path, f"cannot be written exactly in GGUF ({e})", tensor=name,
                         expected="Q4_AFFINE scales and biases that are fp16 values, groups a multiple of 32 "
                                  "(GGUF Q4_1); keep the model in its Bonsai folder instead") from None
        writer.add_tensor(name, blocks.contiguous().numpy(), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    elif t.dtype == torch.bfloat16:
        writer.add_tensor(name, t.contiguous().view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
    elif t.dtype in (torch.float16, torch.float32):
        writer.add_tensor(name, t.contiguous().numpy())
    else:
        raise refuse(path, f"dtype {t.dtype}", tensor=name, expected="Q1Tensor, Q4Tensor, bf16, fp16 or fp32")


def _umask() -> int:
    from ..checkpoint import current_umask
    return current_umask()
