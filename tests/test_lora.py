"""The LoRA slot: low-rank side branches beside the packed weight, attached and detached by name."""

import pytest
import torch
from torch import nn

from bonsai_core.errors import BonsaiCheckpointError
from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear, lora_epoch
from tests.test_layers import spec_q1


def test_a_linear_branch_equals_the_dequantized_weight_with_up_down_merged_in():
    torch.manual_seed(0)
    lin = nn.Linear(256, 32)
    q = BonsaiLinear.from_linear(lin)
    bits = q.weight.qs.clone()
    down, up = torch.randn(4, 256) * 0.1, torch.randn(32, 4) * 0.1
    q.add_lora("style", down, up, strength=0.7)
    q.add_lora("other", torch.randn(2, 256), torch.randn(32, 2), strength=0.0)  # strength 0: no effect
    x = torch.randn(3, 256)
    merged = spec_q1(lin.weight.detach()) + 0.7 * up @ down
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, merged, lin.bias.detach()), rtol=1e-5, atol=1e-5)
    assert torch.equal(q.weight.qs, bits) and q.lora_names() == ["style", "other"]
    assert set(q.state_dict()) == {"weight", "bias"}  # branches are not model weights


def test_a_conv_branch_is_a_kernel_conv_down_and_a_1x1_up():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    q = BonsaiConv2d.from_conv(conv)
    down, up = torch.randn(4, 16, 3, 3) * 0.1, torch.randn(8, 4, 1, 1) * 0.1
    q.add_lora("a", down, up, strength=1.5)
    merged = spec_q1(conv.weight.detach()) + 1.5 * (up.view(8, 4) @ down.view(4, -1)).view(8, 16, 3, 3)
    x = torch.randn(2, 16, 9, 9)
    ref = torch.nn.functional.conv2d(x, merged, conv.bias.detach(), 2, 1)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_detaching_restores_the_base_output_exactly_and_every_change_moves_the_epoch():
    torch.manual_seed(2)
    q = BonsaiLinear.from_linear(nn.Linear(128, 16))
    x = torch.randn(2, 128)
    base = q(x)
    e0 = lora_epoch()
    q.add_lora("a", torch.randn(2, 128), torch.randn(16, 2))
    e1 = lora_epoch()
    q.set_lora_strength("a", 0.5)
    e2 = lora_epoch()
    assert e0 < e1 < e2 and not torch.equal(q(x), base)
    assert q.remove_lora("a") and not q.remove_lora("a")
    assert lora_epoch() > e2 and torch.equal(q(x), base)
    with pytest.raises(KeyError, match="no LoRA branch 'a'"):
        q.set_lora_strength("a", 1.0)


def test_branches_follow_the_layer_to_its_dtype():
    q = BonsaiLinear.from_linear(nn.Linear(128, 16))
    q.add_lora("a", torch.randn(2, 128), torch.randn(16, 2))
    q.to(torch.bfloat16)
    assert q.lora[0].down.dtype == torch.bfloat16
    assert q(torch.randn(1, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_branch_that_does_not_fit_is_refused_with_the_shapes():
    q = BonsaiLinear.from_linear(nn.Linear(128, 16))
    with pytest.raises(BonsaiCheckpointError, match=r"LoRA 'bad': down \[2, 64\] / up \[16, 2\] do not fit"):
        q.add_lora("bad", torch.randn(2, 64), torch.randn(16, 2))


def test_cuda_graph_captures_are_dropped_when_a_lora_changes(monkeypatch):
    from bonsai_core.cuda_graph import GraphedStep

    class FakeGraph:
        def replay(self):
            pass

    captures = []

    def capture(self, kwargs):
        captures.append(1)
        return FakeGraph(), {k: v.clone() for k, v in kwargs.items()}, torch.zeros(1)

    monkeypatch.setattr(GraphedStep, "_capture", capture)
    step = GraphedStep(lambda **kw: kw["x"])
    step(x=torch.zeros(2))
    step(x=torch.zeros(2))
    assert len(captures) == 1
    BonsaiLinear.from_linear(nn.Linear(128, 4)).add_lora("a", torch.randn(1, 128), torch.randn(4, 1))
    step(x=torch.zeros(2))
    assert len(captures) == 2
