"""Quantization-aware training hooks for Q1_0: train in float, see the 1-bit weight, convert exactly.

``fake_quantize(w)`` returns, in ``w``'s dtype, exactly the weight that packing ``w`` into Q1_0 and
dequantizing it gives -- bit for bit: the same ``w >= 0 -> +d`` rule, the same per-group mean of
|w| over the real weights of a partial last group, computed in float32 and rounded to the fp16
scale the file stores. Its backward is the straight-through estimator: the gradient passes to the
float weight unchanged.

``prepare_qat(model, policy)`` walks the model with the same policy as ``quantize_model`` and puts a
fake-quantizing parametrization on every weight that the policy would quantize (the layers stay
plain ``nn.Linear`` / ``nn.Conv2d``, so optimizers and state dicts see the float weights);
``convert_qat(model)`` removes the parametrizations and packs those weights with ``quantize_model``,
so the inference layers then hold exactly the weights the training forward used.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .policy import PrecisionPolicy
from .q1_0 import group_scales


def _fake_quantize_values(w: torch.Tensor) -> torch.Tensor:
    rows = w.shape[0]
    w2 = w.detach().reshape(rows, -1)
    cols = w2.shape[1]
    d = group_scales(w2).to(w.dtype)                                   # [rows, n_blocks], fp16 values
    scale = d.repeat_interleave(128, dim=1)[:, :cols]
    return torch.where(w2 >= 0, scale, -scale).reshape(w.shape)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return _fake_quantize_values(w)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """The Q1_0 weight of ``w`` (same shape and dtype), with a straight-through gradient."""
    return _SignSTE.apply(w)


class FakeQuantizeQ1(nn.Module):
    """A parametrization: the module's ``weight`` reads as ``fake_quantize(original)``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w)


QAT_POLICY_ATTR = "_bonsai_qat_policy"


def prepare_qat(model: nn.Module, policy: PrecisionPolicy | None = None) -> list[str]:
    """Fake-quantize every weight ``policy`` would quantize; returns their module names."""
    policy = policy or PrecisionPolicy()
    names = []
    for dec in policy.plan(model):
        if not dec.quantize:
            continue
        module = model.get_submodule(dec.name)
        if parametrize.is_parametrized(module, "weight"):
            continue
        parametrize.register_parametrization(module, "weight", FakeQuantizeQ1())
        names.append(dec.name)
    setattr(model, QAT_POLICY_ATTR, policy)
    return names


def convert_qat(model: nn.Module):
    """Drop the fake quantizers and pack the trained float weights into Q1_0 layers, in place.
    Returns ``quantize_model``'s report."""
    from .layers import quantize_model

    policy = getattr(model, QAT_POLICY_ATTR, None)
    if policy is None:
        raise ValueError("convert_qat needs a model prepared with prepare_qat")
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    delattr(model, QAT_POLICY_ATTR)
    return quantize_model(model, policy)
