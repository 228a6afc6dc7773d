"""Q4_AFFINE: 4-bit codes with one scale and one bias per group (64 by default), for text encoders.

The public Bonsai Image 4B text encoders are 4-bit affine: MLX (``w = scale*q + bias``, bf16 scales
and biases per group of 64 along ``in``) and HQQ (``w = (q - zero)*scale``). This type holds either
exactly, so importing them keeps every value (BONSAI-IMAGE-4B.md section 7)::

    Q4_AFFINE, group g (even, dividing the row length; 64 for the public payloads):
      weight c of a row:   q = code of column c (0..15)
                           w = scale[g_c] * q + bias[g_c]            g_c = c // g
    codes:   byte j of a row = column 2j in the low nibble | column 2j+1 in the high nibble
             (the byte order of MLX's uint32 words read little-endian)
    scale:   one per group, F16 | BF16 | F32 (as the source stores it; never re-rounded)
    bias:    one per group, F16 | BF16 | F32 (HQQ's zero becomes bias = -(zero*scale): the product of
             two 16-bit floats is exact in F32, so the real values are the same)
    a file stores one uint8 tensor [rows, n_groups * block_bytes], a block per group, row-major:
      block = scale (little-endian) | bias (little-endian) | g/2 code bytes

In memory (``Q4Tensor`` in ``tensor.py``) codes, scales and biases are kept apart (``qs`` uint8
``[rows, cols/2]``, ``scale`` / ``bias`` ``[rows, cols/g]``) for the same reason Q1_0 keeps its bits
and scales apart: each is one contiguous run a kernel can load.

The reference quantizer is round-to-nearest over each group's range (MLX's affine quantizer):
``scale = (max - min) / 15``, ``bias = min`` (stored in fp16 by default), ``q = round((w - bias)/scale)``
clamped to 0..15 with the stored (rounded) scale and bias. The reference dequantization computes
``scale*q + bias`` in float32 (float64 when asked for float64, where it is exact) and rounds once to
the requested dtype.

GGUF: ``Q4_1`` (type 3, 20-byte blocks of 32: fp16 ``d``, fp16 ``m``, 16 code bytes, weight j in the
low nibble of byte j and weight j+16 in the high one; ``w = d*q + m``) is the same affine type with
group 32, so a Q4_AFFINE weight with group 64 writes as two Q4_1 blocks per group -- exactly when
every scale and bias is an fp16 value (``to_gguf_q4_1`` checks, and refuses otherwise).
"""

from __future__ import annotations

import torch

QTYPE = "Q4_AFFINE"
GROUP_SIZE = 64
MAX_CODE = 15
GGML_TYPE_Q4_1 = 3
GGUF_Q4_1_GROUP = 32
GGUF_Q4_1_BLOCK_BYTES = 20
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def check_group(cols: int, group: int) -> None:
    if group <= 0 or group % 2 or cols % group:
        raise ValueError(f"Q4_AFFINE needs an even group size that divides the row length; got group {group} "
                         f"for rows of {cols}")


def block_bytes(group: int, scale_dtype: torch.dtype, bias_dtype: torch.dtype) -> int:
    """Bytes of one stored group: its scale, its bias and ``group/2`` code bytes."""
    return _size(scale_dtype) + _size(bias_dtype) + group // 2


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[rows, cols]`` (0..15, any integer dtype) -> uint8 ``[rows, cols/2]``: even column low nibble."""
    rows, cols = q.shape
    if cols % 2:
        raise ValueError(f"pack_codes needs an even number of columns, got {cols}")
    q = q.to(torch.uint8).reshape(rows, cols // 2, 2)
    return q[..., 0] | (q[..., 1] << 4)


def unpack_codes(qs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, k]`` -> uint8 codes ``[rows, 2k]`` (inverse of ``pack_codes``)."""
    rows, k = qs.shape
    return torch.stack([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, 2 * k)


def quantize(weight: torch.Tensor, group: int = GROUP_SIZE, dtype: torch.dtype = torch.float16
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit affine quantization of a 2-D ``[rows, cols]`` weight.

    Returns ``(qs, scale, bias)``: uint8 ``[rows, cols/2]`` and ``dtype`` ``[rows, cols/group]``.
    Works in float32 whatever the input dtype. A constant group gets scale 0 and bias = its value."""
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    check_group(cols, group)
    g = weight.detach().to(torch.float32).reshape(rows, cols // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / MAX_CODE).to(dtype)
    bias = lo.to(dtype)
    s, b = scale.to(torch.float32).unsqueeze(-1), bias.to(torch.float32).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, ((g - b) / safe).round(), torch.zeros_like(g)).clamp(0, MAX_CODE)
    return pack_codes(q.reshape(rows, cols)), scale, bias


DEQUANT_CHUNK = 1 << 24  # values dequantized at a time (64 MiB in float32; a few kernel launches a weight on CUDA)


def dequantize(qs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q4_AFFINE -> dense ``[rows, cols]`` in ``dtype`` (the reference every other path is tested against)."""
    rows, ng = scale.shape
    cols = qs.shape[1] * 2
    if qs.shape[0] != rows or tuple(bias.shape) != (rows, ng) or cols % ng:
        raise ValueError(f"codes {tuple(qs.shape)}, scale {tuple(scale.shape)} and bias {tuple(bias.shape)} "
                         "do not fit one another")
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(rows, cols, dtype=dtype, device=qs.device)
    # in row chunks of about DEQUANT_CHUNK values, in place: a whole-matrix product in float32 held the
    # codes, the product and the sum at once (~0.3 GiB for one Qwen3-4B MLP weight, set on the GPU's
    # encode peak); per value the same product and sum, so the result is the same to the bit
    step = max(1, DEQUANT_CHUNK // cols)
    for r in range(0, rows, step):
        w = unpack_codes(qs[r:r + step]).to(ct).view(-1, ng, cols // ng)
        w.mul_(scale[r:r + step].to(ct).unsqueeze(-1)).add_(bias[r:r + step].to(ct).unsqueeze(-1))
        out[r:r + step] = w.view(-1, cols)
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's little-endian bytes, ``[..., element size]`` (torch is little-endian where we run)."""
    t = t.contiguous()
    return t.view(torch.uint8).view(*t.shape, t.element_size())


def to_blocks(qs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The file's bytes: uint8 ``[rows, n_groups * block_bytes]`` (scale | bias | codes, per group)."""
    rows, ng = scale.shape
    codes = qs.reshape(rows, ng, -1)
    return torch.cat([_bytes(scale), _bytes(bias), codes], dim=-1).reshape(rows, -1)


def from_blocks(blocks: torch.Tensor, cols: int, group: int, scale_dtype: torch.dtype,
                bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the file's blocks ``[rows, n_groups * block_bytes]`` into ``(qs, scale, bias)``."""
    rows = blocks.shape[0]
    ng = cols // group
    ss, bs = _size(scale_dtype), _size(bias_dtype)
    b = blocks.reshape(rows, ng, ss + bs + group // 2)
    scale = b[..., :ss].contiguous().view(scale_dtype).reshape(rows, ng)
    bias = b[..., ss:ss + bs].contiguous().view(bias_dtype).reshape(rows, ng)
    qs = b[..., ss + bs:].contiguous().reshape(rows, cols // 2)
    return qs, scale, bias


def to_gguf_q4_1(qs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """GGUF ``Q4_1`` blocks, uint8 ``[rows, cols/32 * 20]``, holding exactly the same values, or ValueError
    saying why no Q4_1 block can (a scale or bias that is not an fp16 value, a group not a multiple of 32)."""
    rows, ng = scale.shape
    cols = qs.shape[1] * 2
    group = cols // ng
    if group % GGUF_Q4_1_GROUP:
        raise ValueError(f"{name}: group {group} is not a multiple of Q4_1's {GGUF_Q4_1_GROUP}; no GGUF type holds "
                         "it exactly")
    for what, t in (("scale", scale), ("bias", bias)):
        h = t.to(torch.float16)
        if not torch.equal(h.to(torch.float64), t.to(torch.float64)):
            bad = (h.to(torch.float64) != t.to(torch.float64)).nonzero()[0].tolist()
            raise ValueError(f"{name}: {what} at row {bad[0]}, group {bad[1]} is {float(t[bad[0], bad[1]])!r}, not "
                             f"an fp16 value; GGUF Q4_1 stores fp16 {what}s, so it would not hold this weight exactly "
                             "(no other GGUF type does either)")
    per = group // GGUF_Q4_1_GROUP
    d = scale.to(torch.float16).repeat_interleave(per, dim=1)
    m = bias.to(torch.float16).repeat_interleave(per, dim=1)
    q = unpack_codes(qs).reshape(rows, ng * per, 2, GGUF_Q4_1_GROUP // 2)  # [.., first 16 | last 16]
    codes = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return torch.cat([_bytes(d), _bytes(m), codes], dim=-1).reshape(rows, -1)
