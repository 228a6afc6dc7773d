"""Kernel back-ends for Q1_0 matmuls.

The reference path (dequantize into the input's dtype, then a dense matmul) runs on every
device and is what every fast path is tested against. Fast paths register themselves with
``register`` and are picked per call by a predicate (device, dtype, layout). On CUDA with
Triton, ``triton_q1`` registers itself the first time a CUDA tensor comes through.

``BONSAI_KERNEL`` chooses: ``auto`` (default: the fast path where one applies), ``reference``
(always the reference), or ``dequant`` / ``fused`` (that Triton path on CUDA).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from .q1_0 import dequantize as _dequantize_ref

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]
_FAST: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], bool], LinearFn]] = []
_STATE = {"cuda_checked": False}
KERNEL_CHOICES = ("auto", "reference", "dequant", "fused")


def register(name: str, applies: Callable[[torch.Tensor, torch.Tensor], bool], fn: LinearFn) -> None:
    """Add a fast ``linear_q1`` implementation; ``applies(x, qs)`` says when it may be used."""
    _FAST.insert(0, (name, applies, fn))


def kernel_mode() -> str:
    mode = os.environ.get("BONSAI_KERNEL", "auto").strip().lower() or "auto"
    if mode not in KERNEL_CHOICES:
        from ..errors import BonsaiDeviceError

        raise BonsaiDeviceError(f"BONSAI_KERNEL={mode!r} is unknown; use one of {', '.join(KERNEL_CHOICES)}")
    return mode


def _maybe_register_cuda(x: torch.Tensor) -> None:
    if _STATE["cuda_checked"] or not x.is_cuda:
        return
    _STATE["cuda_checked"] = True
    from . import triton_q1

    mode = kernel_mode()
    if triton_q1.available() and mode != "reference":
        triton_q1.register(mode)


def dequantize(qs: torch.Tensor, d: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[rows, cols]`` weight in ``dtype`` (one Triton pass on CUDA where available)."""
    if qs.is_cuda and kernel_mode() != "reference":
        from . import triton_q1

        if triton_q1.available() and dtype in (torch.float16, torch.bfloat16, torch.float32):
            return triton_q1.dequantize_triton(qs, d, cols, dtype)
    return _dequantize_ref(qs, d, cols, dtype)


def linear_reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    w = _dequantize_ref(qs, d, in_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _select(x: torch.Tensor, qs: torch.Tensor) -> tuple[str, LinearFn]:
    """The implementation ``linear_q1`` uses for these inputs: the first fast path that applies."""
    _maybe_register_cuda(x)
    if _FAST and kernel_mode() != "reference":
        for name, applies, fn in _FAST:
            if applies(x, qs):
                return name, fn
    return "reference", linear_reference


def active_backend(x: torch.Tensor, qs: torch.Tensor) -> str:
    """Name of the implementation ``linear_q1`` would use for these inputs."""
    return _select(x, qs)[0]


def linear_q1(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` where ``W`` is the Q1_0 weight ``(qs, d)`` of ``in_features`` columns."""
    return _select(x, qs)[1](x, qs, d, in_features, bias)
