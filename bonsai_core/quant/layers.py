"""``BonsaiLinear`` and ``BonsaiConv2d``: ``nn.Linear`` / ``nn.Conv2d`` whose ``weight`` is a ``Q1Tensor``
(a ``BonsaiLinear`` may also hold a 4-bit ``Q4Tensor``: text encoders).

They are subclasses, so ``isinstance(m, nn.Linear)`` holds and every walker that looks for linears
finds them; their ``weight`` is one object carrying the packed bits, the fp16 scales, the logical
shape and the quant type (``tensor.py``), so ``state_dict()`` holds it under the file's own key
``<module>.weight`` and ``load_state_dict`` takes it back (or the file's raw 18-byte blocks).
No full-precision copy of a quantized weight is ever made: the forward goes through the kernel
contract (``kernels.py``), for convs as for linears.

Each layer also has a LoRA slot: low-rank side branches ``y = base(x) + sum(strength * up(down(x)))``
(for a conv, ``down`` is a conv with the layer's kernel, stride and padding and ``up`` a 1x1 conv),
attached and detached by name; the packed bits are never touched. Every change bumps
``lora_epoch()``, so captured CUDA graphs know to capture again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BonsaiCheckpointError
from . import kernels
from .policy import Decision, PrecisionPolicy, tensor_nbytes
from .q1_0 import BLOCK_BYTES, n_blocks
from .tensor import PackedTensor, Q1Tensor, Q4Tensor

_LORA_EPOCH = [0]


def lora_epoch() -> int:
    """A counter that changes whenever any LoRA branch of any layer is added, removed or re-weighted."""
    return _LORA_EPOCH[0]


class LoRABranch(nn.Module):
    """One low-rank side branch: ``strength * up(down(x))``. Its tensors follow the layer's device
    and dtype but are not part of the layer's state dict (LoRA files are not model files)."""

    def __init__(self, name: str, down: torch.Tensor, up: torch.Tensor, strength: float):
        super().__init__()
        self.name = name
        self.strength = float(strength)
        self.register_buffer("down", down.detach(), persistent=False)
        self.register_buffer("up", up.detach(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.name!r}, rank={self.down.shape[0]}, strength={self.strength}"


class _Q1Layer:
    """What both quantized layers share: the Q1_0 weight, its loading, its size, the LoRA slot."""

    weight: PackedTensor
    _QTYPES = ("Q1_0",)

    def _set_weight(self, w: PackedTensor) -> None:
        if not isinstance(w, PackedTensor) or w.qtype not in self._QTYPES or w.shape != self._logical_shape():
            raise ValueError(f"{type(self).__name__} needs a {' or '.join(self._QTYPES)} weight of shape {list(self._logical_shape())}, "
                             f"got {type(w).__name__} {list(w.shape)}")
        self.weight = nn.Parameter(w, requires_grad=False)
        self.lora = nn.ModuleList()

    @property
    def packed_nbytes(self) -> int:
        return self.weight.nbytes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict straight from a Bonsai file holds the 18-byte blocks under the same key.
        key = prefix + "weight"
        t = state_dict.get(key)
        if t is not None and not isinstance(t, PackedTensor) and t.dtype == torch.uint8:
            shape = self._logical_shape()
            want = (shape[0], n_blocks(shape[1:].numel()) * BLOCK_BYTES)
            if tuple(t.shape) == want:
                state_dict = dict(state_dict)
                state_dict[key] = Q1Tensor.from_blocks(t, shape, self.weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- the LoRA slot ---------------------------------------------------------------------------

    def lora_names(self) -> list[str]:
        return [b.name for b in self.lora]

    def add_lora(self, name: str, down: torch.Tensor, up: torch.Tensor, strength: float = 1.0) -> None:
        """Attach a side branch ``name`` (replacing one of that name). Shapes: linear ``down [r, in]``,
        ``up [out, r]``; conv ``down [r, in, kh, kw]``, ``up [out, r]`` or ``[out, r, 1, 1]``."""
        down, up = _check_lora(self._logical_shape(), name, down, up)
        self.remove_lora(name)
        dtype = self.bias.dtype if self.bias is not None else self.weight.dtype
        self.lora.append(LoRABranch(name, down.to(self.weight.device, dtype), up.to(self.weight.device, dtype),
                                    strength))
        _LORA_EPOCH[0] += 1

    def remove_lora(self, name: str) -> bool:
        """Detach branch ``name``; False when there was none of that name."""
        return _remove_branch(self.lora, name)

    def set_lora_strength(self, name: str, strength: float) -> None:
        if not _set_branch_strength(self.lora, name, strength):
            raise KeyError(f"no LoRA branch {name!r} on this layer (has {self.lora_names()})")

    def _with_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _add_branches(self.lora, x, y, self._lora_delta)


class BonsaiLinear(_Q1Layer, nn.Linear):
    """An ``nn.Linear`` whose weight is Q1_0 (``W`` = sign x group scale) or Q4_AFFINE (``W`` = 4-bit
    code x group scale + group bias): ``y = x @ W.T + b``."""

    _QTYPES = ("Q1_0", "Q4_AFFINE")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None):
        dtype = dtype or torch.float16
        nn.Linear.__init__(self, in_features, out_features, bias=False, device="meta", dtype=dtype)
        self._set_weight(Q1Tensor.empty((out_features, in_features), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def _logical_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str = "Q1_0") -> "BonsaiLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype)
        make = Q4Tensor if qtype == Q4Tensor.QTYPE else Q1Tensor
        layer._set_weight(make.from_float(linear.weight.detach()))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight, self.bias)
        return self._with_lora(x, y) if len(self.lora) else y

    def _lora_delta(self, x, down, up):
        return _linear_delta(x, down, up)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.weight.qtype}")


class BonsaiConv2d(_Q1Layer, nn.Conv2d):
    """An ``nn.Conv2d`` whose weight ``[out, in, kh, kw]`` is Q1_0 as the matrix ``[out, in*kh*kw]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype: torch.dtype | None = None):
        dtype = dtype or torch.float16
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups=1, bias=False, device="meta", dtype=dtype)
        self._set_weight(Q1Tensor.empty(self._logical_shape(), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def _logical_shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels, *self.kernel_size))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "BonsaiConv2d":
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"BonsaiConv2d supports groups=1 and zero padding, got {conv}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, device="meta", dtype=conv.weight.dtype)
        layer._set_weight(Q1Tensor.from_float(conv.weight.detach()))
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return self._with_lora(x, y) if len(self.lora) else y

    def _lora_delta(self, x, down, up):
        return _conv_delta(self, x, down, up)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, Q1_0")


QUANTIZED_TYPES = (BonsaiLinear, BonsaiConv2d)


def attach_lora(module: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor, strength: float = 1.0) -> None:
    """Attach side branch ``name`` to any weight layer a LoRA file can target: a 1-bit layer's own
    slot, or the same slot given to a dense ``nn.Linear`` / ``nn.Conv2d`` (layers the precision
    policy keeps in 16-bit, text encoders): a ``lora`` list and one forward hook that adds the
    branches to the layer's output, both removed again with the last branch. Never a merge: the
    layer's weight is not touched."""
    if isinstance(module, QUANTIZED_TYPES):
        module.add_lora(name, down, up, strength)
        return
    if not _dense_slot_fits(module):
        raise BonsaiCheckpointError(f"LoRA {name!r}: cannot attach to a {type(module).__name__} (a branch needs a "
                                    "Linear, or a Conv2d with groups=1 and zero padding)")
    down, up = _check_lora(module.weight.shape, name, down, up)
    detach_lora(module, name)
    if getattr(module, "lora", None) is None:
        module.lora = nn.ModuleList()
        module._bonsai_lora_hook = module.register_forward_hook(_dense_lora_hook)
    dtype, device = module.weight.dtype, module.weight.device
    module.lora.append(LoRABranch(name, down.to(device, dtype), up.to(device, dtype), strength))
    _LORA_EPOCH[0] += 1


def detach_lora(module: nn.Module, name: str) -> bool:
    """Remove branch ``name`` from a 1-bit or dense layer; False when it had none of that name."""
    if isinstance(module, QUANTIZED_TYPES):
        return module.remove_lora(name)
    branches = getattr(module, "lora", None)
    if branches is None or not _remove_branch(branches, name):
        return False
    if not len(branches):  # the last one: the layer is a plain layer again (no hook, no list)
        module._bonsai_lora_hook.remove()
        del module._bonsai_lora_hook
        del module.lora
    return True


def reweight_lora(module: nn.Module, name: str, strength: float) -> None:
    """Set branch ``name``'s strength on a 1-bit or dense layer."""
    if isinstance(module, QUANTIZED_TYPES):
        module.set_lora_strength(name, strength)
        return
    if not _set_branch_strength(getattr(module, "lora", None) or (), name, strength):
        raise KeyError(f"no LoRA branch {name!r} on this layer")


def lora_fan_in(module: nn.Module) -> tuple[int, ...] | None:
    """What a branch's ``down`` must be shaped after its rank (``(in,)`` or ``(in, kh, kw)``), or None
    for a module no branch can be attached to."""
    if isinstance(module, QUANTIZED_TYPES):
        return tuple(module._logical_shape()[1:])
    return tuple(module.weight.shape[1:]) if _dense_slot_fits(module) else None


def _dense_slot_fits(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _dense_lora_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    delta = partial(_conv_delta, module) if isinstance(module, nn.Conv2d) else _linear_delta
    return _add_branches(module.lora, args[0], output, delta)


# -- one LoRA slot for both kinds of layer: a list of LoRABranch and the branch arithmetic -----------
def _check_lora(shape: torch.Size, name: str, down: torch.Tensor, up: torch.Tensor):
    """``down`` / ``up`` against a weight of ``shape`` (a conv's 4-D ``up`` flattened to ``[out, r]``)."""
    out, fan_in = shape[0], shape[1:]
    r = down.shape[0] if down.dim() else 0
    up = up.reshape(up.shape[0], -1) if up.dim() >= 2 else up
    if tuple(down.shape[1:]) != tuple(fan_in) or tuple(up.shape) != (out, r):
        raise BonsaiCheckpointError(
            f"LoRA {name!r}: down {list(down.shape)} / up {list(up.shape)} do not fit a layer of weight "
            f"{list(shape)} (expected down [r, {', '.join(map(str, fan_in))}] and up [{out}, r])")
    return down, up


def _remove_branch(branches, name: str) -> bool:
    for i, b in enumerate(branches):
        if b.name == name:
            del branches[i]
            _LORA_EPOCH[0] += 1
            return True
    return False


def _set_branch_strength(branches, name: str, strength: float) -> bool:
    for b in branches:
        if b.name == name:
            b.strength = float(strength)
            _LORA_EPOCH[0] += 1
            return True
    return False


def _add_branches(branches, x: torch.Tensor, y: torch.Tensor, delta) -> torch.Tensor:
    """``y`` plus every branch's ``strength x delta(x, down, up)``, in the order they were attached."""
    for b in branches:
        if b.strength:
            y = y + b.strength * delta(x, b.down.to(x.dtype), b.up.to(x.dtype))
    return y


def _linear_delta(x, down, up):
    return F.linear(F.linear(x, down), up)


def _conv_delta(conv: nn.Conv2d, x, down, up):
    h = F.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
    return F.conv2d(h, up.reshape(*up.shape[:2], 1, 1))


def empty_like_float(module: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """A quantized layer with the shape of ``module`` and an unfilled weight (for loading a checkpoint)."""
    dtype = dtype or (module.weight.dtype if module.weight.dtype.is_floating_point else torch.float16)
    if isinstance(module, nn.Linear):
        return BonsaiLinear(module.in_features, module.out_features, module.bias is not None,
                            device=device, dtype=dtype)
    if isinstance(module, nn.Conv2d):
        return BonsaiConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.bias is not None, device=device,
                            dtype=dtype)
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
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        # the name column fits the longest name shown (never cut); a column of 58 at least keeps
        # short tables aligned as before
        width = max([58] + [len(layer.name) for layer in shown])
        rows = [f"{'layer':<{width}} {'kind':<7} {'shape':<22} {'before':>10} {'after':>10}  decision"]
        for layer in shown:
            rows.append(f"{layer.name:<{width}} {layer.kind:<7} {str(list(layer.shape)):<22} "
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
    """Bytes in binary units, labelled as such (1 KiB = 1024 B)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, child)


def module_nbytes_as(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Like ``module_nbytes`` but counting every dense floating tensor as ``dtype`` (Q1_0 weights
    count what they hold)."""
    if dtype is None:
        return module_nbytes(model)
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        dense_float = t.is_floating_point() and not isinstance(t, PackedTensor)
        total += t.numel() * size if dense_float else tensor_nbytes(t)
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
        return t.numel() * ref_size if ref_size and t.is_floating_point() and not isinstance(t, PackedTensor) \
            else tensor_nbytes(t)

    report = QuantReport(policy=policy, bytes_before=module_nbytes_as(model, reference_dtype))
    decisions: list[tuple[Decision, nn.Module]] = []
    for name, module in model.named_modules():
        dec = None if isinstance(module, QUANTIZED_TYPES) else policy.decide(name, module)
        if dec is not None:
            decisions.append((dec, module))
    for dec, module in decisions:
        before = sum(nbytes(t) for t in module.parameters(recurse=False))
        after = before
        shape = tuple(module.weight.shape)
        if dec.quantize:
            q = BonsaiLinear.from_linear(module, policy.qtype) if isinstance(module, nn.Linear) \
                else BonsaiConv2d.from_conv(module)
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

    Sizes: float tensors at ``reference_dtype``, Q1_0 weights at 18 bytes per 128-group, Q4_AFFINE
    ones at 36 bytes per 64-group (fp16 scale and bias).
    """
    from .q1_0 import packed_nbytes
    from .q4_affine import GROUP_SIZE as Q4_GROUP, block_bytes

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
            rows, cols = w.shape[0], w.shape[1:].numel()
            packed = packed_nbytes(rows, cols) if policy.qtype == "Q1_0" else \
                rows * (cols // Q4_GROUP) * block_bytes(Q4_GROUP, torch.float16, torch.float16)  # whole groups
            after = before - nbytes(w) + packed
        report.bytes_after += after - before
        report.layers.append(LayerReport(name, type(module).__name__, tuple(module.weight.shape),
                                         dec.quantize, dec.reason, before, after))
    return report
