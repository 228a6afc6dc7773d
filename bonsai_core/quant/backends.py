"""Kernel back-ends for Q1_0 matmuls.

The reference path (dequantize into the input's dtype, then a dense matmul) runs on every
device and is what every fast path is tested against. Fast paths register themselves with
``register`` and are picked per call by a predicate (device, dtype, shape); ``BONSAI_KERNEL=reference``
forces the reference path everywhere.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from .q1_0 import dequantize as _dequantize_ref

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]
_FAST: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], bool], LinearFn]] = []


def register(name: str, applies: Callable[[torch.Tensor, torch.Tensor], bool], fn: LinearFn) -> None:
    """Add a fast ``linear_q1`` implementation; ``applies(x, qs)`` says when it may be used."""
    _FAST.append((name, applies, fn))


def dequantize(qs: torch.Tensor, d: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_ref(qs, d, cols, dtype)


def linear_reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    w = _dequantize_ref(qs, d, in_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def active_backend(x: torch.Tensor, qs: torch.Tensor) -> str:
    if os.environ.get("BONSAI_KERNEL", "auto") != "reference":
        for name, applies, _ in _FAST:
            if applies(x, qs):
                return name
    return "reference"


def linear_q1(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` where ``W`` is the Q1_0 weight ``(qs, d)`` of ``in_features`` columns."""
    if _FAST and os.environ.get("BONSAI_KERNEL", "auto") != "reference":
        for _, applies, fn in _FAST:
            if applies(x, qs):
                return fn(x, qs, d, in_features, bias)
    return linear_reference(x, qs, d, in_features, bias)
