"""Which device and dtype to run on, and why.

``auto`` picks cuda, then mps, then cpu. Naming a device that is not there is a
``BonsaiDeviceError``: we never fall back silently, because a user who asked for the GPU and
got the CPU would only notice after a very slow image.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .errors import BonsaiDeviceError

DEVICE_CHOICES = ("auto", "cuda", "cuda:N", "mps", "cpu")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype
    reason: str  # one line: what was chosen and why

    def __str__(self) -> str:
        return self.reason


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | None = None, source: str | None = None) -> tuple[torch.device, str]:
    """Turn ``auto|cuda|cuda:N|mps|cpu`` (argument, else ``BONSAI_DEVICE``, else auto) into a device.
    ``source`` says where a given ``name`` came from (e.g. "env BONSAI_DEVICE"), for the messages."""
    source = source or "argument"
    if name is None or name == "":
        name = os.environ.get("BONSAI_DEVICE", "") or "auto"
        source = "BONSAI_DEVICE" if os.environ.get("BONSAI_DEVICE") else "default"
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if _mps_available():
            return torch.device("mps"), "auto: no CUDA, Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS found, using the CPU"
    if name == "cpu":
        return torch.device("cpu"), f"cpu asked for ({source})"
    if name == "mps":
        if not _mps_available():
            raise BonsaiDeviceError(
                f"device 'mps' was asked for ({source}) but Apple MPS is not available on this machine; "
                "use device 'auto' or 'cpu'")
        return torch.device("mps"), f"mps asked for ({source})"
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            raise BonsaiDeviceError(
                f"device '{name}' was asked for ({source}) but no CUDA GPU is visible to PyTorch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                "install a CUDA build of torch or use device 'auto' or 'cpu'")
        index = int(m.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise BonsaiDeviceError(
                f"device '{name}' was asked for ({source}) but this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1}); pick one of those")
        return torch.device("cuda", index), f"{name} asked for ({source}): {torch.cuda.get_device_name(index)}"
    raise BonsaiDeviceError(
        f"unknown device {name!r} ({source}); use one of {', '.join(DEVICE_CHOICES)}")


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return False  # MPS has refused bf16 on older macOS; we never pick it there
    return True  # the CPU computes bf16 (slowly): allowed when asked


def pick(device: str | None = None, dtype: str | torch.dtype | None = None,
         source: str | None = None) -> DeviceChoice:
    """Pick the device and the compute dtype that suits it.

    fp16 on cuda and mps, fp32 on cpu (CPU half-precision matmuls are slow and lossy);
    bf16 only where asked and supported.
    """
    dev, why = resolve_device(device, source)
    if isinstance(dtype, torch.dtype):
        chosen = dtype
        dsrc = "asked for"
    elif dtype is None or str(dtype).lower() == "auto":
        chosen = torch.float32 if dev.type == "cpu" else torch.float16
        dsrc = "default for " + dev.type
    else:
        key = str(dtype).lower()
        if key not in _DTYPES:
            raise BonsaiDeviceError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
        chosen = _DTYPES[key]
        dsrc = "asked for"
    if chosen == torch.bfloat16 and not _bf16_supported(dev):
        raise BonsaiDeviceError(
            f"bf16 was asked for on {dev} which does not support it; use dtype 'fp16' or 'auto'")
    name = str(chosen).replace("torch.", "")
    return DeviceChoice(dev, chosen, f"{dev} / {name} ({why}; dtype {dsrc})")


def free_cache(device: torch.device | None = None) -> None:
    """Give cached device memory back to the driver (after unloading or replacing a model)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
    if _mps_available() and (device is None or device.type == "mps"):
        torch.mps.empty_cache()
