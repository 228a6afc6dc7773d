"""BonsaiLinear / BonsaiConv2d: nn.Linear / nn.Conv2d subclasses whose weight is one Q1Tensor.

Expected outputs come from the source float weight through the format's definition, written here
group by group (``spec_q1``): sign(w) with w >= 0 -> +, times the mean |w| of the group's real
weights, rounded to fp16 -- never from the project's own dequantize.
"""

import sys

import pytest
import torch
from torch import nn

from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear, quantize_model
from bonsai_core.quant.policy import PrecisionPolicy, default_policy
from bonsai_core.quant.tensor import Q1Tensor


def spec_q1(w: torch.Tensor) -> torch.Tensor:
    """The Q1_0 value of every weight, from the definition: per row, groups of 128 consecutive values."""
    rows = w.reshape(w.shape[0], -1).double()
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for g0 in range(0, rows.shape[1], 128):
            group = rows[r, g0:g0 + 128]
            scale = float(torch.tensor(group.abs().sum().item() / group.numel()).half())
            out[r, g0:g0 + 128] = torch.where(group >= 0, scale, -scale)
    return out.reshape(w.shape).float()


def test_linear_is_an_nn_linear_and_computes_with_the_sign_times_group_scale_weight():
    torch.manual_seed(0)
    lin = nn.Linear(300, 64)  # 300 = two whole groups and a partial one of 44
    q = BonsaiLinear.from_linear(lin)
    assert isinstance(q, nn.Linear) and isinstance(q.weight, Q1Tensor) and q.weight.shape == (64, 300)
    x = torch.randn(5, 7, 300)
    ref = torch.nn.functional.linear(x, spec_q1(lin.weight.detach()), lin.bias.detach())
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_conv_is_an_nn_conv2d_and_computes_with_the_spec_weight_through_partial_groups():
    torch.manual_seed(0)
    conv = nn.Conv2d(20, 16, 3, stride=2, padding=1)  # rows of 180 = one group and a partial one
    q = BonsaiConv2d.from_conv(conv)
    assert isinstance(q, nn.Conv2d) and q.weight.shape == (16, 20, 3, 3)
    x = torch.randn(2, 20, 9, 9)
    ref = torch.nn.functional.conv2d(x, spec_q1(conv.weight.detach()), conv.bias.detach(), 2, 1)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_the_packed_weight_under_the_weight_key_and_nothing_dense():
    q = BonsaiLinear.from_linear(nn.Linear(256, 32))
    sd = q.state_dict()
    assert set(sd) == {"weight", "bias"}
    w = sd["weight"]
    assert isinstance(w, Q1Tensor) and w.qtype == "Q1_0" and tuple(w.shape) == (32, 256)
    assert (w.qs.dtype, tuple(w.qs.shape), w.d.dtype, tuple(w.d.shape)) == (torch.uint8, (32, 32), torch.float16, (32, 2))
    assert w.nbytes == 32 * 2 * 18  # 18 bytes per group of 128, as the file stores it
    held = [t for t in (w.qs, w.d, sd["bias"]) if t.is_floating_point()]
    assert all(t.numel() < 256 * 32 for t in held)


@pytest.mark.parametrize("form", ["tensor", "file blocks"])
def test_load_state_dict_takes_the_weight_back_under_the_same_key(form):
    torch.manual_seed(1)
    src = BonsaiLinear.from_linear(nn.Linear(256, 32))
    sd = src.state_dict()
    if form == "file blocks":
        sd = {"weight": sd["weight"].to_blocks(), "bias": sd["bias"]}  # what a Bonsai file holds
    dst = BonsaiLinear(256, 32, dtype=torch.float32)
    dst.load_state_dict(sd)
    assert torch.equal(dst.weight.qs, src.weight.qs) and torch.equal(dst.weight.d, src.weight.d)
    x = torch.randn(3, 256)
    assert torch.equal(dst(x), src(x))


def test_model_dtype_casts_change_the_compute_dtype_never_the_scales():
    q = BonsaiLinear.from_linear(nn.Linear(256, 32))
    bits, d = q.weight.qs.clone(), q.weight.d.clone()
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.d.dtype == torch.float16
    assert torch.equal(q.weight.d, d) and torch.equal(q.weight.qs, bits)
    assert q.bias.dtype == torch.bfloat16
    assert q(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16
    q.half()
    assert q.weight.dtype == torch.float16 and torch.equal(q.weight.d, d)


def test_device_moves_take_bits_and_scales_along():
    q = BonsaiConv2d.from_conv(nn.Conv2d(16, 8, 3))
    q.to("meta")
    assert q.weight.is_meta and q.weight.qs.is_meta and q.weight.d.is_meta
    assert isinstance(q.weight, Q1Tensor) and isinstance(q.weight, nn.Parameter)


def test_the_packed_weight_refuses_in_place_changes_and_dense_copies():
    q = BonsaiLinear.from_linear(nn.Linear(128, 4))
    with pytest.raises(TypeError, match="in place"):
        q.weight.mul_(2)
    with pytest.raises(TypeError, match="quantize it first"):
        q.weight.copy_(torch.zeros(4, 128))


def test_other_ops_see_the_dequantized_weight():
    torch.manual_seed(2)
    lin = nn.Linear(128, 4)
    w = BonsaiLinear.from_linear(lin).weight
    torch.testing.assert_close(w * 1.0, spec_q1(lin.weight.detach()))
    torch.testing.assert_close(torch.nn.functional.linear(torch.ones(1, 128), w),
                               spec_q1(lin.weight.detach()).sum(1, keepdim=True).t())


def test_quantize_model_replaces_in_place_reports_bytes_and_frees_float_weights():
    model = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512), nn.Linear(512, 64), nn.Linear(64, 8))
    original = model[0].weight
    report = quantize_model(model, PrecisionPolicy(keep=()))
    assert isinstance(model[0], BonsaiLinear) and isinstance(model[2], BonsaiLinear)
    assert type(model[3]) is nn.Linear  # 64 inputs: smaller than one group
    assert report.bytes_after < report.bytes_before / 10
    assert {layer.name: layer.quantized for layer in report.layers} == {"0": True, "2": True, "3": False}
    assert "less than one group" in report.decisions["3"]
    assert "ratio" in report.table()
    assert sys.getrefcount(original) <= 2  # only our local name: no module keeps the float weight
    again = quantize_model(model, PrecisionPolicy(keep=()))  # already quantized layers are left alone
    assert [layer.name for layer in again.layers] == ["3"]


def test_default_sd_policy_keeps_cross_attention_norms_embeddings_and_io_convs():
    from diffusers import UNet2DConditionModel

    from tests.sd_fixtures import TINY_UNET_CONFIG

    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    decisions = {d.name: d for d in default_policy("sd_unet").plan(unet)}
    assert not decisions["conv_in"].quantize and not decisions["conv_out"].quantize
    assert not decisions["time_embedding.linear_1"].quantize
    attn2 = [n for n in decisions if ".attn2." in n]
    attn1 = [n for n in decisions if ".attn1." in n and decisions[n].quantize]
    assert attn2 and all(not decisions[n].quantize for n in attn2)
    assert attn1
    assert decisions["down_blocks.0.resnets.0.conv1"].quantize


def test_policy_patterns_can_be_changed():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    report = quantize_model(model, PrecisionPolicy(name="mine", keep=("1",)))
    assert isinstance(model[0], BonsaiLinear) and type(model[1]) is nn.Linear
    assert report.decisions["1"] == "kept: matches policy pattern '1'"


def test_policy_round_trips_through_dict():
    p = default_policy("flux2_klein")
    assert PrecisionPolicy.from_dict(p.to_dict()) == p
    q4 = PrecisionPolicy(name="te", qtype="Q4_AFFINE", quantize_types=(nn.Linear,))
    assert PrecisionPolicy.from_dict(q4.to_dict()) == q4
    with pytest.raises(ValueError, match="qtype 'Q9_9'"):
        PrecisionPolicy.from_dict({**p.to_dict(), "qtype": "Q9_9"})
    with pytest.raises(ValueError, match="Embedding"):
        PrecisionPolicy.from_dict({**p.to_dict(), "quantize_types": ["Linear", "Embedding"]})


def test_under_inference_mode_a_packed_weight_moves_casts_and_loads_and_stays_packed():
    """ComfyUI runs every node under torch.inference_mode: the weights must survive it."""
    w = Q1Tensor.from_float(torch.randn(8, 256))  # made outside, as a file read before the node runs
    with torch.inference_mode():
        moved = [w.to(torch.float32), w.to(device="cpu", dtype=torch.bfloat16), w.half(), w.float(), w.detach()]
        assert all(isinstance(t, Q1Tensor) and t.d.dtype == torch.float16 for t in moved)
        layer = BonsaiLinear(256, 8, device="meta", dtype=torch.float32)
        layer.load_state_dict({"weight": w.to(dtype=torch.float32), "bias": torch.zeros(8)}, assign=True)
        layer.to(torch.float16)
        assert isinstance(layer.weight, Q1Tensor) and layer.weight.dtype == torch.float16
        assert layer(torch.randn(2, 256, dtype=torch.float16)).shape == (2, 8)
