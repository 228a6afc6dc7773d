"""Q1_0, group 128: one sign bit per weight plus one fp16 scale per 128 weights.

The block is GGUF's ``block_q1_0`` (ggml type 41, ggml-org/ggml ``src/ggml-common.h``), so a
tensor moves between a Bonsai safetensors file and a ``.gguf`` file without re-quantizing::

    block_q1_0 (18 bytes, 128 weights):  d: fp16 little-endian | qs: uint8[16]
    weight j of the block (0..127):      bit = (qs[j >> 3] >> (j & 7)) & 1     # LSB first
                                         w   = (2*bit - 1) * d                   # 1 -> +d, 0 -> -d
    blocks run along a row, rows one after another (row-major, like GGUF)

In memory we keep the two halves of every block apart, because kernels want them apart (the
weight object that holds them, ``Q1Tensor``, is in ``tensor.py``; it says why they are apart):

* ``qs``: uint8 ``[rows, n_blocks * 16]`` — the sign bits, block after block;
* ``d``:  float16 ``[rows, n_blocks]`` — the scales.

``to_blocks`` / ``from_blocks`` interleave them into (or out of) the 18-byte GGUF blocks.

The reference quantizer is ggml's: ``d`` = mean |w| of the group (the least-squares scale for a
sign code), bit set iff ``w >= 0``. Rows whose length is not a multiple of 128 (conv weights
``[out, in*kh*kw]``) are padded with zeros in storage; the scale of a partial group is the mean
over its real weights only, and the padding is never used in compute.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 128
BLOCK_BYTES = 18  # 2 bytes of fp16 scale + 16 bytes of sign bits
QS_BYTES = GROUP_SIZE // 8
GGML_TYPE_Q1_0 = 41

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32))  # LSB first
_LUT_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def n_blocks(cols: int) -> int:
    """Number of 128-weight groups needed for a row of ``cols`` weights (the last may be padded)."""
    return (cols + GROUP_SIZE - 1) // GROUP_SIZE


def packed_nbytes(rows: int, cols: int) -> int:
    """Bytes a ``[rows, cols]`` weight takes in Q1_0 (18 bytes per group of 128, padding included)."""
    return rows * n_blocks(cols) * BLOCK_BYTES


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool/0-1 tensor ``[rows, k*8]`` into uint8 ``[rows, k]``, LSB first (bit j -> byte j>>3)."""
    rows, cols = bits.shape
    if cols % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 columns, got {cols}")
    b = bits.reshape(rows, cols // 8, 8).to(torch.int32)
    return (b * _BIT_WEIGHTS.to(b.device)).sum(-1).to(torch.uint8)


def unpack_bits(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``[rows, k]`` -> bool ``[rows, k*8]``."""
    rows, k = qs.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=qs.device)
    return ((qs.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, k * 8)


def group_scales(weight: torch.Tensor) -> torch.Tensor:
    """The fp16 scale of every group of a 2-D ``[rows, cols]`` weight: mean |w| over the group's real
    weights (a padded last group has fewer), computed in float32. Shared by ``quantize`` and the QAT
    fake quantizer, so the two agree bit for bit."""
    rows, cols = weight.shape
    nb = n_blocks(cols)
    w = weight.detach().to(torch.float32)
    pad = nb * GROUP_SIZE - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    counts = torch.full((nb,), GROUP_SIZE, dtype=torch.float32, device=w.device)
    counts[-1] = GROUP_SIZE - pad
    return (w.reshape(rows, nb, GROUP_SIZE).abs().sum(-1) / counts).to(torch.float16)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight ``[rows, cols]`` to Q1_0.

    Returns ``(qs, d)``: uint8 ``[rows, n_blocks*16]`` sign bits and float16 ``[rows, n_blocks]``
    scales. Works in float32 whatever the input dtype, so the result does not depend on it.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    nb = n_blocks(cols)
    positive = (weight.detach() >= 0).to(torch.uint8)
    pad = nb * GROUP_SIZE - cols
    if pad:  # padding reads as weight 0, and 0 >= 0: its bits are set (as the first files wrote them)
        positive = torch.nn.functional.pad(positive, (0, pad), value=1)
    return pack_bits(positive), group_scales(weight)


def _sign_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[256, 8]`` table: byte value -> its 8 bits as -1/+1 in ``dtype``, LSB first."""
    key = (dtype, device)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        byte = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
        bits = (byte >> torch.arange(8, dtype=torch.int32)) & 1
        lut = (bits * 2 - 1).to(dtype=dtype, device=device)
        _LUT_CACHE[key] = lut
    return lut


def dequantize(qs: torch.Tensor, d: torch.Tensor, cols: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q1_0 -> dense ``[rows, cols]`` in ``dtype`` (the reference; every fast path is tested against it).

    One table gather turns each packed byte into 8 signs, then each group is scaled by its ``d``.
    The padding of the last group is sliced off.
    """
    rows, nb = d.shape
    if qs.shape != (rows, nb * QS_BYTES):
        raise ValueError(f"qs shape {tuple(qs.shape)} does not match d shape {tuple(d.shape)}")
    signs = torch.nn.functional.embedding(qs.to(torch.int32), _sign_lut(dtype, qs.device))
    w = signs.view(rows, nb, GROUP_SIZE) * d.to(dtype).unsqueeze(-1)
    w = w.view(rows, nb * GROUP_SIZE)
    return w if cols == nb * GROUP_SIZE else w[:, :cols]


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with plain row-major strides. ``contiguous()`` alone is not enough: a tensor with a
    size-1 dimension (a transposed ``[rows, 1]``) counts as contiguous with a last stride != 1,
    which byte views and kernels that assume stride 1 refuse or misread."""
    t = t.contiguous()
    return t.reshape(-1).view(t.shape)


def to_blocks(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Interleave into GGUF's 18-byte blocks: uint8 ``[rows, n_blocks*18]`` (d little-endian, then qs)."""
    rows, nb = d.shape
    d_bytes = row_major(d).view(torch.uint8).view(rows, nb, 2)  # torch is little-endian on every platform we run
    return torch.cat([d_bytes, qs.reshape(rows, nb, QS_BYTES)], dim=-1).reshape(rows, nb * BLOCK_BYTES)


def to_flat(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Both halves in one uint8 buffer, 1-D: every row's sign bits (``qs`` row-major), then every
    scale (``d`` row-major, fp16 little-endian). For hosts that stage a weight as one run of bytes
    (ComfyUI's dynamic VRAM copies one ``_qdata`` per weight): its size is the packed size, and
    ``from_flat`` gives both halves back as views, each contiguous, the scales 16-byte aligned."""
    return torch.cat([row_major(qs).reshape(-1), row_major(d).reshape(-1).view(torch.uint8)])


def from_flat(flat: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qs, d)`` of a ``to_flat`` buffer of a ``[rows, cols]`` weight: views, nothing copied (a
    buffer at an odd byte offset, which no fp16 view can read, is copied once)."""
    nb = n_blocks(cols)
    n_qs, n_d = rows * nb * QS_BYTES, rows * nb * 2
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() != n_qs + n_d:
        raise ValueError(f"a flat Q1_0 buffer of a [{rows}, {cols}] weight is uint8 [{n_qs + n_d}], got "
                         f"{flat.dtype} {list(flat.shape)}")
    if flat.storage_offset() % 2:
        flat = flat.clone()
    return flat[:n_qs].view(rows, nb * QS_BYTES), flat[n_qs:].view(torch.float16).view(rows, nb)


def from_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split GGUF's 18-byte blocks ``[rows, n_blocks*18]`` (uint8) into ``(qs, d)``."""
    rows, nbytes = blocks.shape
    if nbytes % BLOCK_BYTES:
        raise ValueError(f"a Q1_0 row holds a multiple of {BLOCK_BYTES} bytes, got {nbytes}")
    b = blocks.reshape(rows, nbytes // BLOCK_BYTES, BLOCK_BYTES)
    d = b[..., :2].contiguous().view(torch.float16).reshape(rows, -1)
    qs = b[..., 2:].contiguous().reshape(rows, -1)
    return qs, d
