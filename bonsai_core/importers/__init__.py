"""Importers: every public layout of Bonsai Image 4B (the FLUX.2 [klein] 4B transformer) read
into ONE common form, ``ImportedTransformer``, without re-quantizing binary weights.

Layouts (the public Bonsai Image 4B payloads on the Hub, and community GGUF files):

* ``gguf_q1``  — a ``.gguf`` file with BFL names and Q1_0 (ggml type 41) blocks
  (community: huggingface.co/Green-Sky/bonsai-image-binary-4B-GGUF) -> ``gguf_q1.py``
* ``gemlite``  — ``state_dict.pt`` + ``quantization_config.json`` (HF
  ``prism-ml/bonsai-image-binary-4B-gemlite-1bit``, dir ``transformer-gemlite-int1/``) -> ``gemlite.py``
* ``mlx``      — ``diffusion_pytorch_model.safetensors`` with ``.scales``/``.biases`` + ``quantization_config.json``
  (HF ``prism-ml/bonsai-image-binary-4B-mlx-1bit``, dir ``transformer-packed-mflux/``) -> ``mlx.py``
* ``unpacked`` — a dense diffusers transformer (HF ``prism-ml/bonsai-image-binary-4B-unpacked``) -> ``unpacked.py``
* ``bonsai``   — this project's own safetensors (metadata ``format == "bonsai"``); only detected here.

The common form: diffusers ``Flux2Transformer2DModel`` state-dict names; 16-bit tensors in their
own dtype; binary linears as ``Q1Tensor`` (Q1_0, group 128, exact sign bits, fp16 scales).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

from ..errors import BonsaiCheckpointError
from ..quant.tensor import Q1Tensor

Tensorish = Union[torch.Tensor, Q1Tensor]

LAYOUTS = ("gguf_q1", "gemlite", "mlx", "unpacked", "bonsai")

GEMLITE_DIRS = ("transformer-gemlite-int1", "transformer-gemlite-int2")
MLX_DIR = "transformer-packed-mflux"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class ImportedTransformer:
    """A FLUX.2 transformer as imported: diffusers names, dense 16-bit tensors and Q1_0 packed linears."""

    tensors: dict[str, Tensorish]
    config: dict | None
    source_layout: str
    notes: list[str] = field(default_factory=list)

    def packed_names(self) -> list[str]:
        return [n for n, t in self.tensors.items() if isinstance(t, Q1Tensor)]

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor dense in ``dtype`` (packed ones dequantized): loadable into diffusers' model."""
        return {n: (t.dequantize(dtype) if isinstance(t, Q1Tensor) else t.to(dtype))
                for n, t in self.tensors.items()}


# ---------------------------------------------------------------------------------------------
# Shared helpers for the layout modules
# ---------------------------------------------------------------------------------------------
def refuse(path, what: str, tensor: str | None = None, expected: str | None = None,
           fix: str | None = None) -> BonsaiCheckpointError:
    """Build the error every importer raises: file, tensor, what was found, what was expected."""
    msg = f"{path}: "
    if tensor:
        msg += f"tensor '{tensor}': "
    msg += what
    if expected:
        msg += f"; expected {expected}"
    if fix:
        msg += f". {fix}"
    return BonsaiCheckpointError(msg)


def _load_error_line(e: Exception) -> str:
    """The informative line of a torch.load error (for a forbidden object: 'Unsupported global: GLOBAL x.Y ...')."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        m = re.search(r"Unsupported global: GLOBAL \S+", ln)
        if m:
            return f"{m.group(0)} (an object that is not a tensor, number, string or container)"
    return lines[0] if lines else type(e).__name__


def load_pt_weights_only(path: Path, *, what: str, expected: str) -> dict:
    """Read a public ``.pt`` payload with ``torch.load(weights_only=True)`` only: PyTorch's
    restricted loader admits tensors and plain containers and refuses any other object, so
    nothing is ever unpickled. Any refusal becomes a ``BonsaiCheckpointError`` naming the file."""
    from ..validate import check_regular_file

    if Path(path).exists() or Path(path).is_symlink():
        check_regular_file(path, what)  # a FIFO would block torch.load
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise refuse(path, "file not found", expected=what) from None
    except Exception as e:  # UnpicklingError for a forbidden object, RuntimeError/EOFError for a broken file
        raise refuse(path, f"refused by torch.load(weights_only=True): {type(e).__name__}: {_load_error_line(e)}",
                     expected=expected,
                     fix="Bonsai never unpickles arbitrary objects; re-download the file from its original repository"
                     ) from None
    if not isinstance(obj, dict):
        raise refuse(path, f"holds a {type(obj).__name__}", expected=expected)
    return obj


def read_json(path: Path) -> dict:
    from ..validate import check_regular_file

    if Path(path).exists() or Path(path).is_symlink():
        check_regular_file(path, "JSON file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise refuse(path, "file is missing", expected="a JSON file here") from None
    except (OSError, ValueError) as e:
        raise refuse(path, f"not readable as JSON ({e})", expected="a JSON object") from None
    if not isinstance(data, dict):
        raise refuse(path, f"holds a JSON {type(data).__name__}", expected="a JSON object")
    return data


_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


def read_safetensors_header(path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file.

    Returns ``(tensors, metadata)``: name -> {"dtype", "shape", "data_offsets"} and the
    ``__metadata__`` strings. Truncated or malformed files are refused naming the tensor.
    """
    path = Path(path)
    from ..validate import check_regular_file

    size = check_regular_file(path, "safetensors file")  # never opens a FIFO, socket or folder
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise refuse(path, f"only {size} bytes", expected="a safetensors file (8-byte header length first)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 1024 * 1024:
                raise refuse(path, f"header length {n} does not fit in a file of {size} bytes",
                             expected="a complete safetensors file (truncated download?)")
            raw = f.read(n)
    except OSError as e:
        raise refuse(path, f"cannot be read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise refuse(path, f"header is not valid JSON ({e})", expected="a safetensors file") from None
    if not isinstance(header, dict):
        raise refuse(path, "header is not a JSON object", expected="a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise refuse(path, f"header __metadata__ is {str(meta)[:80]!r}", expected="an object of strings")
    data_len = size - 8 - n
    regions = []
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            dtype = _ST_DTYPES[info["dtype"]]
            ints = [begin, end, *shape]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints) or begin > end:
                raise ValueError(info)
            numel = 1
            for s in shape:
                numel *= s
        except (KeyError, TypeError, ValueError):
            raise refuse(path, f"malformed header entry {str(info)[:120]!r}", tensor=name,
                         expected="dtype, shape (whole numbers) and data_offsets [begin, end]") from None
        regions.append((begin, end, name))
        if end > data_len:
            raise refuse(path, f"its bytes end at {end} but the file holds only {data_len} data bytes",
                         tensor=name, expected="a complete file (truncated download?)")
        if end - begin != numel * dtype.itemsize:
            raise refuse(path, f"{end - begin} bytes for shape {info['shape']} {info['dtype']}", tensor=name,
                         expected=f"{numel * dtype.itemsize} bytes")
    regions.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(regions, regions[1:]):
        if b1 < e0:
            raise refuse(path, f"its bytes {b1}..{e1} overlap tensor '{n0}' ({b0}..{e0})", tensor=n1,
                         expected="every tensor in its own region (the file is corrupt)")
    return header, meta


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file (header checked first); ``(tensors, metadata)``."""
    header, meta = read_safetensors_header(path)
    try:
        from safetensors.torch import load_file
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError type
        raise refuse(path, f"cannot be loaded by safetensors ({e})", expected="a valid safetensors file") from None
    if set(tensors) != set(header):
        raise refuse(path, "tensor list differs from its header", expected="a consistent safetensors file")
    return tensors, meta


def load_safetensors_dir(directory: Path, weights: str = DIFFUSERS_WEIGHTS,
                         index: str = DIFFUSERS_INDEX) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Load one safetensors file, or the shards listed by a diffusers/transformers index json."""
    single = directory / weights
    if single.is_file():
        return load_safetensors(single)[0], [single]
    idx_path = directory / index
    if not idx_path.is_file():
        raise refuse(directory, f"holds neither {weights} nor {index}",
                     expected="a diffusers transformer folder")
    idx = read_json(idx_path)
    wmap = idx.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise refuse(idx_path, "has no 'weight_map'", expected="a safetensors index json")
    out: dict[str, torch.Tensor] = {}
    files = []
    for shard in sorted(set(wmap.values())):
        p = directory / shard
        if not p.is_file():
            raise refuse(p, "shard listed in the index is missing", expected="every shard of the index")
        files.append(p)
        tensors, _ = load_safetensors(p)
        for name, t in tensors.items():
            if wmap.get(name) != shard:
                raise refuse(p, f"not listed for this shard in {idx_path.name}", tensor=name)
            out[name] = t
    missing = sorted(set(wmap) - set(out))
    if missing:
        raise refuse(idx_path, f"{len(missing)} tensors listed but not found in the shards",
                     tensor=missing[0], expected="every listed tensor in its shard")
    return out, files


def validate_tensors(path, tensors: dict[str, Tensorish], config: dict) -> None:
    """Check names and shapes against ``Flux2Transformer2DModel(**config)``; refuse on any difference."""
    from .flux2_names import expected_shapes, shape_of

    try:
        want = expected_shapes(config)
    except (KeyError, TypeError, ValueError) as e:
        raise refuse(path, f"transformer config is incomplete ({e!r})",
                     expected="a diffusers Flux2Transformer2DModel config") from None
    for name, shape in want.items():
        if name not in tensors:
            raise refuse(path, "is missing", tensor=name, expected=f"shape {list(shape)} (config {_cfg_brief(config)})")
    for name, t in tensors.items():
        if name not in want:
            raise refuse(path, "is not a parameter of Flux2Transformer2DModel", tensor=name,
                         expected=f"only the model's parameters (config {_cfg_brief(config)})")
        got = shape_of(t)
        if got != want[name]:
            raise refuse(path, f"has shape {list(got)}", tensor=name,
                         expected=f"{list(want[name])} (config {_cfg_brief(config)})")


def validate_or_infer(path, tensors: dict[str, Tensorish], config: dict | None, notes: list[str]) -> dict:
    """Validate against ``config``, or, when the source has none, against the shape-derived config.

    Returns the config used. A missing key tensor or inconsistent shapes are refused.
    """
    from .flux2_names import infer_config, shape_of

    if config is not None:
        validate_tensors(path, tensors, config)
        return config
    try:
        cfg = infer_config({n: shape_of(t) for n, t in tensors.items()})
    except KeyError as e:
        raise refuse(path, "is missing", tensor=str(e.args[0]), expected="every FLUX.2 transformer tensor") from None
    except (ValueError, IndexError) as e:
        raise refuse(path, f"tensor shapes are inconsistent ({e})", expected="a FLUX.2 transformer") from None
    validate_tensors(path, tensors, cfg)
    notes.append(f"no diffusers config in the source; shapes are consistent with {cfg} "
                 "(flux2_names.infer_config; RoPE axes/theta are not visible in tensors)")
    return cfg


def _cfg_brief(config: dict) -> str:
    keys = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim")
    return ", ".join(f"{k}={config.get(k)}" for k in keys)


def scales_to_fp16(s: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Round non-negative scales (any float dtype) to fp16.

    Returns ``(d, n_inexact, max_rel_err)``; ``max_rel_err`` is over the nonzero scales that moved.
    Raises ValueError for scales fp16 cannot hold (non-finite, over 65504, or nonzero that round to 0).
    """
    s64 = s.to(torch.float64)
    if not torch.isfinite(s64).all():
        raise ValueError("non-finite scale")
    d = s.to(torch.float16)
    back = d.to(torch.float64)
    if not torch.isfinite(back).all():
        raise ValueError(f"scale {float(s64.max()):.6g} is over fp16's range (65504)")
    if ((back == 0) & (s64 != 0)).any():
        raise ValueError(f"scale {float(s64[(back == 0) & (s64 != 0)].abs().min()):.3g} underflows fp16 to 0")
    moved = back != s64
    n = int(moved.sum())
    err = float(((back - s64).abs()[moved] / s64.abs()[moved]).max()) if n else 0.0
    return d, n, err


# ---------------------------------------------------------------------------------------------
# Detection and dispatch
# ---------------------------------------------------------------------------------------------
def _safetensors_format(path: Path) -> str | None:
    try:
        _, meta = read_safetensors_header(path)
    except BonsaiCheckpointError:
        return None
    return meta.get("format")


def _has_scales(path: Path) -> bool:
    try:
        header, _ = read_safetensors_header(path)
    except BonsaiCheckpointError:
        return False
    return any(n.endswith(".scales") for n in header)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


LOOKED_FOR = (
    "a .gguf file (gguf_q1); "
    "a folder with state_dict.pt + quantization_config.json, or one holding transformer-gemlite-int1/ (gemlite); "
    "a folder with diffusion_pytorch_model.safetensors + quantization_config.json whose tensors have .scales, "
    "or one holding transformer-packed-mflux/ (mlx); "
    "a diffusers transformer folder or .safetensors file with dense weights, or a repo folder holding transformer/ (unpacked); "
    "a .safetensors whose metadata has format == 'bonsai' (bonsai)"
)


def detect_layout(path) -> str:
    """Which public layout ``path`` holds: "gguf_q1", "gemlite", "mlx", "unpacked" or "bonsai"."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _is_gguf(p):
            return "gguf_q1"
        if p.suffix.lower() == ".safetensors":
            fmt = _safetensors_format(p)
            if fmt == "bonsai":
                return "bonsai"
            if _has_scales(p) and (p.parent / "quantization_config.json").is_file():
                return "mlx"
            if fmt is not None or _safetensors_header_ok(p):
                return "unpacked"
        if p.name in ("state_dict.pt", "quantization_config.json") and _is_gemlite_dir(p.parent):
            return "gemlite"
        if p.name == DIFFUSERS_INDEX:
            return detect_layout(p.parent)
    elif p.is_dir():
        if _is_gemlite_dir(p) or any(_is_gemlite_dir(p / d) for d in GEMLITE_DIRS):
            return "gemlite"
        if _is_mlx_dir(p) or _is_mlx_dir(p / MLX_DIR):
            return "mlx"
        for d in (p, p / "transformer"):
            for st in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
                if _safetensors_format(st) == "bonsai":
                    return "bonsai"
        for d in (p, p / "transformer"):
            if (d / DIFFUSERS_WEIGHTS).is_file() or (d / DIFFUSERS_INDEX).is_file():
                return "unpacked"
    raise BonsaiCheckpointError(
        f"{p}: not a Bonsai Image transformer layout this importer knows"
        f"{'' if p.exists() else ' (the path does not exist)'}. Looked for: {LOOKED_FOR}.")


def _safetensors_header_ok(p: Path) -> bool:
    try:
        read_safetensors_header(p)
        return True
    except BonsaiCheckpointError:
        return False


def _is_gemlite_dir(d: Path) -> bool:
    return d.is_dir() and (d / "state_dict.pt").is_file() and (d / "quantization_config.json").is_file()


def _is_mlx_dir(d: Path) -> bool:
    st = d / DIFFUSERS_WEIGHTS
    if not (d.is_dir() and st.is_file() and (d / "quantization_config.json").is_file()):
        return False
    # a header that cannot be read (truncated file) goes to the MLX importer, which says what is wrong
    return _has_scales(st) or not _safetensors_header_ok(st)


def import_transformer(path, layout: str | None = None, **options) -> ImportedTransformer:
    """Read ``path`` (any public Bonsai Image 4B transformer layout) into the common form.

    ``options`` go to the layout's importer (e.g. ``allow_dequantize=True`` for ternary files).
    """
    layout = layout or detect_layout(path)
    if layout == "gguf_q1":
        from .gguf_q1 import read_gguf
        return read_gguf(path, **options)
    if layout == "gemlite":
        from .gemlite import import_gemlite
        return import_gemlite(path, **options)
    if layout == "mlx":
        from .mlx import import_mlx
        return import_mlx(path, **options)
    if layout == "unpacked":
        from .unpacked import import_unpacked
        return import_unpacked(path, **options)
    if layout == "bonsai":
        raise BonsaiCheckpointError(
            f"{path}: is already in Bonsai format; load it with the Bonsai checkpoint loader, not an importer")
    raise BonsaiCheckpointError(f"{path}: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


__all__ = ["ImportedTransformer", "detect_layout", "import_transformer", "LAYOUTS"]
