"""QAT hooks: the fake quantizer equals packing + dequantizing bit for bit; training converts exactly."""

import pytest
import torch
from torch import nn

from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear
from bonsai_core.quant.policy import PrecisionPolicy
from bonsai_core.quant.qat import convert_qat, fake_quantize, prepare_qat
from bonsai_core.quant.tensor import Q1Tensor
from tests.test_layers import spec_q1


@pytest.mark.parametrize("shape", [(4, 128), (3, 300), (8, 20, 3, 3), (2, 1, 1, 130)])
def test_fake_quantize_equals_packing_then_dequantizing_bit_for_bit(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    w.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 70000.0 / 65504])  # zeros go to +d
    fq = fake_quantize(w)
    packed = Q1Tensor.from_float(w).dequantize(torch.float32)
    assert torch.equal(fq.view(torch.int32), packed.view(torch.int32))  # the same bits, -0.0 included
    assert torch.equal(fq, spec_q1(w))  # and the format's definition, written independently
    assert (fq.view(-1)[:2] > 0).all()


def test_fake_quantize_passes_the_gradient_straight_through():
    w = torch.randn(4, 256, requires_grad=True)
    g = torch.randn(4, 256)
    fake_quantize(w).backward(g)
    assert torch.equal(w.grad, g)


def test_prepared_layers_stay_plain_layers_and_see_the_1bit_weight():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(64, 8))
    names = prepare_qat(model, PrecisionPolicy(keep=()))
    assert names == ["0"]  # 64 inputs is less than a group: not quantized, not fake-quantized
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], BonsaiLinear)
    assert torch.equal(model[0].weight, spec_q1(model[0].parametrizations.weight.original.detach()))


def test_training_a_few_steps_then_converting_gives_exactly_the_weights_it_trained_with():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
                          nn.LayerNorm(10))
    prepare_qat(model, PrecisionPolicy(keep=()))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(6, 16, 4, 4), torch.randn(6, 10)  # conv rows of 144: a partial group
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it trains through the straight-through estimator
    with torch.no_grad():
        trained = {n: model.get_submodule(n).weight.clone() for n in ("0", "3")}
        want = model(x)
    report = convert_qat(model)
    assert isinstance(model[0], BonsaiConv2d) and isinstance(model[3], BonsaiLinear)
    assert sorted(layer.name for layer in report.layers if layer.quantized) == ["0", "3"]
    for n, w in trained.items():
        assert torch.equal(model.get_submodule(n).weight.dequantize(torch.float32), w)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
