"""One kernel contract for every packed-weight product (Q1_0 and Q4_AFFINE), linear and conv.

A kernel is an object with a ``name`` and three members (and optionally ``qtypes``, the weight
types it takes; without it a kernel takes Q1_0 only):

* ``supports(x, w) -> bool``: can it compute with input ``x`` and packed weight ``w``;
* ``linear(x, w, bias) -> Tensor``: ``x @ W.T + bias``;
* ``conv2d(x, w, bias, stride, padding, dilation) -> Tensor``, or ``conv2d = None`` for a kernel
  that does no convs (the reference then computes them).

The reference kernel (dequantize into the input's dtype, then the dense op) runs on every device
and is what every other kernel is tested against; for a Q4_AFFINE weight it is the path on every
device (and the ``cpu-cache`` kernel on a CPU). Others ``register`` themselves: ``cpu-cache``
(``cpu_cache.py``: each CPU layer's dense weight kept within a memory budget) when this module is
imported, the CUDA ones (``triton_q1.py``) the first time a CUDA tensor comes through, so CPU-only
installs never import Triton.

Which kernel runs is chosen once per process from ``BONSAI_KERNEL``:
``auto`` (default: the first registered kernel that takes part in auto and supports the inputs,
else the reference), ``reference``, or a kernel's name (``triton``, ``mma``, ``w1``, ``w4``
(Q4_AFFINE), ``dequant``, ``gemv``, ``fused`` on CUDA). A name that no kernel has is refused on
every device with a ``BonsaiDeviceError``. A named kernel that cannot take some inputs (``fused`` on
a CPU tensor, ``mma`` without a CUDA compiler) leaves them to the auto choice, with one warning.
``forced(name)`` overrides the choice inside a ``with`` block (tests, benchmarks), strictly: there
an input the kernel does not support is an error, so a benchmark never measures the wrong path.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import BonsaiDeviceError
from .tensor import PackedTensor

log = logging.getLogger(__name__)

ENV = "BONSAI_KERNEL"
ACT_ENV = "BONSAI_ACT"
# Activation precisions a kernel may compute with: "16" (the input's own bf16/fp16: exact W1A16,
# the default) or 8-bit per-token activations on 8-bit tensor cores (W1A8, opt-in, CUDA only).
ACTS = ("16", "fp8", "int8")
# Kernel names provided by modules imported only when a CUDA tensor first arrives.
LAZY_NAMES = {"triton": "cuda", "mma": "cuda", "w1": "cuda", "w4": "cuda", "dequant": "cuda", "gemv": "cuda",
              "fused": "cuda", "overlap": "cuda"}


class ReferenceKernel:
    """Dequantize into the input's dtype and run the dense op: every device, every dtype."""

    name = "reference"

    qtypes = ("Q1_0", "Q4_AFFINE")

    def supports(self, x: torch.Tensor, w: PackedTensor) -> bool:
        return True

    def linear(self, x, w, bias):
        return F.linear(x, w.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    def conv2d(self, x, w, bias, stride, padding, dilation):
        return F.conv2d(x, w.dequantize(x.dtype), None if bias is None else bias.to(x.dtype),
                        stride, padding, dilation)


REFERENCE = ReferenceKernel()
_REGISTRY: dict[str, object] = {}      # name -> kernel, in priority order for auto
_IN_AUTO: dict[str, bool] = {}
_STATE = {"choice": None, "act": None, "cuda_loaded": False, "warned": set()}
_LOCAL = threading.local()


def register(kernel, auto: bool = True) -> None:
    """Add a kernel, ahead of those registered before it in the auto order; ``auto=False`` keeps
    it out of the auto choice (it runs only when named)."""
    others = {k: v for k, v in _REGISTRY.items() if k != kernel.name}
    _REGISTRY.clear()
    _REGISTRY[kernel.name] = kernel
    _REGISTRY.update(others)
    _IN_AUTO[kernel.name] = auto


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    _IN_AUTO.pop(name, None)


def known_names() -> list[str]:
    return ["auto", REFERENCE.name, *sorted(set(_REGISTRY) | set(LAZY_NAMES))]


def _check(name: str, where: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in known_names():
        raise BonsaiDeviceError(f"{where}{name!r} is not a kernel; use one of {', '.join(known_names())}")
    return name


def choice() -> str:
    """The process-wide choice: read from ``BONSAI_KERNEL`` once, then kept."""
    if _STATE["choice"] is None:
        _STATE["choice"] = _check(os.environ.get(ENV, "auto"), f"{ENV}=")
    return _STATE["choice"]


def act() -> str:
    """The activation precision from ``BONSAI_ACT`` (``16``, ``fp8`` or ``int8``), read once, then kept.

    Only the CUDA kernels look at it: on a CPU or MPS every product stays in the input's dtype.
    """
    if _STATE["act"] is None:
        value = os.environ.get(ACT_ENV, "16").strip().lower() or "16"
        value = {"bf16": "16", "fp16": "16", "none": "16"}.get(value, value)
        if value not in ACTS:
            raise BonsaiDeviceError(f"{ACT_ENV}={value!r} is not an activation precision; use one of "
                                    f"{', '.join(ACTS)} (16, the default, is exact; fp8 and int8 quantize "
                                    "activations per token on CUDA)")
        _STATE["act"] = value
    return _STATE["act"]


def reload() -> str:
    """Read ``BONSAI_KERNEL`` and ``BONSAI_ACT`` again (tests; a process that changed its environment on purpose)."""
    _STATE["choice"] = None
    _STATE["act"] = None
    _STATE["warned"].clear()
    act()
    return choice()


@contextmanager
def forced(name: str):
    """Inside the block every Q1_0 product uses kernel ``name``; an input it cannot take is an error."""
    name = _check(name, "forced kernel ")
    stack = _LOCAL.__dict__.setdefault("forced", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _load_builtin_kernels() -> None:
    from . import cpu_cache  # noqa: F401  (registers the CPU kernel)


def _load_cuda_kernels(x: torch.Tensor) -> None:
    if x.is_cuda and not _STATE["cuda_loaded"]:
        _STATE["cuda_loaded"] = True
        from . import triton_q1

        triton_q1.register()


def takes(kernel, w: PackedTensor) -> bool:
    """Does ``kernel`` take weights of ``w``'s type (its ``qtypes``; Q1_0 when it names none)."""
    return w.qtype in getattr(kernel, "qtypes", ("Q1_0",))


def select(x: torch.Tensor, w: PackedTensor, op: str = "linear"):
    """The kernel that computes ``op`` ("linear" or "conv2d") for these inputs."""
    _load_cuda_kernels(x)
    stack = getattr(_LOCAL, "forced", None)
    strict = bool(stack)
    name = stack[-1] if strict else choice()
    if name == "auto":
        return _auto(x, w, op)
    if name == REFERENCE.name:
        return REFERENCE
    kernel = _REGISTRY.get(name)
    if kernel is not None and takes(kernel, w) and kernel.supports(x, w):
        if getattr(kernel, op) is not None:
            return kernel
        return REFERENCE  # a kernel without convs: the contract says the reference computes them
    why = (f"kernel {name!r} is not available here" if kernel is None else
           f"kernel {name!r} does not take {w.qtype} weights" if not takes(kernel, w) else
           getattr(kernel, "why_not", lambda x, w: None)(x, w) or
           f"kernel {name!r} does not take {x.device.type} {x.dtype} inputs")
    if strict:
        raise BonsaiDeviceError(f"{why}; use another kernel or move the inputs")
    fallback = _auto(x, w, op)
    if (name, x.device.type, x.dtype, w.qtype) not in _STATE["warned"]:
        _STATE["warned"].add((name, x.device.type, x.dtype, w.qtype))
        log.warning("%s=%s: %s; those run on the auto choice (%s)", ENV, name, why, fallback.name)
    return fallback


def _auto(x: torch.Tensor, w: PackedTensor, op: str):
    """The first kernel of the auto choice that computes ``op`` for these inputs, else the reference."""
    for kname, kernel in _REGISTRY.items():
        if _IN_AUTO[kname] and getattr(kernel, op) is not None and takes(kernel, w) and kernel.supports(x, w):
            return kernel
    return REFERENCE


def active(x: torch.Tensor, w: PackedTensor, op: str = "linear") -> str:
    """Name of the kernel that would compute ``op`` for these inputs."""
    return select(x, w, op).name


def linear(x: torch.Tensor, w: PackedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    return select(x, w, "linear").linear(x, w, bias)


def conv2d(x: torch.Tensor, w: PackedTensor, bias: torch.Tensor | None, stride=1, padding=0, dilation=1):
    return select(x, w, "conv2d").conv2d(x, w, bias, stride, padding, dilation)


_load_builtin_kernels()
