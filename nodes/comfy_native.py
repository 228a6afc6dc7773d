"""Every ComfyUI internal the native MODEL needs, in one file, checked against the running version.

A Bonsai denoiser becomes a real ComfyUI ``MODEL`` (core KSampler, SamplerCustomAdvanced, LoRA
loaders and model patches work on it) the way ComfyUI-GGUF's does: ``bonsai_core.native`` reads it
into ComfyUI's own names with the 1-bit weights packed (``Q1Tensor``), and
``comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": BonsaiOps})``
lets core's architecture detection build the model with our layers. What we add over GGUF:

* ``Linear`` / ``Conv2d`` compute from the packed weight through the kernel contract
  (``bonsai_core.quant.kernels``: reference on cpu/mps, Triton on cuda), never a dense copy kept;
* LoRA is a side computation at run time: ``y = W x + sum(strength * alpha/r * up(down(x)))``
  read from the ModelPatcher's patch list (the patcher hands it to the layer instead of merging;
  in low-VRAM mode it arrives as ComfyUI's ``LowVramPatch``, which we read the same way), so a
  strength change is a new list, not a reload, and no sign+scale weight is ever re-quantized;
* sizes: a ``Q1Tensor``'s ``nbytes`` is its packed bytes, which ComfyUI 0.33's ``module_size``
  reads; 0.3.64 multiplies ``numel`` by the element size, so the patcher's size is set here;
* dynamic VRAM (0.33, CUDA): the weights go to ComfyUI as comfy_kitchen tensors of the pack's Q1_0
  layout (``kitchen_layout.py``, "the kitchen form"), which its dynamic patcher sizes, pins and stages
  by their packed bytes; the layers compute from the staged bytes, and the patcher keeps LoRA patches
  away from ComfyUI's merge-and-requantize (``kitchen_form`` says when; ``BONSAI_KITCHEN``).

Internals used (each checked in ``require()``): ``comfy.ops.manual_cast`` (its ``Linear`` /
``Conv2d``, ``run_every_op`` where present), ``comfy.sd.load_diffusion_model_state_dict`` (and its
``disable_dynamic`` where present), ``comfy.model_patcher.ModelPatcher.{patch_weight_to_device,
unpatch_model}``, the patch tuple ``(strength, adapter, strength_model, offset, function)``,
``LowVramPatch``'s ``key`` / ``patches``, ``comfy.weight_adapter.LoRAAdapter.weights``; for the kitchen
form also (checked in ``_dynamic_vram_problem``) ``comfy.quant_ops.QuantizedTensor`` being comfy_kitchen's,
``comfy.ops.cast_bias_weight(..., offloadable=True)`` / ``uncast_bias_weight``, ``ModelPatcherDynamic``
(its ``weight_lowvram_function`` and ``patch_weight_to_device(force_cast=True)``), the layer attribute
``_v`` (a layer dynamic VRAM stages), ``comfy.memory_management.interpret_gathered_like`` /
``vram_aligned_size``. Tested with ComfyUI 0.3.64 (a125cd84) and 0.33.0 (783545f6); the kitchen form
with comfy_kitchen 0.2.31 on the CPU (its CUDA path: benchmarks/comfy_dynamic_vram_check.py).
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
import torch.nn.functional as F

from ..bonsai_core.errors import BonsaiError, BonsaiRequestError
from ..bonsai_core.quant import kernels
from ..bonsai_core.quant.layers import module_nbytes
from ..bonsai_core.quant.tensor import Q1Tensor
from . import kitchen_layout

TESTED_VERSIONS = ("0.3.64", "0.33.0")


def is_q1(t) -> bool:
    """A packed weight, also one made by another import of ``bonsai_core`` (a pip-installed copy beside
    the pack's own, or a benchmark's): the class is matched by name, the layout by its members; or
    the same weight as a comfy_kitchen tensor of the pack's Q1_0 layout (dynamic VRAM)."""
    return isinstance(t, Q1Tensor) or (type(t).__name__ == "Q1Tensor" and hasattr(t, "qs") and hasattr(t, "d")) \
        or kitchen_layout.is_q1(t)


def comfy_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001 - very old checkouts have no version module
        return "unknown"


def require() -> None:
    """Raise a ``BonsaiError`` naming the ComfyUI version when an internal we use is missing."""
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.ops
    import comfy.sd

    missing = []
    for owner, names in ((comfy.ops, ("manual_cast",)), (comfy.sd, ("load_diffusion_model_state_dict",)),
                         (comfy.model_patcher.ModelPatcher, ("patch_weight_to_device", "unpatch_model", "clone",
                                                             "add_object_patch")),
                         (comfy.model_sampling, ("ModelSamplingDiscrete", "V_PREDICTION"))):
        missing += [f"{owner.__name__}.{n}" for n in names if not hasattr(owner, n)]
    for cls in ("Linear", "Conv2d"):
        if not hasattr(getattr(comfy.ops, "manual_cast", None), cls):
            missing.append(f"comfy.ops.manual_cast.{cls}")
    try:
        from comfy.weight_adapter import LoRAAdapter  # noqa: F401
    except ImportError:
        missing.append("comfy.weight_adapter.LoRAAdapter")
    if missing:
        raise BonsaiError(
            f"ComfyUI {comfy_version()} changed internals the Bonsai native model uses ({', '.join(missing)}); "
            f"this pack was tested with ComfyUI {' and '.join(TESTED_VERSIONS)}: update ComfyUI-Bonsai, or use "
            "the Bonsai Loader + Bonsai Sampler nodes meanwhile")


KITCHEN_ENV = "BONSAI_KITCHEN"
KITCHEN_CHOICES = ("auto", "on", "off")


def _dynamic_vram_problem() -> str | None:
    """Why this ComfyUI cannot take comfy_kitchen weights on its dynamic VRAM path (None: it can).
    The internals the path uses: ``comfy.quant_ops.QuantizedTensor`` (comfy_kitchen's own class, which
    ``comfy.memory_management`` sizes and stages), ``comfy.ops.cast_bias_weight(..., offloadable=)`` /
    ``uncast_bias_weight`` (the staging the layers call), ``ModelPatcherDynamic``, and
    ``load_diffusion_model_state_dict``'s ``disable_dynamic``."""
    try:
        import comfy.memory_management as cmm
        import comfy.model_patcher
        import comfy.ops
        import comfy.quant_ops
        import comfy.sd
        from comfy_kitchen.tensor import QuantizedTensor
    except Exception as e:  # noqa: BLE001 - 0.3.64 has no comfy.memory_management / comfy_kitchen
        return f"ComfyUI {comfy_version()} has no comfy_kitchen weight path ({type(e).__name__}: {e})"
    missing = [n for owner, n in ((cmm, "interpret_gathered_like"), (cmm, "vram_aligned_size"),
                                  (comfy.ops, "cast_bias_weight"), (comfy.ops, "uncast_bias_weight"),
                                  (comfy.model_patcher, "ModelPatcherDynamic")) if not hasattr(owner, n)]
    if getattr(comfy.quant_ops, "QuantizedTensor", None) is not QuantizedTensor:
        missing.append("comfy.quant_ops.QuantizedTensor (not comfy_kitchen's)")
    if not missing and "offloadable" not in inspect.signature(comfy.ops.cast_bias_weight).parameters:
        missing.append("comfy.ops.cast_bias_weight(offloadable=)")
    if "disable_dynamic" not in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters:
        missing.append("comfy.sd.load_diffusion_model_state_dict(disable_dynamic=)")
    if missing:
        return f"ComfyUI {comfy_version()} lacks {', '.join(missing)}"
    return None


def kitchen_form() -> bool:
    """Whether the loader hands the 1-bit weights to ComfyUI as comfy_kitchen tensors of the pack's
    Q1_0 layout (``kitchen_layout.py``) and lets ComfyUI's dynamic VRAM manage them, or keeps them as
    ``Q1Tensor`` on the classic ModelPatcher (``disable_dynamic``). ``BONSAI_KITCHEN``: ``auto``
    (default: the kitchen form when ComfyUI runs with dynamic VRAM, which it does by default on NVIDIA
    GPUs; checked there by benchmarks/comfy_dynamic_vram_check.py: same images, 0.39x the classic
    form's peak), ``off`` (always classic), ``on`` (always; an error where it cannot be)."""
    raw = os.environ.get(KITCHEN_ENV, "auto").strip().lower() or "auto"
    if raw not in KITCHEN_CHOICES:
        raise BonsaiError(f"{KITCHEN_ENV}={raw!r}: expected one of {', '.join(KITCHEN_CHOICES)}")
    if raw == "off":
        return False
    try:
        import comfy.memory_management as cmm

        dynamic = bool(getattr(cmm, "aimdo_enabled", False))
    except ImportError:  # ComfyUI before dynamic VRAM (0.3.64)
        dynamic = False
    if raw == "auto" and not dynamic:
        return False
    why = _dynamic_vram_problem() or kitchen_layout.problem()
    if why is None:
        return True
    if raw == "on":
        raise BonsaiError(f"{KITCHEN_ENV}=on, but {why}; unset it to load on the classic path")
    logging.warning("Bonsai: ComfyUI's dynamic VRAM is on, but %s: the Bonsai model loads on the classic "
                    "ModelPatcher (disable_dynamic), which moves whole layers", why)
    return False


# ------------------------------------------------------------------------------------------------
# LoRA as a side computation, from ComfyUI's patch tuples


def lora_terms(patches, layer_shape, device, dtype, cache: dict) -> list[tuple]:
    """ComfyUI patch tuples for one weight -> ``(down, up, scale, strength_model, rows)`` terms.

    ``down`` is ``[r, in]`` (linear) or ``[r, in, kh, kw]`` (conv), ``up`` ``[out_rows, r]``;
    ``rows`` is ``None`` or ``(start, length)`` of the output rows the patch covers (a LoRA on q, k or
    v of a fused qkv weight). Only LoRA/LoCon adapters are low-rank; anything else is refused,
    naming it, because merging it would need the dense weight."""
    terms = []
    for p in patches:
        strength, v, strength_model = p[0], p[1], p[2]
        offset = p[3] if len(p) > 3 else None
        function = p[4] if len(p) > 4 else None
        if type(v).__name__ != "LoRAAdapter" or function is not None:
            kind = type(v).__name__ if not isinstance(v, tuple) else repr(v[0])
            raise BonsaiRequestError(
                f"a {kind} patch on a 1-bit Bonsai layer: only LoRA / LoCon patches can run beside packed weights "
                "(others would need the dense weight merged and re-quantized, which erases them); use a plain LoRA")
        up, down, alpha, mid, dora, reshape = v.weights[:6]
        if dora is not None or reshape is not None:
            raise BonsaiRequestError("a DoRA (or reshaping) LoRA on a 1-bit Bonsai layer is not supported: it "
                                     "rescales the merged weight; use a plain LoRA")
        key = (id(v), device, dtype)
        if key not in cache:
            d = down.to(device, torch.float32)
            if mid is not None:  # LoCon's middle kernel folded into down, as ComfyUI's LoRAAdapter does
                m = mid.to(device, torch.float32)
                d = torch.mm(d.transpose(0, 1).flatten(1), m.transpose(0, 1).flatten(1)).reshape(
                    d.shape[1], d.shape[0], m.shape[2], m.shape[3]).transpose(0, 1)
            rank = d.shape[0]
            d = d.reshape(rank, *layer_shape[1:]) if len(layer_shape) > 2 else d.reshape(rank, -1)
            cache[key] = (d.to(dtype), up.reshape(up.shape[0], -1).to(device, dtype), rank)
        d, u, rank = cache[key]
        scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
        rows = None
        if offset is not None:
            if offset[0] != 0:
                raise BonsaiRequestError(f"a LoRA patch offset along dimension {offset[0]} on a 1-bit layer "
                                         "(only output rows are supported)")
            rows = (int(offset[1]), int(offset[2]))
        terms.append((d, u, scale, float(strength_model), rows))
    return terms


def add_lora(y: torch.Tensor, x: torch.Tensor, terms, delta, channel_dim: int) -> torch.Tensor:
    """``y`` with every term applied in order, as ComfyUI's ``calculate_weight`` merges them:
    ``y_rows = strength_model * y_rows + scale * up(down(x))``."""
    out = y.shape[channel_dim]
    for d, u, scale, strength_model, rows in terms:
        start, length = rows or (0, out)
        if strength_model != 1.0:
            factor = torch.ones(out, dtype=y.dtype, device=y.device)
            factor[start:start + length] = strength_model
            y = y * factor.reshape([-1] + [1] * (y.dim() - 1 - channel_dim % y.dim()))
        r = delta(x, d, u) * scale
        if rows is not None:
            pad = [0, 0] * (y.dim() - 1 - channel_dim % y.dim()) + [start, out - start - length]
            r = F.pad(r, pad)
        y = y + r
    return y


def _linear_delta(x, d, u):
    return F.linear(F.linear(x, d), u)


# ------------------------------------------------------------------------------------------------
# The layers


def _weight_patches(m) -> list:
    """The LoRA patches for this layer's packed weight: what the patcher handed over, or those
    that reach it as ComfyUI's ``LowVramPatch`` (in ``weight_function`` when the classic patcher
    loads in low-VRAM mode; the dynamic patcher's, which it sets as ``weight_lowvram_function``,
    the pack's patcher moves to ``bonsai_lowvram`` so that ComfyUI never merges it)."""
    lowvram = []
    dynamic = m.__dict__.get("bonsai_lowvram")
    if dynamic is not None:
        lowvram += list(dynamic.patches.get(dynamic.key, ()))
    for f in getattr(m, "weight_function", ()):
        if hasattr(f, "patches") and hasattr(f, "key"):
            lowvram += list(f.patches.get(f.key, ()))
        else:
            raise BonsaiRequestError(f"a {type(f).__name__} weight function on a 1-bit Bonsai layer cannot run "
                                     "(it needs the dense weight)")
    # a layer ComfyUI moved to low-VRAM mode carries the patcher's current list there; what an
    # earlier full load handed over may be stale, so it never adds to it
    return lowvram if lowvram else list(getattr(m, "bonsai_patches", ()))


def _bias(m, x):
    if m.bias is None:
        return None
    b = m.bias.to(device=x.device, dtype=x.dtype)
    for f in getattr(m, "bias_function", ()):
        b = f(b)
    return b


def _q1_forward(m, x, op: str):
    import comfy.ops

    every = getattr(comfy.ops, "run_every_op", None)
    if every is not None:
        every()  # ComfyUI's per-layer interrupt check (0.33)
    patches = _weight_patches(m)  # first: it refuses a weight function before anything is staged
    w, staged = m.weight, None
    if kitchen_layout.is_q1(w) and hasattr(m, "_v") and x.device.type != "cpu" and w.device != x.device:
        # dynamic VRAM: ComfyUI stages the packed bytes (its vbar, pinned copies, offload streams) and
        # gives back a kitchen tensor on x's device; asked for the weight's own dtype it dequantizes
        # nothing, and the pack's patcher took the LoRA patches away from it (no merge)
        w, bias, staged = comfy.ops.cast_bias_weight(m, x, dtype=w.dtype, bias_dtype=x.dtype, offloadable=True)
        try:
            return _q1_compute(m, x, op, kitchen_layout.view(w), bias, patches)
        finally:
            comfy.ops.uncast_bias_weight(m, w, bias, staged)
    if w.device != x.device:  # offloaded (low VRAM): the packed bytes move, 1/14 of fp16's
        w = w.to(x.device, non_blocking=True)
    if kitchen_layout.is_q1(w):
        w = kitchen_layout.view(w)
    return _q1_compute(m, x, op, w, _bias(m, x), patches)


def _q1_compute(m, x, op: str, w: Q1Tensor, bias, patches):
    if op == "linear":
        y = kernels.linear(x, w, bias)
        delta, channel_dim = _linear_delta, -1
    else:
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            y = F.conv2d(x, w.dequantize(x.dtype), bias, m.stride, m.padding, m.dilation, m.groups)
        else:
            y = kernels.conv2d(x, w, bias, m.stride, m.padding, m.dilation)

        def delta(x, d, u):
            h = F.conv2d(x, d, None, m.stride, m.padding, m.dilation)
            return F.conv2d(h, u.reshape(*u.shape, 1, 1))

        channel_dim = 1
    if patches:
        cache = m.__dict__.setdefault("_bonsai_lora_cache", {})
        y = add_lora(y, x, lora_terms(patches, tuple(w.shape), x.device, x.dtype, cache), delta, channel_dim)
    return y


def _assign(m, state_dict, prefix, missing_keys, unexpected_keys):
    """Take the file's tensors as they are: a Q1_0 weight stays packed (computing in the layer's
    dtype; as a comfy_kitchen tensor when the ops are the kitchen ones), a dense one is cast to it.
    Nothing is allocated at the layer's dense size."""
    dtype = m.bonsai_dtype
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict:
            t = state_dict[key]
            if is_q1(t) and not kitchen_layout.is_q1(t):
                t = t.to(dtype=dtype or t.dtype)
                if m.KITCHEN:
                    t = kitchen_layout.to_kitchen(t)
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            setattr(m, name, t if kitchen_layout.is_q1(t) else torch.nn.Parameter(t, requires_grad=False))
        elif getattr(m, name) is not None:
            missing_keys.append(key)
    for k in state_dict:
        if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias"):
            unexpected_keys.append(k)


def _skip_meta(m, fn, recurse, apply):
    """Until the file's tensors arrive the layer's are on the meta device; ComfyUI 0.3.64 moves the
    model to its offload device before loading, which meta tensors cannot do: they stay as they are."""
    if m.weight is not None and m.weight.is_meta:
        return m
    return apply(fn, recurse)


_OPS = {}


def bonsai_ops(kitchen: bool = False):
    """``custom_operations`` for ComfyUI: ``manual_cast`` with Linear / Conv2d that keep Q1_0 weights
    packed, as ``Q1Tensor`` or (``kitchen``) as comfy_kitchen tensors of the pack's layout."""
    if kitchen in _OPS:
        return _OPS[kitchen]
    import comfy.ops

    base = comfy.ops.manual_cast

    class Packed:
        """What both layers do with a Q1_0 weight (the base layer, next in the MRO, does the rest):
        built on the meta device, filled by assignment, computed by the kernel contract."""
        KIND = ""
        KITCHEN = kitchen

        def reset_parameters(self):
            return None

        def _apply(self, fn, recurse=True):
            out = _skip_meta(self, fn, recurse, super()._apply)
            if kitchen_layout.is_q1(self.weight):
                self.weight = self.weight  # re-wrapped where needed (__setattr__)
            return out

        def __setattr__(self, name, value):
            if name == "weight" and kitchen_layout.is_q1(value):
                value = kitchen_layout.as_param(value)
            super().__setattr__(name, value)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            _assign(self, state_dict, prefix, missing_keys, unexpected_keys)

        def forward(self, x, *args, **kwargs):
            if is_q1(self.weight):
                return _q1_forward(self, x, self.KIND)
            return super().forward(x, *args, **kwargs)

    class BonsaiOps(base):
        class Linear(Packed, base.Linear):
            KIND = "linear"

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                torch.nn.Linear.__init__(self, in_features, out_features, bias, device="meta", dtype=dtype)
                self.bonsai_dtype = dtype

        class Conv2d(Packed, base.Conv2d):
            KIND = "conv2d"

            def __init__(self, *args, device=None, dtype=None, **kwargs):
                torch.nn.Conv2d.__init__(self, *args, device="meta", dtype=dtype, **kwargs)
                self.bonsai_dtype = dtype

    BonsaiOps.__name__ = "BonsaiKitchenOps" if kitchen else "BonsaiOps"
    _OPS[kitchen] = BonsaiOps
    return BonsaiOps


# ------------------------------------------------------------------------------------------------
# The patcher: hands LoRA patches of packed weights to the layers instead of merging them

_PATCHERS = {}


def _patcher_class(base):
    if base in _PATCHERS:
        return _PATCHERS[base]

    class BonsaiModelPatcher(base):
        def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
            import comfy.utils

            module_name, _, leaf = key.rpartition(".")
            try:
                m = comfy.utils.get_attr(self.model, module_name) if module_name else self.model
            except AttributeError:
                m = None
            if leaf == "weight" and is_q1(getattr(m, "weight", None)):
                m.bonsai_patches = list(self.patches.get(key, ()))  # this patcher's list; [] clears
                m.__dict__.pop("_bonsai_lora_cache", None)
                if kwargs.get("force_cast") and device_to is not None and kitchen_layout.is_q1(m.weight) \
                        and not kwargs.get("return_weight"):
                    # dynamic VRAM loads a small layer whole: ComfyUI moves the kitchen tensor (it stays
                    # packed), shown no patches so that it merges none (the layer adds them beside)
                    saved = self.patches.pop(key, None)
                    try:
                        super().patch_weight_to_device(key, device_to, force_cast=True)
                    finally:
                        if saved is not None:
                            self.patches[key] = saved
                    return None
                return m.weight if kwargs.get("return_weight") else None
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)

        def load(self, *args, **kwargs):
            out = super().load(*args, **kwargs)
            # dynamic VRAM hands a patched weight's LoRA as ``weight_lowvram_function``, which its
            # staging merges into a dequantized copy and requantizes (comfy/ops.py post_cast): a 1-bit
            # weight would lose it. The packed layers keep it as ``bonsai_lowvram`` and add it beside.
            for m in self.model.modules():
                if "weight_lowvram_function" in m.__dict__ and is_q1(getattr(m, "weight", None)):
                    m.bonsai_lowvram = m.__dict__.pop("weight_lowvram_function")
            return out

        def unpatch_model(self, *args, **kwargs):
            for m in self.model.modules():
                if getattr(m, "bonsai_patches", None):
                    m.bonsai_patches = []
                m.__dict__.pop("bonsai_lowvram", None)
                # also a low-VRAM layer's, whose patches came as LowVramPatch (no bonsai_patches to clear):
                # its down/up copies on the device would outlive the LoRA otherwise
                m.__dict__.pop("_bonsai_lora_cache", None)
            return super().unpatch_model(*args, **kwargs)

    BonsaiModelPatcher.__name__ = f"Bonsai{base.__name__}"
    _PATCHERS[base] = BonsaiModelPatcher
    return BonsaiModelPatcher


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes the model holds: packed bytes for Q1_0 weights (what a packed weight's ``nbytes`` says, also
    one made by another import), plain bytes for the rest."""
    return module_nbytes(model)


def load_native_model(sd: dict, source: str, sampling: dict | None = None):
    """A ComfyUI ModelPatcher for a native state dict (``bonsai_core.native``) built by core's own
    detection with ``BonsaiOps``; ``sampling`` (``NativeStateDict.sampling``): a v-prediction or
    zero-terminal-SNR SD model is set up as core's ModelSamplingDiscrete node would. Refuses, naming
    ``source``, a dict core cannot detect or a model that was left with unfilled weights."""
    require()
    import comfy.sd

    kitchen = kitchen_form()
    kwargs = {}
    if not kitchen and "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters:
        # ComfyUI 0.33's dynamic VRAM (comfy_aimdo, on CUDA) sizes and stages plain tensors and
        # comfy_kitchen tensors; a Q1Tensor is neither, so without the kitchen form the model takes
        # the classic ModelPatcher path (whole layers moved, low-VRAM patches).
        kwargs["disable_dynamic"] = True
    opts = {"custom_operations": bonsai_ops(kitchen)}
    # comfy_kitchen tensors made outside inference mode cannot be detached inside it (as ComfyUI's
    # size accounting does while sampling); ComfyUI's nodes run in it, a script may not
    with torch.inference_mode(torch.is_inference_mode_enabled() or kitchen):
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts, **kwargs)
    if patcher is None:
        raise BonsaiError(f"{source}: ComfyUI {comfy_version()} did not recognise this model's architecture "
                          "(FLUX.2 [klein] needs ComfyUI 0.33 or newer; SD1.5/SDXL any recent one)")
    empty = [n for n, p in patcher.model.diffusion_model.named_parameters() if p.is_meta]
    if empty:
        raise BonsaiError(f"{source}: ComfyUI built a model whose weights {empty[:4]} the file does not hold "
                          "(not a complete model for this architecture)")
    _skip_needless_casts(patcher.model)
    patcher.__class__ = _patcher_class(type(patcher))
    patcher.size = model_nbytes(patcher.model)
    if sampling:
        _set_sampling(patcher, sampling, source)
    return patcher


def _set_sampling(patcher, sampling: dict, source: str) -> None:
    """What core's ModelSamplingDiscrete node does for (v_prediction, zsnr): ComfyUI takes an SD1.5/SDXL
    layout as epsilon on SD's schedule, so a model folder saying otherwise sets it here, where a
    workflow would otherwise need that node. (ComfyUI clamps the zero-SNR end of the schedule to
    alpha_bar 4.9e-8, diffusers to 2^-24: first sigmas 4518 and 4096; at either a v-prediction
    model's first denoised estimate is -v plus 2.2e-4 or 2.4e-4 of the unit starting noise.)"""
    import comfy.model_sampling as ms

    base = patcher.get_model_object("model_sampling")
    if not isinstance(base, ms.ModelSamplingDiscrete):
        raise BonsaiError(f"{source}: the model folder asks for {sampling} sampling, which ComfyUI's "
                          f"{type(base).__name__} model sampling of this architecture cannot take")
    kind = {"v_prediction": ms.V_PREDICTION, "epsilon": ms.EPS}[sampling["prediction_type"]]

    class BonsaiModelSampling(ms.ModelSamplingDiscrete, kind):
        pass

    patcher.add_object_patch("model_sampling",
                             BonsaiModelSampling(patcher.model.model_config, zsnr=bool(sampling["zero_snr"])))


def _skip_needless_casts(model) -> int:
    """The 16-bit layers (norms, embedders, the layers the policy keeps dense) are built from
    ``manual_cast``, which sends every call through ComfyUI's ``cast_bias_weight`` (tens of
    microseconds of Python each, on every step). Where a layer's tensors already are in the dtype the
    model computes in, ComfyUI's own loader would have built ``disable_weight_init`` layers, which
    call torch directly: the same is set here, per layer (``comfy_cast_weights``; ComfyUI's patcher
    turns it back on for a layer it offloads in low-VRAM mode, and restores it after). Returns how many
    layers were set."""
    cast_dtype = getattr(model, "manual_cast_dtype", None)
    compute = cast_dtype if cast_dtype is not None else model.get_dtype()
    n = 0
    for m in model.diffusion_model.modules():
        if not getattr(m, "comfy_cast_weights", False) or "comfy_cast_weights" in m.__dict__ \
                or is_q1(getattr(m, "weight", None)):
            continue
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if all(t.dtype == compute and not t.is_meta for t in tensors):
            m.comfy_cast_weights = False
            n += 1
    return n
