"""Packed weights as one tensor object: ``Q1Tensor`` (Q1_0) and ``Q4Tensor`` (Q4_AFFINE), both
``PackedTensor``s that share every piece of torch integration below.

Outside it looks like the weight it stands for: ``.shape`` is the logical shape (``[out, in]`` for
a linear, ``[out, in, kh, kw]`` for a conv), ``.dtype`` is the dtype it computes in, and it is the
``weight`` parameter of ``BonsaiLinear`` / ``BonsaiConv2d``, so ``state_dict()`` holds it under the
file's own key ``<module>.weight``. Inside a ``Q1Tensor`` keeps the packed data of ``q1_0.py``:

* ``qs``: uint8 ``[rows, n_blocks * 16]`` -- the sign bits of every group, GGUF's bit order;
* ``d``:  float16 ``[rows, n_blocks]``     -- the group scales, float16 whatever ``.dtype`` says;

a ``Q4Tensor`` those of ``q4_affine.py`` (2-D weights: text encoders' linears and embeddings):

* ``qs``: uint8 ``[rows, cols / 2]`` -- two 4-bit codes a byte, the even column in the low nibble;
* ``scale``, ``bias``: ``[rows, cols / group]`` in the dtypes they came with (F16 / BF16 / F32).

Why bits and scales apart rather than GGUF's interleaved 18-byte blocks: an 18-byte block puts
every group's bits at an odd 2-byte offset, so no kernel can load them as aligned 16-byte vectors,
and reading the scales becomes a strided gather; apart, a row of bits and a row of scales are each
one contiguous run, which is what the Triton kernels read. Measured (``benchmarks/bench_q1_layout.py``,
``benchmarks/results/cpu/q1_layout.json``, 2-core CPU): the reference dequantization of a klein-4B
weight takes 69 / 154 / 163 ms from bits and scales apart and 87 / 172 / 169 ms from the blocks,
which must be split first. The file keeps GGUF's blocks; ``from_blocks`` / ``to_blocks`` convert
at the edge, bit for bit, once per load.

Behaviour as a tensor (ComfyUI-GGUF's ``GGMLTensor`` and comfy_kitchen's ``QuantizedTensor`` do
the same):
* ``.to(device)`` moves the packed parts; ``.to(dtype)`` changes only the compute dtype, the scales
  keep theirs (a cast to bf16 would lose bits of the format);
* ``detach``, ``clone``, ``copy_`` from another weight of its type and layout, and pinning keep it packed;
* ``F.linear`` / ``F.conv2d`` with it as the weight run through the kernel contract (``kernels.py``);
  ``F.embedding`` expands only the rows it looks up;
* any other operation sees the dequantized dense weight (correct, but it materialises the weight:
  the layers never do that); in-place changes to the packed weight are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from . import q1_0, q4_affine
from .q1_0 import QS_BYTES, n_blocks, row_major

aten = torch.ops.aten


class PackedTensor(torch.Tensor):
    """A packed weight behind its logical shape and compute dtype. A subclass names its packed parts
    (``INNER``, each ``[rows, ...]`` on one device), its ``QTYPE``, builds itself from
    ``(*parts, shape, dtype)`` and knows ``dequantize``; moving, casting, pinning, copying, the kernel
    contract for ``F.linear`` / ``F.conv2d`` and row gathers for ``F.embedding`` are shared here."""

    INNER: tuple[str, ...] = ()
    QTYPE = ""

    @classmethod
    def _wrap(cls, parts: dict[str, torch.Tensor], shape, dtype: torch.dtype | None):
        shape = torch.Size(int(s) for s in shape)
        devices = {t.device for t in parts.values()}
        if len(devices) != 1:
            raise ValueError(f"the packed parts of a {cls.QTYPE} weight lie on {sorted(map(str, devices))}: "
                             "all must be on one device")
        dtype = dtype or torch.float16
        if not dtype.is_floating_point:
            raise ValueError(f"a {cls.QTYPE} weight computes in a floating dtype, not {dtype}")
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=devices.pop(), requires_grad=False)
        for name, t in parts.items():
            setattr(self, name, row_major(t))
        # Plain copies of what the hot path asks: on a tensor subclass every .shape / .dtype read
        # goes through __torch_function__. A packed weight never changes them (a cast makes a new one).
        self._shape, self._cols, self._dtype = shape, shape[1:].numel(), dtype
        return self

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        super().__init__()

    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        """``param.data = other`` takes ``other``'s parts: Tensor's own setter swaps only the header
        (device, shape) and would leave the packed parts where they were."""
        if type(new) is not type(self) or new.shape != self.shape:
            raise TypeError(f"a {self.QTYPE} weight {list(self.shape)} can only take the data of a {self.QTYPE} "
                            f"weight of the same shape, got {type(new).__name__} {list(new.shape)}")
        torch.Tensor.data.__set__(self, new)
        for name in self.INNER:
            setattr(self, name, getattr(new, name))
        self._dtype = new._dtype

    def pin_memory(self, device=None) -> "PackedTensor":
        """The same weight with its parts in pinned host memory. Tensor's own pin_memory allocates a
        plain pinned tensor of the logical shape and copies into it: the weight would come back dense."""
        return self._same([t.pin_memory() for t in self.parts])

    @property
    def parts(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.INNER]

    @property
    def rows(self) -> int:
        return self._shape[0]

    @property
    def cols(self) -> int:
        """Length of a row of the quantized matrix (``in`` for a linear, ``in*kh*kw`` for a conv)."""
        return self._cols

    @property
    def qtype(self) -> str:
        return self.QTYPE

    @property
    def nbytes(self) -> int:  # what it holds, not numel x element_size
        return sum(t.numel() * t.element_size() for t in self.parts)

    SCALES: tuple = ()  # the float parts (``[rows, groups]``) that must be finite

    def first_nonfinite(self) -> tuple[str, int, int] | None:
        """``(part, row, group)`` of the first NaN/inf scale (or Q4_AFFINE bias), or None: what a file
        reader and the converter both refuse."""
        for part in self.SCALES:
            bad = ~torch.isfinite(getattr(self, part))
            if bad.any():
                row, group = bad.nonzero()[0].tolist()
                return part, row, group
        return None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _same(self, parts, dtype: torch.dtype | None = None, shape=None):
        return type(self)(*parts, self._shape if shape is None else shape, dtype or self._dtype)

    def rows_dense(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense rows ``index`` (1-D), ``[len(index), cols]``: only those rows are expanded (an
        embedding lookup never materialises the whole table)."""
        part = self._same([t.index_select(0, index) for t in self.parts], shape=(index.numel(), self._cols))
        return part.dequantize(dtype)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"{self.nbytes} bytes)")

    # -- torch integration ---------------------------------------------------------------------

    def __tensor_flatten__(self):
        return list(self.INNER), (type(self), tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        cls, shape, dtype = ctx
        return cls(*(inner[n] for n in cls.INNER), shape, dtype)

    def _moved(self, device=None, dtype=None, non_blocking: bool = False, copy: bool = False):
        """This weight on ``device`` computing in ``dtype``: the packed parts move, their dtypes stay
        (a cast of a scale would lose bits of the format; ``copy``: a new tensor object even when
        nothing changes, as ``_to_copy`` must give). Tensor.to and its kin come here from
        ``__torch_function__``, not through autograd's dispatch: that path refuses to alias an
        inference-mode tensor's parts (ComfyUI runs every node under ``torch.inference_mode``)."""
        dtype = dtype or self._dtype
        if not dtype.is_floating_point:
            raise TypeError(f"a {self.QTYPE} weight cannot become {dtype}; dequantize() it first")
        first = self.parts[0]
        device = first.device if device is None else torch.device(device)
        if device == first.device and dtype == self._dtype and not copy:
            return self
        return self._same([t.to(device, non_blocking=non_blocking) for t in self.parts], dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], PackedTensor) and func in _MOVES:
            self = args[0]
            if func is torch.Tensor.to:
                kwargs = dict(kwargs)
                copy = bool(kwargs.pop("copy", False))  # _parse_to refuses it; ComfyUI passes it
                device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                if isinstance(dtype, torch.dtype) or dtype is None:
                    return self._moved(device, dtype, non_blocking, copy=copy)
            else:
                device, dtype = _MOVES[func](self, *args[1:], **kwargs)
                return self._moved(device, dtype)
        if func is torch.Tensor.detach and args and isinstance(args[0], PackedTensor):
            return args[0]._same([t.detach() for t in args[0].parts])
        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, PackedTensor) and not isinstance(ids, PackedTensor) and w.dim() == 2 and \
                    kwargs.get("max_norm") is None and (len(args) < 4 or args[3] is None):
                return w.rows_dense(ids.reshape(-1)).reshape(*ids.shape, w.cols)
        if func is F.linear or func is F.conv2d:
            x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, PackedTensor) and not isinstance(x, PackedTensor):
                from . import kernels

                if func is F.linear:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    return kernels.linear(x, w, bias)
                names = ("bias", "stride", "padding", "dilation", "groups")
                rest = dict(zip(names, args[2:]), **kwargs)
                if rest.get("groups", 1) == 1:
                    return kernels.conv2d(x, w, rest.get("bias"), rest.get("stride", 1),
                                          rest.get("padding", 0), rest.get("dilation", 1))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default:
            return args[0]._same([t.detach() for t in args[0].parts])
        if func is aten.clone.default:
            return args[0]._same([t.clone() for t in args[0].parts])
        if func is aten._to_copy.default:
            out = args[0]._moved(kwargs.get("device"), kwargs.get("dtype"), bool(kwargs.get("non_blocking")),
                                 copy=True)
            return out._same([t.pin_memory() for t in out.parts]) if kwargs.get("pin_memory") else out
        if func is aten._pin_memory.default:
            return args[0]._same([t.pin_memory() for t in args[0].parts])
        if func is aten.is_pinned.default:
            return args[0].parts[0].is_pinned()
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, PackedTensor):
                if type(src) is not type(dst) or src.shape != dst.shape or \
                        any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(src.parts, dst.parts)):
                    raise TypeError(f"copy_ into a {dst.QTYPE} weight {list(dst.shape)} needs a {dst.QTYPE} weight "
                                    f"of the same shape and layout, got {type(src).__name__} {list(src.shape)}; "
                                    f"quantize it first ({type(dst).__name__}.from_float)")
                for a, b in zip(dst.parts, src.parts):
                    a.copy_(b)
                # count the write, so caches of the dense weight (cpu_cache.py) see that the packed
                # one changed (torch's own version counter: not below autograd, not in inference mode)
                dst.qs._bonsai_writes = writes(dst.qs) + 1
                return dst
        if func._schema.is_mutable or func.__name__.endswith("_"):
            raise TypeError(f"{func} would change a packed {args[0].QTYPE if isinstance(args[0], PackedTensor) else ''}"
                            " weight in place; its packed bits are read-only (a LoRA goes beside it: "
                            "BonsaiLinear.add_lora)")

        def dense(t):
            return t.dequantize() if isinstance(t, PackedTensor) else t

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


class Q1Tensor(PackedTensor):
    """A Q1_0 weight: packed sign bits + fp16 group scales behind the weight's own shape and dtype."""

    INNER = ("qs", "d")
    SCALES = ("d",)
    QTYPE = "Q1_0"
    qs: torch.Tensor
    d: torch.Tensor

    @staticmethod
    def __new__(cls, qs: torch.Tensor, d: torch.Tensor | None = None, shape=None, dtype: torch.dtype | None = None,
                requires_grad: bool = False):
        if d is None and isinstance(qs, cls):  # type(param)(value, requires_grad=...), as accelerate re-wraps
            return qs
        shape = torch.Size(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"a Q1_0 weight is at least 2-D, got shape {list(shape)}")
        rows, cols = shape[0], shape[1:].numel()
        nb = n_blocks(cols)
        if tuple(d.shape) != (rows, nb) or tuple(qs.shape) != (rows, nb * QS_BYTES):
            raise ValueError(f"packed tensors qs {tuple(qs.shape)} / d {tuple(d.shape)} do not fit "
                             f"shape {list(shape)} (expected qs {(rows, nb * QS_BYTES)}, d {(rows, nb)})")
        if qs.dtype != torch.uint8 or d.dtype != torch.float16:
            raise ValueError(f"packed tensors must be uint8 bits and float16 scales, got {qs.dtype} / {d.dtype}")
        if qs.device != d.device:
            raise ValueError(f"bits on {qs.device} and scales on {d.device}: both must be on one device")
        return cls._wrap({"qs": qs, "d": d}, shape, dtype)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def empty(cls, shape, device=None, dtype: torch.dtype | None = None) -> "Q1Tensor":
        """An unfilled weight of logical ``shape`` (``device="meta"`` costs no memory)."""
        rows, cols = int(shape[0]), int(torch.Size(shape[1:]).numel())
        nb = n_blocks(cols)
        return cls(torch.empty(rows, nb * QS_BYTES, dtype=torch.uint8, device=device),
                   torch.empty(rows, nb, dtype=torch.float16, device=device), shape, dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> "Q1Tensor":
        """Quantize a dense weight (any shape of 2+ dims) with the reference quantizer."""
        qs, d = q1_0.quantize(weight.reshape(weight.shape[0], -1))
        return cls(qs, d, weight.shape, dtype or (weight.dtype if weight.dtype.is_floating_point else None))

    @classmethod
    def from_signs(cls, positive: torch.Tensor, scales: torch.Tensor, shape) -> "Q1Tensor":
        """Build from already-binary weights: ``positive`` bool ``[rows, cols]`` (True = +scale) and
        per-group scales ``[rows, n_blocks]`` -- the lossless path for importing sign x scale files."""
        rows, cols = positive.shape
        pad = n_blocks(cols) * q1_0.GROUP_SIZE - cols
        if pad:
            positive = F.pad(positive.to(torch.uint8), (0, pad), value=1)
        return cls(q1_0.pack_bits(positive), scales.to(torch.float16), shape)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, shape, dtype: torch.dtype | None = None) -> "Q1Tensor":
        """From GGUF's 18-byte blocks, uint8 ``[rows, n_blocks * 18]``, as files store them."""
        qs, d = q1_0.from_blocks(blocks)
        return cls(qs, d, shape, dtype)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape, dtype: torch.dtype | None = None) -> "Q1Tensor":
        """A view of a ``to_flat`` buffer (``q1_0.to_flat``: bits, then scales, one uint8 run): its
        bits and scales are that buffer's memory, nothing is copied."""
        shape = torch.Size(int(s) for s in shape)
        qs, d = q1_0.from_flat(flat, shape[0], shape[1:].numel())
        return cls(qs, d, shape, dtype)

    def to_flat(self) -> torch.Tensor:
        """Bits and scales in one uint8 buffer (a copy): what ``from_flat`` reads."""
        return q1_0.to_flat(self.qs, self.d)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in its own shape, in ``dtype`` (default: the tensor's compute dtype)."""
        return q1_0.dequantize(self.qs, self.d, self._cols, dtype or self._dtype).reshape(self._shape)

    def to_blocks(self) -> torch.Tensor:
        """GGUF's 18-byte blocks, uint8 ``[rows, n_blocks * 18]``: what a file stores."""
        return q1_0.to_blocks(self.qs, self.d)


class Q4Tensor(PackedTensor):
    """A Q4_AFFINE weight (``q4_affine.py``): 4-bit codes + a scale and a bias per group, behind the
    weight's own 2-D shape and compute dtype. Scales and biases keep the dtypes they came with."""

    INNER = ("qs", "scale", "bias")
    SCALES = ("scale", "bias")
    QTYPE = q4_affine.QTYPE
    qs: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor

    @staticmethod
    def __new__(cls, qs: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, shape=None,
                dtype: torch.dtype | None = None, requires_grad: bool = False):
        if scale is None and isinstance(qs, cls):  # type(param)(value, requires_grad=...), as accelerate re-wraps
            return qs
        shape = torch.Size(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"a Q4_AFFINE weight is 2-D [rows, cols], got shape {list(shape)}")
        rows, cols = shape
        ng = scale.shape[1] if scale.dim() == 2 else 0
        if scale.dim() != 2 or ng == 0 or cols % ng or tuple(scale.shape) != (rows, ng) or \
                tuple(bias.shape) != (rows, ng) or tuple(qs.shape) != (rows, cols // 2):
            raise ValueError(f"packed tensors qs {tuple(qs.shape)} / scale {tuple(scale.shape)} / bias "
                             f"{tuple(bias.shape)} do not fit shape {list(shape)} (expected qs {(rows, cols // 2)}, "
                             "scale and bias [rows, groups] with groups dividing the row)")
        q4_affine.check_group(cols, cols // ng)
        if qs.dtype != torch.uint8 or scale.dtype not in q4_affine.DTYPE_NAMES or bias.dtype not in q4_affine.DTYPE_NAMES:
            raise ValueError(f"packed tensors must be uint8 codes and float16/bfloat16/float32 scales and biases, "
                             f"got {qs.dtype} / {scale.dtype} / {bias.dtype}")
        return cls._wrap({"qs": qs, "scale": scale, "bias": bias}, shape, dtype)

    @property
    def group_size(self) -> int:
        return self._cols // self.scale.shape[1]

    @classmethod
    def empty(cls, shape, device=None, dtype: torch.dtype | None = None, group: int = q4_affine.GROUP_SIZE,
              scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float16) -> "Q4Tensor":
        rows, cols = int(shape[0]), int(shape[1])
        q4_affine.check_group(cols, group)
        return cls(torch.empty(rows, cols // 2, dtype=torch.uint8, device=device),
                   torch.empty(rows, cols // group, dtype=scale_dtype, device=device),
                   torch.empty(rows, cols // group, dtype=bias_dtype, device=device), shape, dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype | None = None, group: int = q4_affine.GROUP_SIZE,
                   scale_dtype: torch.dtype = torch.float16) -> "Q4Tensor":
        """Quantize a dense 2-D weight with the reference (round-to-nearest) quantizer."""
        qs, scale, bias = q4_affine.quantize(weight, group, scale_dtype)
        return cls(qs, scale, bias, weight.shape, dtype or (weight.dtype if weight.dtype.is_floating_point else None))

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, shape, group: int, scale_dtype: torch.dtype,
                    bias_dtype: torch.dtype, dtype: torch.dtype | None = None) -> "Q4Tensor":
        qs, scale, bias = q4_affine.from_blocks(blocks, int(shape[1]), group, scale_dtype, bias_dtype)
        return cls(qs, scale, bias, shape, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return q4_affine.dequantize(self.qs, self.scale, self.bias, dtype or self._dtype)

    def to_blocks(self) -> torch.Tensor:
        return q4_affine.to_blocks(self.qs, self.scale, self.bias)

    def header_entry(self) -> dict:
        """What a Bonsai file's header says about this weight beside its type and shape."""
        return {"group_size": self.group_size, "scale_dtype": q4_affine.DTYPE_NAMES[self.scale.dtype],
                "bias_dtype": q4_affine.DTYPE_NAMES[self.bias.dtype]}


def _cuda_target(t, device=None, *a, **k):
    return (torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int)
            else torch.device(device)), None


_MOVES = {
    torch.Tensor.to: None,  # parsed like Tensor.to itself
    torch.Tensor.cuda: _cuda_target,
    torch.Tensor.cpu: lambda t, *a, **k: (torch.device("cpu"), None),
    torch.Tensor.half: lambda t, *a, **k: (None, torch.float16),
    torch.Tensor.float: lambda t, *a, **k: (None, torch.float32),
    torch.Tensor.bfloat16: lambda t, *a, **k: (None, torch.bfloat16),
    torch.Tensor.double: lambda t, *a, **k: (None, torch.float64),
}


def writes(qs: torch.Tensor) -> int:
    """How many times a packed weight's bits were overwritten through ``copy_``."""
    return getattr(qs, "_bonsai_writes", 0)


def is_q1(t) -> bool:
    return isinstance(t, Q1Tensor)

