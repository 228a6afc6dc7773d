"""BonsaiLinear / BonsaiConv2d compute with the dequantized weight and keep nothing else."""

import torch
from torch import nn

from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear, quantize_model
from bonsai_core.quant.policy import PrecisionPolicy, default_policy


def test_linear_output_equals_dense_reference():
    torch.manual_seed(0)
    lin = nn.Linear(300, 64)
    q = BonsaiLinear.from_linear(lin)
    x = torch.randn(5, 7, 300)
    ref = torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-6, atol=1e-6)


def test_conv_output_equals_dense_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(20, 16, 3, stride=2, padding=1)
    q = BonsaiConv2d.from_conv(conv)
    x = torch.randn(2, 20, 9, 9)
    ref = torch.nn.functional.conv2d(x, q.dequantized_weight(), conv.bias, 2, 1)
    torch.testing.assert_close(q(x), ref, rtol=1e-6, atol=1e-6)


def test_quantized_layer_holds_only_bits_scales_and_bias():
    q = BonsaiLinear.from_linear(nn.Linear(256, 32))
    names = {n: (t.dtype, tuple(t.shape)) for n, t in q.state_dict().items()}
    assert names == {"qs": (torch.uint8, (32, 32)), "d": (torch.float16, (32, 2)), "bias": (torch.float32, (32,))}
    assert not any(t.dtype.is_floating_point and t.numel() >= 256 * 32 for t in q.state_dict().values())


def test_model_dtype_casts_never_touch_the_scales():
    q = BonsaiLinear.from_linear(nn.Linear(256, 32))
    d = q.d.clone()
    q.to(torch.bfloat16)
    assert q.d.dtype == torch.float16 and torch.equal(q.d, d)
    assert q.bias.dtype == torch.bfloat16
    assert q(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_quantize_model_replaces_in_place_reports_bytes_and_frees_float_weights():
    model = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512), nn.Linear(512, 64), nn.Linear(64, 8))
    original = model[0].weight
    report = quantize_model(model, PrecisionPolicy(keep=()))
    assert isinstance(model[0], BonsaiLinear) and isinstance(model[2], BonsaiLinear)
    assert isinstance(model[3], nn.Linear)  # 64 inputs: smaller than one group
    assert report.bytes_after < report.bytes_before / 10
    assert {layer.name: layer.quantized for layer in report.layers} == {"0": True, "2": True, "3": False}
    assert "less than one group" in report.decisions["3"]
    assert "ratio" in report.table()
    import sys
    assert sys.getrefcount(original) <= 2  # only our local name: no module keeps the float weight


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
    assert isinstance(model[0], BonsaiLinear) and isinstance(model[1], nn.Linear)
    assert report.decisions["1"] == "kept: matches policy pattern '1'"


def test_policy_round_trips_through_dict():
    p = default_policy("flux2_klein")
    assert PrecisionPolicy.from_dict(p.to_dict()) == p
