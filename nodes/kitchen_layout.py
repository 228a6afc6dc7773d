"""Q1_0 as a comfy_kitchen ``QuantizedTensor`` layout, so ComfyUI's dynamic VRAM sees packed bytes.

ComfyUI 0.33's dynamic VRAM (comfy_aimdo; ``comfy/memory_management.py``, ``comfy/ops.py``
``cast_modules_with_vbar``, ``comfy/model_patcher.py`` ``ModelPatcherDynamic``) sizes, pins and
stages each weight by what it is: a plain tensor as shape x dtype, a comfy_kitchen
``QuantizedTensor`` by its inner tensors (``__tensor_flatten__``: ``_qdata`` and the tensor fields
of its params). A ``Q1Tensor`` is neither (it would count 14x its bytes at bf16), so a Q1_0 weight
goes to ComfyUI as a ``QuantizedTensor`` of this layout:

* ``_qdata``: the packed weight as one uint8 run, sign bits then fp16 scales
  (``bonsai_core.quant.q1_0.to_flat``), so ``nbytes`` (what ``comfy.model_management.module_size``
  adds up), ``vram_aligned_size``, pinning (``data_ptr`` + ``nbytes``) and the staging copies see
  every packed byte and nothing else: 1.125 bits a weight;
* params: ``orig_shape`` (the logical shape, ``[out, in]`` or ``[out, in, kh, kw]``),
  ``orig_dtype`` (the compute dtype) and no tensor field (``scale`` is None: the scales travel in
  ``_qdata``; two inner tensors would each be padded to 1 KiB by ``vram_aligned_size``).

What ComfyUI does with it goes through comfy_kitchen's generic handlers (``tensor/base.py``
``_DISPATCH_TABLE``): ``detach``, ``clone``, ``to`` / ``_to_copy`` (a device move copies
``_qdata``; a dtype change only rewrites ``orig_dtype``), ``empty_like`` + ``copy_`` (staging
buffers and pins), ``__tensor_flatten__`` / ``__tensor_unflatten__`` (``interpret_gathered_like``
views a staging buffer as this layout). The pack's layers compute from ``view(qt)`` (a ``Q1Tensor``
over the same memory) through ``bonsai_core.quant.kernels``; ``aten.linear`` and ``aten.convolution``
are registered here so a direct ``F.linear`` / ``F.conv2d`` on the tensor does the same. Any other op
dequantizes (comfy_kitchen's fallback): correct, and never taken by the pack's layers.

Nothing here imports ComfyUI. Written against comfy_kitchen 0.2.31 (the version ComfyUI 0.33.0
pins); ``problem()`` says why another one is not used.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata

import torch

from ..bonsai_core.errors import BonsaiRequestError
from ..bonsai_core.quant import kernels
from ..bonsai_core.quant.tensor import Q1Tensor

LAYOUT = "BonsaiQ1_0Layout"
TESTED = "0.2.31"
SUPPORTED = ((0, 2, 31), (0, 3, 0))  # [from, below): the layout API as read in 0.2.31
_STATE: dict = {}


def is_q1(t) -> bool:
    """A comfy_kitchen tensor of this layout (matched by name: no comfy_kitchen import)."""
    return type(t).__name__ == "QuantizedTensor" and getattr(t, "_layout_cls", None) == LAYOUT


def view(qt) -> Q1Tensor:
    """The ``Q1Tensor`` over a tensor's ``_qdata`` (views: nothing is copied). Kept on the tensor, so
    a weight that stays put (ComfyUI keeps a staged weight while it is resident) gives the same
    object every step, which the CPU dense cache keys on."""
    v = getattr(qt, "_bonsai_q1", None)
    if v is None or v.dtype != qt.dtype:
        p = qt._params
        v = Q1Tensor.from_flat(qt._qdata, p.orig_shape, p.orig_dtype)
        qt._bonsai_q1 = v
    return v


def as_param(qt) -> torch.nn.Parameter:
    """``qt`` as a Parameter whose wrapper is an inference tensor exactly when its bytes are.
    comfy_kitchen's ``detach`` goes through autograd, which refuses a wrapper made outside inference
    mode around inference-mode bytes once inference mode is on again ("Cannot set version_counter for
    inference tensor") -- and ComfyUI detaches every weight to size a model (``module_size``), in
    inference mode. A weight re-wrapped outside it (``Module.to`` or ``set_attr_param`` while ComfyUI
    unloads models between prompts) is wrapped again here; ComfyUI's own quantized layers clone
    instead (``comfy/ops.py`` ``_quantized_apply``), which would copy the weight."""
    if isinstance(qt, torch.nn.Parameter) and qt.is_inference() == qt._qdata.is_inference():
        return qt
    from comfy_kitchen.tensor import QuantizedTensor

    with torch.inference_mode(qt._qdata.is_inference()):
        return torch.nn.Parameter(QuantizedTensor(qt._qdata, qt._layout_cls, qt._params), requires_grad=False)


def _version() -> tuple[str, tuple[int, ...] | None]:
    try:
        raw = metadata.version("comfy-kitchen")
    except metadata.PackageNotFoundError:
        return "unknown", None
    try:
        return raw, tuple(int(x) for x in raw.split("+")[0].split(".")[:3])
    except ValueError:
        return raw, None


def problem() -> str | None:
    """Why this layout cannot be used here (None: it can). Checked once: comfy_kitchen importable,
    a version in ``SUPPORTED``, and a round trip of a tiny weight through the calls ComfyUI makes."""
    if "problem" in _STATE:
        return _STATE["problem"]
    try:
        import comfy_kitchen.tensor  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import means: not usable
        _STATE["problem"] = f"comfy_kitchen is not importable ({type(e).__name__}: {e})"
        return _STATE["problem"]
    raw, version = _version()
    if version is None or not SUPPORTED[0] <= version < SUPPORTED[1]:
        _STATE["problem"] = (f"comfy_kitchen {raw} is not a version this pack's Q1_0 layout was checked with "
                             f"({TESTED}; 0.2.x from 0.2.31 accepted)")
        return _STATE["problem"]
    try:
        _register()
        _self_check()
        _STATE["problem"] = None
    except Exception as e:  # noqa: BLE001 - an API that changed shape: say so, never break the load
        _STATE["problem"] = f"comfy_kitchen {raw}'s QuantizedTensor API changed ({type(e).__name__}: {e})"
    return _STATE["problem"]


def to_kitchen(q: Q1Tensor):
    """A ``Q1Tensor`` as a comfy_kitchen ``QuantizedTensor`` of this layout (one copy of its bytes)."""
    from comfy_kitchen.tensor import QuantizedTensor

    layout = _register()
    params = layout.Params(scale=None, orig_dtype=q.dtype, orig_shape=tuple(q.shape))
    return QuantizedTensor(q.to_flat(), LAYOUT, params)


def _self_check() -> None:
    """The calls ComfyUI's dynamic VRAM makes, on a 2 x 130 weight: size, flatten / unflatten into
    a byte buffer as a staging copy does, device moves, and the values coming back unchanged."""
    from comfy_kitchen.tensor import QuantizedTensor

    def need(ok: bool, what: str):
        if not ok:
            raise RuntimeError(what)

    q = Q1Tensor.from_float(torch.linspace(-1, 1, 260).reshape(2, 130), torch.bfloat16)
    qt = to_kitchen(q)
    names, ctx = qt.__tensor_flatten__()
    need(names == ["_qdata"] and qt.nbytes == q.nbytes, f"flattens to {names}, {qt.nbytes} bytes for {q.nbytes}")
    buf = torch.empty(q.nbytes, dtype=torch.uint8)
    staged = QuantizedTensor.__tensor_unflatten__({"_qdata": buf.view(qt._qdata.dtype)}, ctx, 0, 0)
    staged.copy_(qt)
    need(is_q1(staged) and staged.shape == q.shape and staged.dtype == torch.bfloat16, f"unflattens to {staged!r}")
    need(torch.equal(view(staged).dequantize(torch.float32), q.dequantize(torch.float32)),
         "a staged copy reads back other values")
    moved = qt.to("meta")
    need(is_q1(moved) and moved.is_meta and moved.shape == q.shape, f"moves to meta as {moved!r}")


def _register():
    if "layout" in _STATE:
        return _STATE["layout"]
    import torch.nn.functional as F
    from comfy_kitchen.tensor import (BaseLayoutParams, QuantizedLayout, QuantizedTensor, dequantize_args,
                                      register_layout_class, register_layout_op)

    class BonsaiQ1Layout(QuantizedLayout):
        """Q1_0, group 128 (``bonsai_core/quant/q1_0.py``): ``_qdata`` holds bits then scales."""

        MIN_SM_VERSION = None  # the kernel contract picks per device: Triton on CUDA, reference elsewhere

        @dataclasses.dataclass(frozen=True)
        class Params(BaseLayoutParams):
            def _tensor_fields(self) -> list[str]:
                return []  # scale is None: the scales are in _qdata

        @classmethod
        def quantize(cls, tensor, **kwargs):
            # ComfyUI calls this to merge a LoRA into a quantized weight and requantize it
            # (comfy/ops.py post_cast); a sign x scale weight would lose the LoRA, so the pack's
            # patcher keeps LoRAs beside the weight and nothing may requantize one here.
            raise BonsaiRequestError("Q1_0 weights are not quantized inside ComfyUI (a LoRA merged into a 1-bit "
                                     "weight would be erased); make them with `bonsai convert`")

        @classmethod
        def dequantize(cls, qdata, params):
            return Q1Tensor.from_flat(qdata, params.orig_shape, params.orig_dtype).dequantize()

        @classmethod
        def get_plain_tensors(cls, qtensor):
            v = view(qtensor)
            return v.qs, v.d

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": qdata}

    @register_layout_op(torch.ops.aten.linear.default, BonsaiQ1Layout)
    def _linear(_qt, args, kwargs):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(x, QuantizedTensor) or not is_q1(w):
            return F.linear(*dequantize_args((x, w, bias)))
        return kernels.linear(x, view(w), bias)

    @register_layout_op(torch.ops.aten.convolution.default, BonsaiQ1Layout)
    def _convolution(_qt, args, kwargs):
        x, w, bias, stride, padding, dilation, transposed, _out_pad, groups = args
        if isinstance(x, QuantizedTensor) or not is_q1(w) or transposed or groups != 1 or w.dim() != 4:
            return torch.ops.aten.convolution.default(*dequantize_args(args))
        return kernels.conv2d(x, view(w), bias, tuple(stride), tuple(padding), tuple(dilation))

    register_layout_class(LAYOUT, BonsaiQ1Layout)
    _STATE["layout"] = BonsaiQ1Layout
    return BonsaiQ1Layout
