"""Device routing: auto order, explicit choices, no silent fallback."""

import pytest
import torch

from bonsai_core import device
from bonsai_core.errors import BonsaiDeviceError


def test_auto_picks_cpu_with_fp32_when_there_is_no_accelerator(monkeypatch):
    monkeypatch.delenv("BONSAI_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: False)
    choice = device.pick()
    assert choice.device.type == "cpu" and choice.dtype == torch.float32
    assert "no CUDA or MPS" in choice.reason


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.delenv("BONSAI_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: True)
    assert device.resolve_device("auto")[0].type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    dev, why = device.resolve_device("auto")
    assert dev.type == "cuda" and "Fake GPU" in why


def test_env_variable_overrides_auto_and_argument_overrides_env(monkeypatch):
    monkeypatch.setenv("BONSAI_DEVICE", "cpu")
    dev, why = device.resolve_device(None)
    assert dev.type == "cpu" and "BONSAI_DEVICE" in why
    monkeypatch.setenv("BONSAI_DEVICE", "cuda:7")
    assert device.resolve_device("cpu")[0].type == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_missing_device_is_an_error_never_a_fallback(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: False)
    with pytest.raises(BonsaiDeviceError, match=f"'{name}' was asked for"):
        device.pick(name)


def test_cuda_index_beyond_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BonsaiDeviceError, match=r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        device.resolve_device("cuda:2")


def test_unknown_device_and_dtype_are_refused_with_the_choices():
    with pytest.raises(BonsaiDeviceError, match="unknown device 'tpu'.*auto, cuda"):
        device.pick("tpu")
    with pytest.raises(BonsaiDeviceError, match="unknown dtype 'int4'"):
        device.pick("cpu", "int4")


def test_dtype_follows_device_unless_asked(monkeypatch):
    assert device.pick("cpu", "bf16").dtype == torch.bfloat16
    assert device.pick("cpu", "fp16").dtype == torch.float16
    monkeypatch.setattr(device, "_mps_available", lambda: True)
    choice = device.pick("mps")
    assert choice.dtype == torch.float16
    with pytest.raises(BonsaiDeviceError, match="bf16 was asked for on mps"):
        device.pick("mps", "bf16")
