"""Bonsai checkpoints: bit-exact round trips and clear refusals of bad files."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from bonsai_core import checkpoint, loader
from bonsai_core.errors import BonsaiCheckpointError
from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear, quantize_model
from bonsai_core.quant.tensor import Q1Tensor


def _tensors():
    torch.manual_seed(0)
    return {
        "a.weight": Q1Tensor.from_float(torch.randn(8, 300)),
        "b.weight": Q1Tensor.from_float(torch.randn(4, 3, 3, 3)),
        "a.bias": torch.randn(8).half(),
        "norm.weight": torch.randn(300).bfloat16(),
    }


def _write(path, tensors=None, **kw):
    checkpoint.save_tensors(path, tensors or _tensors(), family="sd_unet", component="unet",
                            policy={"name": "test"}, **kw)
    return path


def _rewrite_header(path, change):
    """Edit a safetensors header in place (a test's way to make a mislabelled file)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_save_then_read_reproduces_every_tensor_bit_for_bit(tmp_path):
    src = _tensors()
    cf = checkpoint.read_tensors(_write(tmp_path / "m.safetensors", src))
    assert set(cf.tensors) == set(src)
    for name, t in src.items():
        got = cf.tensors[name]
        if isinstance(t, Q1Tensor):
            assert got.shape == t.shape and torch.equal(got.qs, t.qs) and torch.equal(got.d, t.d)
        else:
            assert got.dtype == t.dtype and torch.equal(got, t)
    assert cf.meta["tensors"]["a.weight"] == {"type": "Q1_0", "shape": [8, 300]}
    assert cf.policy == {"name": "test"} and cf.family == "sd_unet"


def test_model_save_load_round_trip_gives_same_outputs(tmp_path):
    from diffusers import UNet2DConditionModel

    from bonsai_core.loader import build_skeleton
    from bonsai_core.quant.policy import default_policy
    from tests.sd_fixtures import TINY_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    quantize_model(unet, default_policy("sd_unet"))
    tensors, reasons = checkpoint.model_tensors(unet)
    _write(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", tensors, reasons=reasons)
    unet.save_config(tmp_path / "unet")
    skel = build_skeleton(tmp_path / "unet", "diffusers", "UNet2DConditionModel")
    loaded = loader.load_into(skel, checkpoint.read_tensors(tmp_path / "unet" / checkpoint.WEIGHTS_NAME))
    a, b = unet.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(loaded.down_blocks[0].resnets[0].conv1, BonsaiConv2d)
    assert isinstance(loaded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, BonsaiLinear)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 128)
    assert torch.equal(unet(x, t, ctx).sample, loaded(x, t, ctx).sample)


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = _write(tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BonsaiCheckpointError, match=r"m\.safetensors.*truncated"):
        checkpoint.read_tensors(path)


def test_file_that_is_not_bonsai_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match="not a Bonsai file"):
        checkpoint.read_tensors(tmp_path / "plain.safetensors")


def test_newer_format_version_is_refused(tmp_path):
    path = _write(tmp_path / "m.safetensors")
    _rewrite_header(path, lambda h: h["__metadata__"].update(format_version="2"))
    with pytest.raises(BonsaiCheckpointError, match="format version 2 is newer.*upgrade"):
        checkpoint.read_tensors(path)


def test_mislabelled_tensor_type_is_refused_naming_the_tensor(tmp_path):
    path = _write(tmp_path / "m.safetensors")

    def relabel(h):
        idx = json.loads(h["__metadata__"]["tensors"])
        idx["a.bias"]["type"] = "F32"
        h["__metadata__"]["tensors"] = json.dumps(idx)
    _rewrite_header(path, relabel)
    with pytest.raises(BonsaiCheckpointError, match=r"'a\.bias' is labelled F32"):
        checkpoint.read_tensors(path)


def test_q1_tensor_with_wrong_shape_is_refused(tmp_path):
    path = _write(tmp_path / "m.safetensors")

    def reshape(h):
        idx = json.loads(h["__metadata__"]["tensors"])
        idx["a.weight"]["shape"] = [8, 600]
        h["__metadata__"]["tensors"] = json.dumps(idx)
    _rewrite_header(path, reshape)
    with pytest.raises(BonsaiCheckpointError, match=r"'a\.weight' is labelled Q1_0 of shape \[8, 600\].*uint8 \[8, 90\]"):
        checkpoint.read_tensors(path)


def test_nan_scale_is_refused(tmp_path):
    t = _tensors()
    t["a.weight"].d[3, 1] = float("nan")
    path = _write(tmp_path / "m.safetensors", t)
    with pytest.raises(BonsaiCheckpointError, match=r"'a\.weight' has a NaN/inf scale at row 3, group 1"):
        checkpoint.read_tensors(path)


def test_tensor_missing_from_header_is_refused(tmp_path):
    path = _write(tmp_path / "m.safetensors")

    def drop(h):
        idx = json.loads(h["__metadata__"]["tensors"])
        del idx["norm.weight"]
        h["__metadata__"]["tensors"] = json.dumps(idx)
    _rewrite_header(path, drop)
    with pytest.raises(BonsaiCheckpointError, match="header and data disagree"):
        checkpoint.read_tensors(path)


def test_file_for_another_model_is_refused_on_load(tmp_path):
    from diffusers import UNet2DConditionModel

    from bonsai_core.loader import build_skeleton
    from tests.sd_fixtures import TINY_UNET_CONFIG

    UNet2DConditionModel(**TINY_UNET_CONFIG).save_config(tmp_path)
    cf = checkpoint.read_tensors(_write(tmp_path / "m.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match="no Linear/Conv2d named 'a'"):
        loader.load_into(build_skeleton(tmp_path, "diffusers", "UNet2DConditionModel"), cf)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        _write(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
