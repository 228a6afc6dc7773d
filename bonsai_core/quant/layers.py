"""``BonsaiLinear`` and ``BonsaiConv2d``: layers that hold only packed bits, scales and a bias.

No full-precision copy of a quantized weight stays alive: the forward dequantizes into the input's
dtype (through the kernel back-end, see ``backends.py``), uses it, and drops it.

Buffers (and so state-dict keys) of a quantized layer ``m``:
    ``m.qs``  uint8   [out, n_blocks*16]   sign bits, GGUF Q1_0 order (see q1_0.py)
    ``m.d``   float16 [out, n_blocks]      per-group scales
    ``m.bias`` (parameter, optional)       in the dtype the model runs in
The scales stay float16 whatever ``model.to(dtype)`` asks: they are part of the format, and a cast
to bf16 would lose bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .policy import Decision, PrecisionPolicy, tensor_nbytes
from .q1_0 import QS_BYTES, PackedWeight, n_blocks


class _Q1Mixin:
    """What both quantized layers share: the packed buffers, their protection, their size."""

    def _init_packed(self, rows: int, cols: int, device=None) -> None:
        nb = n_blocks(cols)
        self.register_buffer("qs", torch.empty(rows, nb * QS_BYTES, dtype=torch.uint8, device=device))
        self.register_buffer("d", torch.empty(rows, nb, dtype=torch.float16, device=device))

    def _apply(self, fn, recurse=True):
        # Follow device moves but never cast the scales: probe where fn sends a float16 tensor.
        d = self.d
        out = super()._apply(fn, recurse)
        target = fn(torch.empty(0, dtype=torch.float16, device=d.device))
        self.d = d.to(device=target.device)
        return out

    def set_packed(self, packed: PackedWeight) -> None:
        if tuple(packed.qs.shape) != tuple(self.qs.shape) or tuple(packed.d.shape) != tuple(self.d.shape):
            raise ValueError(f"packed weight {packed} does not fit layer with qs {tuple(self.qs.shape)}")
        self.qs = packed.qs
        self.d = packed.d

    @property
    def packed_nbytes(self) -> int:
        return tensor_nbytes(self.qs) + tensor_nbytes(self.d)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight in its own shape (for tests and conversions; forward never keeps it)."""
        return PackedWeight(self.qs, self.d, self.weight_shape).dequantize(dtype)


class BonsaiLinear(_Q1Mixin, nn.Module):
    """A ``Linear`` whose weight is Q1_0. ``y = x @ W.T + b`` with ``W`` = sign x group scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_packed(out_features, in_features, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BonsaiLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, bias_dtype=linear.weight.dtype)
        layer.set_packed(PackedWeight.from_float(linear.weight))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return backends.linear_q1(x, self.qs, self.d, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, Q1_0"


class BonsaiConv2d(_Q1Mixin, nn.Module):
    """A ``Conv2d`` whose weight ``[out, in, kh, kw]`` is Q1_0 as the matrix ``[out, in*kh*kw]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self._init_packed(out_channels, in_channels * kh * kw, device)
        self.bias = nn.Parameter(torch.empty(out_channels, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "BonsaiConv2d":
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"BonsaiConv2d supports groups=1 and zero padding, got {conv}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, device=conv.weight.device,
                    bias_dtype=conv.weight.dtype)
        layer.set_packed(PackedWeight.from_float(conv.weight))
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = backends.dequantize(self.qs, self.d, self.in_channels * self.kernel_size[0] * self.kernel_size[1],
                                x.dtype).view(self.weight_shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, Q1_0")


QUANTIZED_TYPES = (BonsaiLinear, BonsaiConv2d)


def empty_like_float(module: nn.Module, device=None) -> nn.Module:
    """A quantized layer with the shape of ``module`` and empty buffers (for loading a checkpoint)."""
    dtype = module.weight.dtype if module.weight.dtype.is_floating_point else torch.float16
    if isinstance(module, nn.Linear):
        return BonsaiLinear(module.in_features, module.out_features, module.bias is not None,
                            device=device, bias_dtype=dtype)
    if isinstance(module, nn.Conv2d):
        return BonsaiConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.bias is not None, device=device,
                            bias_dtype=dtype)
    raise TypeError(f"cannot quantize {type(module).__name__}")


def module_nbytes(model: nn.Module) -> int:
    """Bytes held by every parameter and buffer of ``model``."""
    return sum(tensor_nbytes(t) for t in model.parameters()) + sum(tensor_nbytes(t) for t in model.buffers())


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    quantized: bool
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class QuantReport:
    """What ``quantize_model`` did: each weight layer, and the bytes of the whole model."""

    policy: PrecisionPolicy
    layers: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def decisions(self) -> dict[str, str]:
        return {layer.name: layer.reason for layer in self.layers}

    def table(self, max_rows: int | None = 40) -> str:
        """A readable table: layers quantized / kept and why, bytes before / after, ratio."""
        rows = [f"{'layer':<58} {'kind':<7} {'shape':<22} {'before':>10} {'after':>10}  decision"]
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        for layer in shown:
            rows.append(f"{layer.name[:58]:<58} {layer.kind:<7} {str(list(layer.shape)):<22} "
                        f"{_fmt_bytes(layer.bytes_before):>10} {_fmt_bytes(layer.bytes_after):>10}  {layer.reason}")
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append(f"... {len(self.layers) - max_rows} more layers (--all shows every one)")
        q = [layer for layer in self.layers if layer.quantized]
        kept = len(self.layers) - len(q)
        reasons: dict[str, int] = {}
        for layer in self.layers:
            if not layer.quantized:
                reasons[layer.reason] = reasons.get(layer.reason, 0) + 1
        rows.append("")
        rows.append(f"layers quantized: {len(q)}   kept in 16-bit: {kept}")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            rows.append(f"  {count:>4} x {reason}")
        rows.append(f"bytes before: {_fmt_bytes(self.bytes_before)} ({self.bytes_before:,})   "
                    f"after: {_fmt_bytes(self.bytes_after)} ({self.bytes_after:,})   "
                    f"ratio: 1/{1 / self.ratio:.2f} ({self.ratio:.4f})")
        return "\n".join(rows)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, child)


def module_nbytes_as(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Like ``module_nbytes`` but counting every floating tensor except Q1_0 scales as ``dtype``."""
    if dtype is None:
        return module_nbytes(model)
    size = torch.empty(0, dtype=dtype).element_size()
    scales = {id(m.d) for m in model.modules() if isinstance(m, QUANTIZED_TYPES)}
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        floating = t.is_floating_point() and id(t) not in scales
        total += t.numel() * size if floating else tensor_nbytes(t)
    return total


def quantize_model(model: nn.Module, policy: PrecisionPolicy | None = None,
                   reference_dtype: torch.dtype | None = None) -> QuantReport:
    """Replace every layer the policy allows with its Q1_0 twin, in place.

    Each float weight is packed and released as soon as its layer is replaced, so the peak is the
    float model plus one layer's packing. Returns the report (also kept as ``model.bonsai_report``).
    ``reference_dtype`` (e.g. float16) counts the bytes of float tensors as if stored in it, so the
    ratio compares against the fp16 file rather than an fp32 model in memory.
    """
    policy = policy or PrecisionPolicy()
    ref_size = None if reference_dtype is None else torch.empty(0, dtype=reference_dtype).element_size()

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * ref_size if ref_size and t.is_floating_point() else tensor_nbytes(t)

    report = QuantReport(policy=policy, bytes_before=module_nbytes_as(model, reference_dtype))
    decisions: list[tuple[Decision, nn.Module]] = []
    for name, module in model.named_modules():
        dec = policy.decide(name, module)
        if dec is not None:
            decisions.append((dec, module))
    for dec, module in decisions:
        before = sum(nbytes(t) for t in module.parameters(recurse=False))
        after = before
        shape = tuple(module.weight.shape)
        if dec.quantize:
            q = BonsaiLinear.from_linear(module) if isinstance(module, nn.Linear) else BonsaiConv2d.from_conv(module)
            _set_child(model, dec.name, q)
            after = q.packed_nbytes + (0 if q.bias is None else nbytes(q.bias))
            module.weight = None  # drop the float weight now, not when the module is collected
        report.layers.append(LayerReport(dec.name, type(module).__name__, shape, dec.quantize,
                                         dec.reason, before, after))
    report.bytes_after = module_nbytes_as(model, reference_dtype)
    model.bonsai_report = report
    return report


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def plan_report(model: nn.Module, policy: PrecisionPolicy | None = None,
                reference_dtype: torch.dtype = torch.float16) -> QuantReport:
    """What ``quantize_model`` would do, computed from shapes alone (works on a meta-device model).

    Sizes: float tensors at ``reference_dtype``, Q1_0 weights at 18 bytes per 128-group.
    """
    from .q1_0 import packed_nbytes

    policy = policy or PrecisionPolicy()
    size = torch.empty(0, dtype=reference_dtype).element_size()

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * size if t.is_floating_point() else tensor_nbytes(t)

    total = sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    report = QuantReport(policy=policy, bytes_before=total, bytes_after=total)
    for name, module in model.named_modules():
        dec = policy.decide(name, module)
        if dec is None:
            continue
        before = sum(nbytes(t) for t in module.parameters(recurse=False))
        after = before
        if dec.quantize:
            w = module.weight
            after = before - nbytes(w) + packed_nbytes(w.shape[0], w[0].numel())
        report.bytes_after += after - before
        report.layers.append(LayerReport(name, type(module).__name__, tuple(module.weight.shape),
                                         dec.quantize, dec.reason, before, after))
    return report
