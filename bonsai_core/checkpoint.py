"""Bonsai checkpoints: read and write quantized model components, never unpickling anything.

A Bonsai model is a diffusers-style folder (``model_index.json``, ``unet/`` or ``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). A quantized component is a folder
with the diffusers ``config.json`` and one ``.safetensors`` file whose header metadata says, tensor
by tensor, what it holds:

    format          "bonsai"
    format_version  "1"
    group_size      "128"
    family          "sd_unet" | "flux2_klein"
    component       "unet" | "transformer" | "text_encoder"
    policy          JSON: the precision policy applied (see quant/policy.py)
    tensors         JSON: {name: {"type": "Q1_0" | "F16" | "BF16" | "F32" | ..., "shape": [...], "reason": "..."}}

A Q1_0 tensor ``<module>.weight`` is stored as uint8 ``[rows, n_blocks*18]``: GGUF's 18-byte
``block_q1_0`` (fp16 scale, then 16 bytes of sign bits), so it moves to a ``.gguf`` unchanged.
In memory that tensor is a ``Q1Tensor`` (quant/tensor.py) under the same key. Building models
from these files is ``loader.py``'s job; this module only reads and writes them.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import BonsaiCheckpointError
from .quant.q1_0 import BLOCK_BYTES, GROUP_SIZE, n_blocks
from .quant.tensor import Q1Tensor

FORMAT_NAME = "bonsai"
FORMAT_VERSION = 1
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TE_WEIGHTS_NAME = "model.safetensors"

_DTYPE_NAMES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class ComponentFile:
    """One quantized component as read from disk: its tensors, checked against the header."""

    path: Path
    tensors: dict[str, torch.Tensor]  # dense tensors and Q1Tensor weights
    meta: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.meta.get("family", "")

    @property
    def policy(self) -> dict:
        return self.meta.get("policy", {})


def is_bonsai_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose header says it is a Bonsai file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except Exception:
        return False


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``: a failure never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(dst: Path):
    """Build a folder in a hidden temporary folder beside ``dst`` and move it onto ``dst`` only when
    the ``with`` block completes (an old ``dst`` is replaced only then); on any failure the
    temporary folder is removed. At no moment is a half-written model at ``dst``."""
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            dst.rename(trash / dst.name)
            tmp.rename(dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *,
                 family: str, component: str, policy: dict | None = None,
                 reasons: dict[str, str] | None = None, extra: dict | None = None,
                 tied: dict[str, str] | None = None) -> None:
    """Write tensors (dense or ``Q1Tensor``, which is stored as its 18-byte blocks) as a Bonsai
    component file, atomically.
    ``tied`` (``{name: stored name}``) records weights the model shares between two names."""
    reasons = reasons or {}
    flat: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, t in tensors.items():
        if isinstance(t, Q1Tensor):
            flat[name] = t.to_blocks().contiguous().cpu()
            index[name] = {"type": "Q1_0", "shape": list(t.shape)}
        else:
            flat[name] = t.detach().contiguous().cpu()
            index[name] = {"type": _DTYPE_NAMES.get(t.dtype, str(t.dtype)), "shape": list(t.shape)}
        if name in reasons:
            index[name]["reason"] = reasons[name]
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "group_size": str(GROUP_SIZE),
        "family": family, "component": component,
        "policy": json.dumps(policy or {}), "tensors": json.dumps(index),
    }
    if tied:
        unknown = sorted(v for v in tied.values() if v not in tensors)
        if unknown:
            raise ValueError(f"tied names point at tensors that are not saved: {unknown}")
        meta["tied"] = json.dumps(tied)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    atomic_write(Path(path), lambda tmp: save_file(flat, str(tmp), metadata=meta))


def tied_names(model: nn.Module) -> dict[str, str]:
    """State-dict names that are the very same tensor as an earlier name (``lm_head.weight`` tied to
    ``model.embed_tokens.weight``, say): ``{later name: first name}``. Stored once, tied again on load."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        inner = t.qs if isinstance(t, Q1Tensor) else t  # a Q1_0 weight has no storage of its own
        key = (inner.untyped_storage().data_ptr(), inner.storage_offset(), tuple(t.shape), t.dtype)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A module's state as Bonsai tensors (each quantized layer's weight is its ``Q1Tensor``), and the
    reason recorded for each weight layer."""
    report = getattr(model, "bonsai_report", None)
    decisions = report.decisions if report is not None else {}
    out: dict[str, torch.Tensor] = {}
    reasons: dict[str, str] = {}
    tied = tied_names(model)
    for name, t in model.state_dict().items():
        if name in tied:  # the same tensor under a second name (tied embeddings): stored once
            continue
        out[name] = t
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and (mod in decisions or isinstance(t, Q1Tensor)):
            reasons[name] = decisions.get(mod, "quantized: Q1_0")
    return out, reasons


def _fail(path: Path, what: str) -> BonsaiCheckpointError:
    return BonsaiCheckpointError(f"{path}: {what}")


def _open(path: Path):
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # truncated or not safetensors at all
        raise _fail(path, f"not a readable safetensors file ({exc}); the file may be truncated: "
                          "download or convert it again") from exc


def _checked_header(path: Path, f) -> dict:
    """The header of an open Bonsai file, parsed and checked against the tensors it lists."""
    meta_raw = f.metadata() or {}
    if meta_raw.get("format") != FORMAT_NAME:
        raise _fail(path, f"header format is {meta_raw.get('format')!r}, expected {FORMAT_NAME!r}: "
                          "this is not a Bonsai file (convert it with `bonsai convert`)")
    try:
        version = int(meta_raw.get("format_version", "?"))
    except ValueError:
        raise _fail(path, f"format_version {meta_raw.get('format_version')!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise _fail(path, f"format version {version} is newer than this ComfyUI-Bonsai reads "
                          f"({FORMAT_VERSION}); upgrade comfyui-bonsai")
    if meta_raw.get("group_size") != str(GROUP_SIZE):
        raise _fail(path, f"group_size {meta_raw.get('group_size')!r}, expected {GROUP_SIZE}")
    try:
        index = json.loads(meta_raw["tensors"])
        policy = json.loads(meta_raw.get("policy", "{}"))
        tied = json.loads(meta_raw.get("tied", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise _fail(path, f"header 'tensors'/'policy' entry missing or not JSON ({exc})") from exc
    keys = set(f.keys())
    if keys != set(index):
        extra, missing = sorted(keys - set(index)), sorted(set(index) - keys)
        raise _fail(path, f"header and data disagree: tensors not in the header {extra[:5]}, "
                          f"header entries with no data {missing[:5]}")
    bad = sorted(k for k, v in tied.items() if v not in index)
    if bad:
        raise _fail(path, f"header ties {bad[:3]} to tensors the file does not hold")
    meta = dict(meta_raw)
    meta.update(policy=policy, tensors=index, tied=tied, format_version=version)
    return meta


def read_header(path: str | os.PathLike) -> dict:
    """The checked header of a Bonsai component file, without reading its tensors (``bonsai info``)."""
    path = Path(path)
    with _open(path) as f:
        return _checked_header(path, f)


def read_tensors(path: str | os.PathLike) -> ComponentFile:
    """Read and check a Bonsai component file. Every inconsistency is a ``BonsaiCheckpointError``."""
    path = Path(path)
    with _open(path) as f:
        meta = _checked_header(path, f)
        tensors: dict[str, torch.Tensor] = {}
        for name, info in meta["tensors"].items():
            try:
                t = f.get_tensor(name)
            except Exception as exc:
                raise _fail(path, f"tensor {name!r} cannot be read ({exc}); the file may be truncated") from exc
            shape = tuple(info.get("shape", ()))
            qtype = info.get("type")
            if qtype == "Q1_0":
                rows = shape[0] if shape else 0
                cols = 1
                for s in shape[1:]:
                    cols *= s
                want = (rows, n_blocks(cols) * BLOCK_BYTES)
                if t.dtype != torch.uint8 or tuple(t.shape) != want:
                    raise _fail(path, f"tensor {name!r} is labelled Q1_0 of shape {list(shape)}, so it should be "
                                      f"uint8 {list(want)}, but holds {t.dtype} {list(t.shape)}")
                packed = Q1Tensor.from_blocks(t, shape)
                del t
                if not torch.isfinite(packed.d).all():
                    bad = (~torch.isfinite(packed.d)).nonzero()[0].tolist()
                    raise _fail(path, f"tensor {name!r} has a NaN/inf scale at row {bad[0]}, group {bad[1]}; "
                                      "the file is corrupt: convert the model again")
                tensors[name] = packed
            else:
                if _DTYPE_NAMES.get(t.dtype) != qtype or tuple(t.shape) != shape:
                    raise _fail(path, f"tensor {name!r} is labelled {qtype} {list(shape)} but holds "
                                      f"{_DTYPE_NAMES.get(t.dtype, t.dtype)} {list(t.shape)}")
                tensors[name] = t
    return ComponentFile(path, tensors, meta)


def find_weights(component_dir: Path) -> Path:
    for name in (WEIGHTS_NAME, TE_WEIGHTS_NAME):
        if (component_dir / name).is_file():
            return component_dir / name
    found = sorted(component_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise BonsaiCheckpointError(
        f"{component_dir}: expected one weights file ({WEIGHTS_NAME} or {TE_WEIGHTS_NAME}), found "
        f"{[p.name for p in found] or 'none'}")
