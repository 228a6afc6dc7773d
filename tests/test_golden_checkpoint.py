"""A Bonsai file written before the Q1_0 weight became one tensor still loads, bit for bit.

``tests/data/golden_v1_unet`` was written by commit 18ee1f4 (see tests/data/README.md). The Q1_0
tensors are decoded here straight from the file's bytes, by the block layout of the format
(fp16 little-endian scale, then 16 bytes of sign bits, LSB first, bit 1 = +d), with numpy.
"""

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bonsai_core import checkpoint
from bonsai_core.loader import build_skeleton, load_into
from bonsai_core.quant.layers import QUANTIZED_TYPES
from bonsai_core.quant.tensor import Q1Tensor

GOLDEN = Path(__file__).parent / "data" / "golden_v1_unet"
FILE = GOLDEN / checkpoint.WEIGHTS_NAME


def _decode_blocks(raw: np.ndarray, shape) -> np.ndarray:
    rows, cols = shape[0], int(np.prod(shape[1:]))
    out = np.empty((rows, cols), dtype=np.float32)
    for r in range(rows):
        for g in range(raw.shape[1] // 18):
            block = raw[r, g * 18:(g + 1) * 18].tobytes()
            d = struct.unpack("<e", block[:2])[0]
            bits = np.unpackbits(np.frombuffer(block[2:], dtype=np.uint8), bitorder="little")
            n = min(128, cols - g * 128)
            out[r, g * 128:g * 128 + n] = np.where(bits[:n] == 1, d, -d)
    return out.reshape(shape)


def _load(dtype=torch.float32):
    return load_into(build_skeleton(GOLDEN, "diffusers", "UNet2DConditionModel"), checkpoint.read_tensors(FILE),
                     dtype=dtype)


def test_an_old_file_loads_into_q1_layers_whose_weights_are_the_files_bits():
    with safe_open(str(FILE), framework="pt") as f:
        header = json.loads(f.metadata()["tensors"])
        raw = {k: f.get_tensor(k) for k in f.keys()}
    model = _load()
    q1 = {n for n, info in header.items() if info["type"] == "Q1_0"}
    assert len(q1) == 20
    modules = dict(model.named_modules())
    for name in q1:
        layer = modules[name.rpartition(".")[0]]
        assert isinstance(layer, QUANTIZED_TYPES) and isinstance(layer.weight, Q1Tensor)
        want = _decode_blocks(raw[name].numpy(), header[name]["shape"])
        assert np.array_equal(layer.weight.dequantize(torch.float32).numpy(), want), name


def test_an_old_file_computes_what_the_old_code_computed():
    expected = load_file(str(GOLDEN / "expected_output.safetensors"))
    with torch.no_grad():
        y = _load()(expected["sample"], expected["timestep"], encoder_hidden_states=expected["encoder_hidden_states"]).sample
    torch.testing.assert_close(y, expected["output"], rtol=0, atol=1e-5)


def test_saving_the_loaded_model_writes_the_same_tensors_and_header_entries(tmp_path):
    model = _load(dtype=torch.float16)
    tensors, reasons = checkpoint.model_tensors(model)
    out = tmp_path / checkpoint.WEIGHTS_NAME
    checkpoint.save_tensors(out, tensors, family="sd_unet", component="unet", reasons=reasons)
    old, new = load_file(str(FILE)), load_file(str(out))
    assert old.keys() == new.keys()
    for k in old:
        assert old[k].dtype == new[k].dtype and torch.equal(old[k].view(torch.uint8), new[k].view(torch.uint8)), k
    strip = lambda h: {k: {"type": v["type"], "shape": v["shape"]} for k, v in h.items()}  # noqa: E731
    assert strip(checkpoint.read_header(out)["tensors"]) == strip(checkpoint.read_header(FILE)["tensors"])
