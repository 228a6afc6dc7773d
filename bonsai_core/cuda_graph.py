"""Replay a denoiser step as a CUDA graph.

A diffusion step launches hundreds of small kernels; on a fast GPU the CPU that launches them
becomes the bottleneck (Triton launches especially). Capturing one step into a CUDA graph and
replaying it removes that cost. Inputs must keep their shapes between steps (they do inside one
generation); each new input signature is captured once.

A graph replays the kernels it captured, so a LoRA branch added, removed or re-weighted after the
capture would be ignored: every capture is dropped when ``quant.layers.lora_epoch()`` changes.

Used by the families on CUDA unless ``BONSAI_CUDA_GRAPH=0``.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .quant.layers import lora_epoch


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("BONSAI_CUDA_GRAPH", "1") != "0"


class GraphedStep:
    """Wrap ``fn(**tensors) -> tensor``; the first call per signature warms up and captures."""

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2, max_graphs: int = 4):
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict = {}
        self._epoch = lora_epoch()

    @staticmethod
    def _signature(kwargs: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else (k, v)
                     for k, v in sorted(kwargs.items()))

    def __call__(self, **kwargs) -> torch.Tensor:
        if self._epoch != lora_epoch():  # a LoRA changed since the captures: they replay stale kernels
            self.reset()
        key = self._signature(kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(kwargs)
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                static_in[k].copy_(v)
        graph.replay()
        return static_out.clone()

    def _capture(self, kwargs: dict):
        static_in = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):  # autotuning and lazy init happen here, not in the capture
                self.fn(**static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):  # the warmed stream: per-stream kernel state exists
            static_out = self.fn(**static_in)
        return graph, static_in, static_out

    def reset(self) -> None:
        self._graphs.clear()
        self._epoch = lora_epoch()
