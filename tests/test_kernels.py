"""The kernel contract: one choice per process from BONSAI_KERNEL, forcing, refusal, both layers."""

import logging

import pytest
import torch
from torch import nn

from bonsai_core.errors import BonsaiDeviceError
from bonsai_core.quant import kernels
from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear


class FakeKernel:
    """Takes float64 inputs only; counts calls; answers with the reference's numbers plus one."""

    def __init__(self, name="fake", convs=True):
        self.name = name
        self.calls = []
        if not convs:
            self.conv2d = None

    def supports(self, x, w):
        return x.dtype == torch.float64

    def linear(self, x, w, bias):
        self.calls.append("linear")
        return kernels.REFERENCE.linear(x, w, bias) + 1

    def conv2d(self, x, w, bias, stride, padding, dilation):
        self.calls.append("conv2d")
        return kernels.REFERENCE.conv2d(x, w, bias, stride, padding, dilation) + 1


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.delenv("BONSAI_KERNEL", raising=False)
    kernel = FakeKernel()
    kernels.register(kernel)
    kernels.reload()
    yield kernel
    kernels.unregister(kernel.name)
    monkeypatch.delenv("BONSAI_KERNEL", raising=False)
    kernels.reload()


def _layers():
    torch.manual_seed(0)
    return BonsaiLinear.from_linear(nn.Linear(256, 8)), BonsaiConv2d.from_conv(nn.Conv2d(16, 4, 3))


def test_auto_picks_a_registered_kernel_only_where_it_supports_the_inputs(fake):
    lin, conv = _layers()
    x = torch.randn(2, 256)
    assert kernels.active(x, lin.weight) == "cpu-cache"  # registered before the fake: after it in auto
    assert kernels.active(x.double(), lin.weight) == "fake"
    lin.double()
    conv.double()
    ref = kernels.REFERENCE.linear(x.double(), lin.weight, lin.bias)
    assert torch.equal(lin(x.double()), ref + 1)
    conv(torch.randn(1, 16, 5, 5, dtype=torch.float64))
    assert fake.calls == ["linear", "conv2d"]  # the conv goes through the contract too


def test_a_kernel_without_convs_leaves_them_to_the_reference(monkeypatch):
    kernel = FakeKernel("linear-only", convs=False)
    kernels.register(kernel)
    try:
        lin, conv = _layers()
        conv.double()
        x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
        with kernels.forced("linear-only"):
            assert kernels.active(x, conv.weight, "conv2d") == "reference"
        assert kernels.active(torch.randn(1, 256, dtype=torch.float64), lin.weight) == "linear-only"
    finally:
        kernels.unregister(kernel.name)


def test_forcing_a_kernel_uses_it_and_refuses_inputs_it_cannot_take(fake):
    lin, _ = _layers()
    with kernels.forced("reference"):
        assert kernels.active(torch.randn(1, 256, dtype=torch.float64), lin.weight) == "reference"
    with kernels.forced("fake"):
        assert kernels.active(torch.randn(1, 256, dtype=torch.float64), lin.weight) == "fake"
        with pytest.raises(BonsaiDeviceError, match="does not take cpu torch.float32"):
            lin(torch.randn(1, 256))
    assert kernels.active(torch.randn(1, 256, dtype=torch.float64), lin.weight) == "fake"  # auto again


def test_the_environment_chooses_once_per_process(fake, monkeypatch):
    lin, _ = _layers()
    x = torch.randn(1, 256, dtype=torch.float64)
    monkeypatch.setenv("BONSAI_KERNEL", "reference")
    kernels.reload()
    assert kernels.active(x, lin.weight) == "reference"
    monkeypatch.setenv("BONSAI_KERNEL", "fake")
    assert kernels.active(x, lin.weight) == "reference"  # the choice was made; the env is read once
    assert kernels.reload() == "fake" and kernels.active(x, lin.weight) == "fake"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_an_unknown_kernel_name_is_refused_on_every_device(fake, monkeypatch, device):
    lin, _ = _layers()
    lin.to(device)
    monkeypatch.setenv("BONSAI_KERNEL", "foo")
    with pytest.raises(BonsaiDeviceError, match="'foo' is not a kernel; use one of auto, reference"):
        kernels.reload()
    with pytest.raises(BonsaiDeviceError, match="BONSAI_KERNEL='foo'"):
        lin(torch.randn(1, 256, device=device))
    with pytest.raises(BonsaiDeviceError, match="'bar' is not a kernel"):
        with kernels.forced("bar"):
            pass


def test_a_cuda_kernel_named_on_a_cpu_runs_the_auto_choice_and_says_so(fake, monkeypatch, caplog):
    """A kernel that cannot take the inputs hands them to what auto would choose (not the slower
    reference), and says so once."""
    lin, _ = _layers()
    x = torch.randn(1, 256)
    auto = kernels.active(x, lin.weight)
    monkeypatch.setenv("BONSAI_KERNEL", "fused")
    kernels.reload()
    with caplog.at_level(logging.WARNING, logger="bonsai_core.quant.kernels"):
        assert kernels.active(x, lin.weight) == auto
        lin(x)
    said = [r.getMessage() for r in caplog.records if "BONSAI_KERNEL=fused" in r.getMessage()]
    assert len(said) == 1 and f"those run on the auto choice ({auto})" in said[0]  # said once, with the choice


def test_functional_linear_and_conv_with_a_packed_weight_go_through_the_contract(fake):
    lin, conv = _layers()
    lin.double()
    conv.double()
    torch.nn.functional.linear(torch.randn(1, 256, dtype=torch.float64), lin.weight, lin.bias)
    torch.nn.functional.conv2d(torch.randn(1, 16, 5, 5, dtype=torch.float64), conv.weight, conv.bias)
    assert fake.calls == ["linear", "conv2d"]


def _cache_kernel(budget):
    from bonsai_core.quant.cpu_cache import CpuCacheKernel

    return CpuCacheKernel(budget_bytes=budget)


def test_the_cpu_cache_computes_exactly_what_the_reference_does_and_keeps_one_copy():
    lin, conv = _layers()
    cache = _cache_kernel(2**20)
    x, xi = torch.randn(3, 256), torch.randn(1, 16, 5, 5)
    assert torch.equal(cache.linear(x, lin.weight, lin.bias), kernels.REFERENCE.linear(x, lin.weight, lin.bias))
    assert torch.equal(cache.conv2d(xi, conv.weight, conv.bias, 1, 0, 1),
                       kernels.REFERENCE.conv2d(xi, conv.weight, conv.bias, 1, 0, 1))
    cache.linear(x, lin.weight, lin.bias)
    assert cache.used_bytes == (8 * 256 + 4 * 16 * 9) * 4  # one fp32 copy per weight, however many calls


def test_the_cpu_cache_keeps_to_its_budget_and_leaves_the_rest_to_the_reference():
    lin, conv = _layers()
    cache = _cache_kernel(8 * 256 * 4)  # room for the linear's fp32 weight only
    assert cache.supports(torch.randn(1, 256), lin.weight)
    assert not cache.supports(torch.randn(1, 16, 5, 5), conv.weight)
    assert cache.used_bytes == 8 * 256 * 4


def test_the_cpu_cache_forgets_a_weight_written_in_place_or_freed():
    torch.manual_seed(3)
    lin = BonsaiLinear.from_linear(nn.Linear(256, 8))
    other = BonsaiLinear.from_linear(nn.Linear(256, 8))
    cache = _cache_kernel(2**20)
    x = torch.randn(2, 256)
    cache.linear(x, lin.weight, None)
    lin.load_state_dict(other.state_dict())  # copy_ into the packed weight
    assert torch.equal(cache.linear(x, lin.weight, None), kernels.REFERENCE.linear(x, other.weight, None))
    del lin
    import gc

    gc.collect()
    assert cache.used_bytes == 0


def test_a_zero_cpu_cache_budget_turns_it_off(monkeypatch):
    from bonsai_core.quant.cpu_cache import CpuCacheKernel

    lin, _ = _layers()
    monkeypatch.setenv("BONSAI_CPU_CACHE_MB", "0")
    assert not CpuCacheKernel().supports(torch.randn(1, 256), lin.weight)
    monkeypatch.setenv("BONSAI_CPU_CACHE_MB", "lots")
    with pytest.raises(BonsaiDeviceError, match="BONSAI_CPU_CACHE_MB='lots' is not a number"):
        CpuCacheKernel().supports(torch.randn(1, 256), lin.weight)


def test_bonsai_act_is_read_once_checked_and_leaves_cpu_products_exact(monkeypatch):
    lin, _ = _layers()
    x = torch.randn(3, 256)
    exact = kernels.REFERENCE.linear(x, lin.weight, lin.bias)
    try:
        for value, want in (("fp8", "fp8"), ("INT8", "int8"), ("bf16", "16"), ("", "16")):
            monkeypatch.setenv("BONSAI_ACT", value)
            kernels.reload()
            assert kernels.act() == want
            assert torch.equal(lin(x), exact)  # on a CPU the activations are never quantized
        monkeypatch.setenv("BONSAI_ACT", "int4")
        with pytest.raises(BonsaiDeviceError, match="BONSAI_ACT='int4' is not an activation precision; use one of 16, fp8, int8"):
            kernels.reload()
    finally:
        monkeypatch.delenv("BONSAI_ACT", raising=False)
        kernels.reload()
