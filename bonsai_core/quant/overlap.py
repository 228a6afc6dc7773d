"""Dequantize + cuBLAS for many tokens, with the dequantize hidden behind the GEMM (issue 20).

At M >= 1536 tokens a W1A16 product is compute-bound, like cuBLAS's own, and the engine's path there
is dequantize + cuBLAS: one pass that writes the dense weight (170 MB for klein-4B's widest layer),
then the GEMM that reads it back. The pass costs 5 to 15 % of the GEMM, which is why that path measured
0.85-0.87x cuBLAS bf16 at M = 1536 on an H200 (BENCHMARKS.md) against issue 20's >= 0.95x.

Here the weight's rows are cut into ``chunks`` slices. A side stream dequantizes slice j + 1 while
the current stream multiplies slice j into its own columns of the output (``torch.mm(..., out=y[:,
a:b])``: cuBLAS writes a column slice in place, its leading dimension the full width), so only the
first slice's dequantize is not hidden. The dense weight is allocated once, on the current stream, as
the plain path's is: no extra memory. The side stream first waits for the current one (the weight's
memory may have been in use there) and the current stream waits for each slice's event before its
GEMM: the fork and join a CUDA graph capture needs, so the path can be captured as well.

Whether the two really overlap on a GPU (the GEMM's blocks fill the SMs; the dequantize's small
blocks slot in as waves end) is a measurement, not a promise: the path runs only when named
(``BONSAI_KERNEL=overlap``) until ``benchmarks/bench_gemm.py --paths overlap`` shows it faster.
On a CPU the slices simply run one after the other (the same arithmetic, for tests).
"""

from __future__ import annotations

from typing import Callable

import torch

_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def slices(n: int, chunks: int, align: int = 128) -> list[tuple[int, int]]:
    """``chunks`` row ranges covering ``[0, n)``, each a multiple of ``align`` rows but the last
    (fewer ranges where ``n`` is too small to give each ``align`` rows)."""
    step = max(align, -(-n // max(chunks, 1) // align) * align)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, cols: int, bias: torch.Tensor | None,
           dequant: Callable[..., torch.Tensor], chunks: int = 4) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the Q1_0 weight ``(qs, d)`` of ``cols`` inputs; ``dequant(qs, d, cols,
    out)`` writes rows of the dense weight into ``out`` (the Triton pass on CUDA)."""
    shape = x.shape
    if shape[-1] != cols:
        raise ValueError(f"the overlap path got inputs of {shape[-1]} features for a weight of {cols}")
    if torch.is_grad_enabled() and x.requires_grad:  # torch.mm(out=...) takes no autograd
        raise RuntimeError("the overlap path computes without gradients (inference only)")
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], d.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    w = torch.empty(n, cols, dtype=x.dtype, device=x.device)
    parts = slices(n, chunks)
    if x.is_cuda and parts:  # no output rows, no fork (a capture would hold an unjoined side stream)
        main = torch.cuda.current_stream(x.device)
        side = _side_stream(x.device)
        side.wait_stream(main)  # fork: w's memory may still be read by work queued before this call
        events = []
        with torch.cuda.stream(side):
            for a, b in parts:
                dequant(qs[a:b], d[a:b], cols, w[a:b])
                ev = torch.cuda.Event()
                ev.record(side)
                events.append(ev)
        try:
            for (a, b), ev in zip(parts, events):
                main.wait_event(ev)  # join, slice by slice
                torch.mm(x2, w[a:b].t(), out=y[:, a:b])
        finally:  # also on an error: w is freed to the current stream only after every side write
            main.wait_stream(side)
    else:  # a CPU: slice after slice
        for a, b in parts:
            dequant(qs[a:b], d[a:b], cols, w[a:b])
            torch.mm(x2, w[a:b].t(), out=y[:, a:b])
    if bias is not None:
        y += bias.to(y.dtype)
    return y.reshape(*shape[:-1], n)
