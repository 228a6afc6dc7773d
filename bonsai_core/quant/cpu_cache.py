"""A CPU kernel of the contract: keep each layer's dequantized weight, within a memory budget.

On a CPU the reference kernel expands every packed weight to a dense one at every call, and that
expansion costs more than the product itself for a 2-core machine (measured 1.5-1.7x the dense
fp32 time, BENCHMARKS.md). This kernel expands a weight once and keeps the dense copy for the
next calls, so a 1-bit model computes as fast as the same model in fp32 -- at the price of the
dense copies' memory: 4 bytes a weight in fp32 (2 in bf16) for the layers that fit the budget,
``BONSAI_CPU_CACHE_MB`` (default 1024 MiB; 0 turns the kernel off). Layers past the budget run
on the reference kernel. The packed weight stays the one source of truth: a copy is dropped when
its weight is freed, and not used once the weight was written to in place.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch

from . import kernels
from .tensor import writes

ENV = "BONSAI_CPU_CACHE_MB"
DEFAULT_MB = 1024


class CpuCacheKernel:
    name = "cpu-cache"
    qtypes = ("Q1_0", "Q4_AFFINE")  # it keeps whatever dequantize() gives

    def __init__(self, budget_bytes: int | None = None):
        self._budget = budget_bytes
        self._cache: dict[tuple[int, torch.dtype], tuple[int, torch.Tensor]] = {}
        self._used = 0
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        if self._budget is None:
            raw = os.environ.get(ENV, str(DEFAULT_MB)).strip()
            try:
                mb = float(raw)
            except ValueError:
                from ..errors import BonsaiDeviceError

                raise BonsaiDeviceError(f"{ENV}={raw!r} is not a number of MiB (0 turns the CPU cache off)") from None
            self._budget = max(0, int(mb * 2**20))
        return self._budget

    @property
    def used_bytes(self) -> int:
        return self._used

    def _dense(self, w, dtype: torch.dtype) -> torch.Tensor | None:
        key = (id(w.qs), dtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == writes(w.qs):
            return hit[1]
        size = w.numel() * torch.empty(0, dtype=dtype).element_size()
        with self._lock:
            if hit is not None:  # written in place since: forget the old copy
                self._drop(key)
            if self._used + size > self.budget:
                return None
            dense = w.dequantize(dtype)
            self._cache[key] = (writes(w.qs), dense)
            self._used += size
            weakref.finalize(w.qs, self._drop, key)
        return dense

    def _drop(self, key) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._used -= entry[1].numel() * entry[1].element_size()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._used = 0

    def supports(self, x: torch.Tensor, w) -> bool:
        return x.device.type == "cpu" and w.qs.device.type == "cpu" and self.budget > 0 and \
            self._dense(w, x.dtype) is not None

    def linear(self, x, w, bias):
        return torch.nn.functional.linear(x, self._dense(w, x.dtype), None if bias is None else bias.to(x.dtype))

    def conv2d(self, x, w, bias, stride, padding, dilation):
        return torch.nn.functional.conv2d(x, self._dense(w, x.dtype), None if bias is None else bias.to(x.dtype),
                                          stride, padding, dilation)


KERNEL = CpuCacheKernel()
kernels.register(KERNEL, auto=True)
