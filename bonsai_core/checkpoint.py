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
The loader trusts the file, not its own defaults: it builds the model skeleton on the meta
device, swaps in a ``BonsaiLinear``/``BonsaiConv2d`` wherever the file says Q1_0, and assigns the
file's tensors, so no full-precision copy of a quantized weight is ever built.
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
from .quant.layers import QUANTIZED_TYPES, empty_like_float, quantized_layers
from .quant.q1_0 import BLOCK_BYTES, GROUP_SIZE, PackedWeight, n_blocks

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
    tensors: dict[str, "torch.Tensor | PackedWeight"]
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


def save_tensors(path: str | os.PathLike, tensors: dict[str, "torch.Tensor | PackedWeight"], *,
                 family: str, component: str, policy: dict | None = None,
                 reasons: dict[str, str] | None = None, extra: dict | None = None,
                 tied: dict[str, str] | None = None) -> None:
    """Write tensors (dense or ``PackedWeight``) as a Bonsai component file, atomically.
    ``tied`` (``{name: stored name}``) records weights the model shares between two names."""
    reasons = reasons or {}
    flat: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, t in tensors.items():
        if isinstance(t, PackedWeight):
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
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def model_tensors(model: nn.Module) -> tuple[dict[str, "torch.Tensor | PackedWeight"], dict[str, str]]:
    """A module's state as Bonsai tensors: each quantized layer's ``qs``/``d`` become one ``PackedWeight``."""
    report = getattr(model, "bonsai_report", None)
    decisions = report.decisions if report is not None else {}
    qlayers = quantized_layers(model)
    out: dict[str, torch.Tensor | PackedWeight] = {}
    reasons: dict[str, str] = {}
    tied = tied_names(model)
    for name, t in model.state_dict().items():
        if name in tied:  # the same tensor under a second name (tied embeddings): stored once
            continue
        mod, _, leaf = name.rpartition(".")
        if mod in qlayers and leaf in ("qs", "d"):
            if leaf == "qs":
                layer = qlayers[mod]
                out[f"{mod}.weight"] = PackedWeight(layer.qs, layer.d, layer.weight_shape)
                reasons[f"{mod}.weight"] = decisions.get(mod, "quantized: Q1_0")
            continue
        out[name] = t
        if leaf == "weight" and mod in decisions:
            reasons[name] = decisions[mod]
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
        tensors: dict[str, torch.Tensor | PackedWeight] = {}
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
                packed = PackedWeight.from_blocks(t, shape)
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


def load_into(model: nn.Module, cf: ComponentFile, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> nn.Module:
    """Fill a skeleton ``model`` (built on the meta device) with the tensors of ``cf``.

    Layers the file holds as Q1_0 become ``BonsaiLinear``/``BonsaiConv2d``; dense floating tensors
    are cast to ``dtype`` (when given). Shapes are checked against the skeleton.
    """
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, t in cf.tensors.items():
        mod_name, _, leaf = name.rpartition(".")
        if isinstance(t, PackedWeight):
            module = modules.get(mod_name)
            if module is None or leaf != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d, *QUANTIZED_TYPES)):
                raise _fail(cf.path, f"tensor {name!r} is Q1_0 but the model has no Linear/Conv2d "
                                     f"named {mod_name!r}: wrong model for this file")
            want = tuple(module.weight_shape if isinstance(module, QUANTIZED_TYPES) else module.weight.shape)
            if want != t.shape:
                raise _fail(cf.path, f"tensor {name!r} has shape {list(t.shape)}, the model expects {list(want)}")
            if not isinstance(module, QUANTIZED_TYPES):
                q = empty_like_float(module, device="meta")
                parent_name, _, attr = mod_name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
                modules[mod_name] = q
            state[f"{mod_name}.qs"] = t.qs.to(device)
            state[f"{mod_name}.d"] = t.d.to(device)
        else:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[name] = t.to(device)
    for name, source in cf.meta.get("tied", {}).items():
        state[name] = state[source]  # same tensor: the tie costs no memory; tie_weights() below restores it
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise _fail(cf.path, f"tensor {name!r} has shape {list(t.shape)}, the model expects "
                                 f"{list(expected[name].shape)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    # Non-persistent buffers and tied weights are not in files: allow what the skeleton recomputes.
    if unexpected or missing:
        raise _fail(cf.path, f"tensors do not match the model: missing {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                             f"{' ...' if len(unexpected) > 6 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    if cf.meta.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    # Buffers that are not in files (non-persistent: CLIP's position_ids, rotary tables) were made by
    # the skeleton on the CPU: move them where the model runs, keeping their dtype.
    for mod in model.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and not buf.is_meta and buf.device != torch.device(device):
                mod._buffers[bname] = buf.to(device)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            raise _fail(cf.path, "a tensor of the model was not filled from the file")
    return model.eval().requires_grad_(False)


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
