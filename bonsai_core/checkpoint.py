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
    tensors         JSON: {name: {"type": "Q1_0" | "Q4_AFFINE" | "F16" | "BF16" | "F32" | ..., "shape": [...],
                          "reason": "..."}}; a Q4_AFFINE entry also has "group_size" (even, dividing the
                          row) and "scale_dtype" / "bias_dtype" ("F16" | "BF16" | "F32")

A Q1_0 tensor ``<module>.weight`` is stored as uint8 ``[rows, n_blocks*18]``: GGUF's 18-byte
``block_q1_0`` (fp16 scale, then 16 bytes of sign bits), so it moves to a ``.gguf`` unchanged.
In memory that tensor is a ``Q1Tensor`` (quant/tensor.py) under the same key. A Q4_AFFINE tensor
(4-bit text encoders, quant/q4_affine.py) is stored as uint8 ``[rows, groups * block bytes]``, a
block per group (scale | bias | codes), and is a ``Q4Tensor`` in memory. ``group_size`` in the
metadata is Q1_0's; a Q4_AFFINE tensor names its own. A reader that predates Q4_AFFINE refuses such
a file by its type label, naming it; files without one are written exactly as before. Building models
from these files is ``loader.py``'s job; this module only reads and writes them.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import BonsaiCheckpointError
from .quant import q4_affine
from .quant.q1_0 import BLOCK_BYTES, GROUP_SIZE, n_blocks
from .quant.tensor import PackedTensor, Q1Tensor, Q4Tensor

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
    tensors: dict[str, torch.Tensor]  # dense tensors and packed (Q1Tensor / Q4Tensor) weights
    meta: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.meta.get("family", "")

    @property
    def policy(self) -> dict:
        return self.meta.get("policy", {})


def is_bonsai_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a readable safetensors file whose header says it is a Bonsai file."""
    return sniff_format(path) == "bonsai"


_SNIFF_BYTES = 1 << 20


def sniff_format(path: str | os.PathLike) -> str:
    """What a ``.safetensors`` path holds, from its first bytes only (a FIFO or folder is never opened):

    ``"bonsai"`` (a readable Bonsai header), ``"safetensors"`` (another readable header),
    ``"broken-bonsai"`` (the header cannot be parsed, or the data is cut short, but its text says
    ``"format":"bonsai"``: a damaged Bonsai file, reported as such, never taken for a dense one),
    ``"broken"`` (anything else: not a plain file, empty, truncated, not safetensors)."""
    import stat as _stat

    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return "broken"
    if not _stat.S_ISREG(st.st_mode):
        return "broken"
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return "broken"
    marker = b'"format":"' + FORMAT_NAME.encode() + b'"' in head
    if len(head) < 8:
        return "broken"
    n = int.from_bytes(head[:8], "little")
    if n < 2 or 8 + n > st.st_size or n > 100 * 2**20:
        return "broken-bonsai" if marker else "broken"
    try:
        if 8 + n <= len(head):
            raw = head[8:8 + n]
        else:  # a header longer than the first read: read exactly the rest of it
            with open(path, "rb") as f:
                f.seek(8)
                raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
        meta = header.get("__metadata__") or {}
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:  # noqa: BLE001 - any parse failure means "not readable"
        return "broken-bonsai" if marker else "broken"
    is_bonsai = isinstance(meta, dict) and meta.get("format") == FORMAT_NAME
    if 8 + n + end > st.st_size:
        return "broken-bonsai" if is_bonsai or marker else "broken"
    return "bonsai" if is_bonsai else "safetensors"


# Temporary names: ".<dst name>.bonsai-<pid>-<random>.partial" (being written) and ".old" (the previous
# model during an --overwrite swap), always beside the destination. The pid says whether the writer
# still runs, so the next run recognises what a killed run left behind and cleans it (or restores it).
_TMP_TAG = ".bonsai-"


def partial_name(name: str, suffix: str = ".partial") -> str:
    return f".{name}{_TMP_TAG}{os.getpid()}-{os.urandom(4).hex()}{suffix}"


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets as it reads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


STALE_SECONDS = 24 * 3600  # a leftover whose pid was reused by another process is still removed after a day


def clean_stale(dst: Path) -> list[str]:
    """Remove what killed runs left beside ``dst`` (``.partial`` files and folders of a writer that no
    longer runs), and restore a model that a killed ``--overwrite`` had moved aside before the new one
    was in place (a ``.old`` folder while ``dst`` is missing). Returns what was done, for the log."""
    import shutil
    import time

    dst = Path(dst)
    parent = dst.parent
    if not parent.is_dir():
        return []
    prefix = f".{dst.name}{_TMP_TAG}"
    done = []
    olds = []
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix) or not p.name.endswith((".partial", ".old")):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            age = time.time() - p.lstat().st_mtime
        except OSError:
            continue
        if pid != os.getpid() and _pid_alive(pid) and age < STALE_SECONDS:
            continue  # another run is writing it now
        if p.name.endswith(".old"):
            olds.append((p.lstat().st_mtime, p))
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        done.append(f"removed {p.name} (left by a run that was stopped)")
    done += _clean_legacy(dst)
    for _mtime, p in sorted(olds, reverse=True):
        if not dst.exists() and not dst.is_symlink():
            p.rename(dst)
            done.append(f"restored {dst} from {p.name} (an --overwrite was stopped before the new model was in place)")
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
        else:
            p.unlink(missing_ok=True)
    return done


LEGACY_STALE_SECONDS = 3600


def _clean_legacy(dst: Path) -> list[str]:
    """Leftovers of versions before the ``.bonsai-<pid>-`` names (``tempfile`` names ``.<name>.<random>.partial``
    and ``.old`` folders holding the previous model under its own name): no pid says whether their writer
    still runs, so only those untouched for an hour are cleaned; a model inside an ``.old`` comes back when
    ``dst`` is missing."""
    import re
    import shutil
    import time

    pattern = re.compile(re.escape(f".{dst.name}.") + r"[A-Za-z0-9_]{6,12}\.(partial|old)$")
    done = []
    for p in sorted(dst.parent.iterdir()):
        if not pattern.match(p.name):
            continue
        try:
            if time.time() - p.lstat().st_mtime < LEGACY_STALE_SECONDS:
                continue
        except OSError:
            continue
        inner = p / dst.name
        if p.name.endswith(".old") and inner.is_dir() and not (dst.exists() or dst.is_symlink()):
            inner.rename(dst)
            done.append(f"restored {dst} from {p.name} (left by an older version's stopped --overwrite)")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p.name} (left by an older version's stopped run)")
    return done


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``: a failure never leaves a half file, and a
    killed run's temporary file is removed by the next write of the same path. The file gets the
    user's umask permissions (a temporary file is created 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.parent / partial_name(path.name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(dst: Path):
    """Build a folder in a hidden temporary folder beside ``dst`` and move it onto ``dst`` only when
    the ``with`` block completes (an old ``dst`` is replaced only then); on any failure the
    temporary folder is removed. At no moment is a half-written model at ``dst``.

    A run killed at any moment leaves at most a ``.partial`` folder (removed by the next run) or, in
    the instant of an ``--overwrite`` swap, the old model as ``.old`` while ``dst`` is missing: the next
    run (any command writing ``dst``, or ``clean_stale``) puts it back."""
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst)
    tmp = dst.parent / partial_name(dst.name)
    tmp.mkdir(mode=0o777)  # mode under the umask, as any folder the user makes
    try:
        yield tmp
        if dst.exists() or dst.is_symlink():
            old = dst.parent / partial_name(dst.name, ".old")
            dst.rename(old)
            tmp.rename(dst)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place. safetensors keeps the
    metadata in a hash map, whose order changes from run to run: without this, the same model
    written twice gives files with different bytes (and sha256). Same length, padded with spaces."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n).decode("utf-8"))
        meta = header.pop("__metadata__", None)
        ordered = {}
        if meta is not None:
            ordered["__metadata__"] = dict(sorted(meta.items()))
        ordered.update(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]))
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > n:
            return  # cannot happen for a compact header; keep the library's bytes rather than move data
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


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
        elif isinstance(t, Q4Tensor):
            flat[name] = t.to_blocks().contiguous().cpu()
            index[name] = {"type": t.qtype, "shape": list(t.shape), **t.header_entry()}
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
    def write(tmp: Path) -> None:
        save_file(flat, str(tmp), metadata=meta)
        _canonical_header(tmp)

    atomic_write(Path(path), write)


def tied_names(model: nn.Module) -> dict[str, str]:
    """State-dict names that are the very same tensor as an earlier name (``lm_head.weight`` tied to
    ``model.embed_tokens.weight``, say): ``{later name: first name}``. Stored once, tied again on load."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        inner = t.qs if isinstance(t, PackedTensor) else t  # a packed weight has no storage of its own
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
        if leaf == "weight" and (mod in decisions or isinstance(t, PackedTensor)):
            reasons[name] = decisions.get(mod, f"quantized: {getattr(t, 'qtype', 'Q1_0')}")
    return out, reasons


def _fail(path: Path, what: str) -> BonsaiCheckpointError:
    return BonsaiCheckpointError(f"{path}: {what}")


def _open(path: Path):
    from .validate import check_regular_file

    check_regular_file(path, "Bonsai weights file")  # never opens a FIFO, socket or folder
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
        version = int(str(meta_raw.get("format_version", "?")).strip())
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
    except (KeyError, ValueError) as exc:
        raise _fail(path, f"header 'tensors'/'policy'/'tied' entry missing or not JSON ({exc!r})") from exc
    if version < 1:
        raise _fail(path, f"format_version {version} is not a Bonsai format version (1..{FORMAT_VERSION})")
    _check_index_types(path, index, policy, tied)
    keys = set(f.keys())
    if keys != set(index):
        extra, missing = sorted(keys - set(index)), sorted(set(index) - keys)
        raise _fail(path, f"header and data disagree: tensors not in the header {extra[:5]}, "
                          f"header entries with no data {missing[:5]}")
    bad = sorted(k for k, v in tied.items() if v not in index or k in index)
    if bad:
        raise _fail(path, f"header ties {bad[:3]} to tensors the file does not hold (or ties a stored name)")
    meta = dict(meta_raw)
    meta.update(policy=policy, tensors=index, tied=tied, format_version=version)
    return meta


_TYPE_LABELS = frozenset(_DTYPE_NAMES.values()) | {"Q1_0", q4_affine.QTYPE}
MAX_DIM = 1 << 32
MAX_NUMEL = 1 << 40


def _check_index_types(path: Path, index, policy, tied) -> None:
    """The JSON of a Bonsai header has the types the format says: ``tensors`` an object of
    ``{"type": label, "shape": [whole numbers]}``, ``policy`` an object, ``tied`` an object of names."""
    if not isinstance(index, dict) or not index:
        raise _fail(path, f"header 'tensors' is {type(index).__name__} {str(index)[:60]!r}, expected an object "
                          "naming every tensor; the file is corrupt: convert or import the model again")
    if not isinstance(policy, dict):
        raise _fail(path, f"header 'policy' is {type(policy).__name__} {str(policy)[:60]!r}, expected an object")
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise _fail(path, f"header 'tied' is {str(tied)[:80]!r}, expected an object of tensor names")
    for name, info in index.items():
        if not isinstance(info, dict):
            raise _fail(path, f"header entry of tensor {name!r} is {info!r}, expected {{'type': ..., 'shape': [...]}}")
        qtype, shape = info.get("type"), info.get("shape")
        if not isinstance(qtype, str) or qtype not in _TYPE_LABELS:
            raise _fail(path, f"tensor {name!r} has type {qtype!r}; expected one of {', '.join(sorted(_TYPE_LABELS))}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM
                                                for s in shape)):
            raise _fail(path, f"tensor {name!r} has shape {shape!r}; expected a list of whole numbers >= 0")
        numel = 1
        for s in shape:
            numel *= s
        if numel > MAX_NUMEL:
            raise _fail(path, f"tensor {name!r} has shape {shape} ({numel} values), more than any model holds")
        if qtype == "Q1_0" and (len(shape) not in (2, 4) or 0 in shape):
            raise _fail(path, f"tensor {name!r} is Q1_0 of shape {shape}; a Q1_0 weight is [out, in] or "
                              "[out, in, kh, kw] with no zero dimension")
        if qtype == q4_affine.QTYPE:
            _check_q4_entry(path, name, info, shape)
        if "reason" in info and not isinstance(info["reason"], str):
            raise _fail(path, f"tensor {name!r} has reason {info['reason']!r}, expected text")


def _check_q4_entry(path: Path, name: str, info: dict, shape: list) -> None:
    """A Q4_AFFINE header entry: 2-D, no zero dimension, an even group size dividing the row, and the
    scale / bias dtypes named from the three the type allows."""
    if len(shape) != 2 or 0 in shape:
        raise _fail(path, f"tensor {name!r} is Q4_AFFINE of shape {shape}; a Q4_AFFINE weight is [out, in] with "
                          "no zero dimension")
    group = info.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or group % 2 or shape[1] % group:
        raise _fail(path, f"tensor {name!r} is Q4_AFFINE with group_size {group!r}; expected an even whole number "
                          f"that divides its {shape[1]} columns (64 for the public text encoders)")
    for key in ("scale_dtype", "bias_dtype"):
        if not isinstance(info.get(key), str) or info[key] not in q4_affine.DTYPES:
            raise _fail(path, f"tensor {name!r} is Q4_AFFINE with {key} {info.get(key)!r}; expected one of "
                              f"{', '.join(q4_affine.DTYPES)}")


def _q4_layout(info: dict) -> tuple[int, torch.dtype, torch.dtype]:
    return info["group_size"], q4_affine.DTYPES[info["scale_dtype"]], q4_affine.DTYPES[info["bias_dtype"]]


def _packed_width(info: dict) -> tuple[int, int]:
    """Bytes per row of a packed tensor's stored blocks, and the bytes of one block."""
    shape = info["shape"]
    cols = 1
    for s in shape[1:]:
        cols *= s
    if info["type"] == q4_affine.QTYPE:
        group, sd, bd = _q4_layout(info)
        block = q4_affine.block_bytes(group, sd, bd)
        return cols // group * block, block
    return n_blocks(cols) * BLOCK_BYTES, BLOCK_BYTES


def read_header(path: str | os.PathLike) -> dict:
    """The checked header of a Bonsai component file, without reading its tensors (``bonsai info``)."""
    path = Path(path)
    with _open(path) as f:
        return _checked_header(path, f)


def check_scales(path: str | os.PathLike, meta: dict | None = None) -> None:
    """Every scale (and Q4_AFFINE bias) of a Bonsai file is finite, read through a memory map: only the
    scale bytes of each block are looked at and no tensor is built (``bonsai info``'s data check; the
    loader checks the same on the tensors it reads)."""
    import numpy as np

    path = Path(path)
    meta = meta or read_header(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        offsets = json.loads(f.read(n).decode("utf-8"))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in meta["tensors"].items():
        if info["type"] not in ("Q1_0", q4_affine.QTYPE):
            continue
        begin, end = offsets[name]["data_offsets"]
        blocks = data[8 + n + begin: 8 + n + end]
        _row, block = _packed_width(info)
        if blocks.size % block:
            raise _fail(path, f"tensor {name!r} holds {blocks.size} bytes, not whole {block}-byte {info['type']} blocks")
        if info["type"] == "Q1_0":
            fields = [("scale", 0, torch.float16)]
        else:
            _group, sd, bd = _q4_layout(info)
            fields = [("scale", 0, sd), ("bias", torch.empty(0, dtype=sd).element_size(), bd)]
        per_row = _row // block
        for what, at, kind in fields:
            size = torch.empty(0, dtype=kind).element_size()
            raw = np.ascontiguousarray(blocks.reshape(-1, block)[:, at:at + size])
            vals = torch.from_numpy(raw).view(kind).reshape(-1)  # torch is little-endian where we run
            bad = np.flatnonzero((~torch.isfinite(vals)).numpy())
            if bad.size:
                raise _fail(path, f"tensor {name!r} has a NaN/inf {what} at row {bad[0] // per_row}, group "
                                  f"{bad[0] % per_row}; the file is corrupt: download or convert it again")
    del data


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
            if qtype in ("Q1_0", q4_affine.QTYPE):
                want = (shape[0] if shape else 0, _packed_width(info)[0])
                if t.dtype != torch.uint8 or tuple(t.shape) != want:
                    raise _fail(path, f"tensor {name!r} is labelled {qtype} of shape {list(shape)}, so it should be "
                                      f"uint8 {list(want)}, but holds {t.dtype} {list(t.shape)}")
                if qtype == "Q1_0":
                    packed = Q1Tensor.from_blocks(t, shape)
                else:
                    packed = Q4Tensor.from_blocks(t, shape, *_q4_layout(info))
                del t
                bad = packed.first_nonfinite()
                if bad is not None:
                    what = "scale" if bad[0] in ("d", "scale") else bad[0]
                    raise _fail(path, f"tensor {name!r} has a NaN/inf {what} at row {bad[1]}, group {bad[2]}; "
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
