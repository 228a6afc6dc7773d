"""Q4_AFFINE, the 4-bit weight type of text encoders: its block by hand, the weight object, the file
format and its checks, GGUF Q4_1 export, and the bit-exact import of the public MLX and HQQ payloads
(tiny payloads written by the independent hand quantizers of tests/te_fixtures.py, whose float64
values come from each payload's own spec)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F

from bonsai_core import checkpoint
from bonsai_core.errors import BonsaiCheckpointError
from bonsai_core.importers.text_encoder import import_text_encoder
from bonsai_core.quant import q4_affine
from bonsai_core.quant.layers import BonsaiLinear
from bonsai_core.quant.tensor import Q4Tensor
from tests.te_fixtures import (
    TINY_TE_CONFIG, build_reference_model, hidden_states, linear_names, make_reference, write_hqq_te, write_mlx_te,
)


@pytest.fixture(scope="module")
def ref():
    return make_reference(TINY_TE_CONFIG, seed=0)


# ---------------------------------------------------------------------------------------------
# the block, by hand
# ---------------------------------------------------------------------------------------------
def test_worked_example_codes_scale_bias():
    # one row, one group of 4: codes 1, 2, 15, 0 -> bytes 0x21, 0x0F; scale 0.5, bias -1
    qs = torch.tensor([[0x21, 0x0F]], dtype=torch.uint8)
    scale = torch.tensor([[0.5]], dtype=torch.float16)
    bias = torch.tensor([[-1.0]], dtype=torch.float16)
    assert q4_affine.dequantize(qs, scale, bias).tolist() == [[-0.5, 0.0, 6.5, -1.0]]
    # the file's block: scale (fp16 LE 0x3800) | bias (fp16 LE 0xBC00) | codes
    assert q4_affine.to_blocks(qs, scale, bias).tolist() == [[0x00, 0x38, 0x00, 0xBC, 0x21, 0x0F]]
    back = q4_affine.from_blocks(q4_affine.to_blocks(qs, scale, bias), 4, 4, torch.float16, torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(back, (qs, scale, bias)))


def test_reference_quantizer_by_hand():
    w = torch.tensor([[0.0, 1.5, 3.0, 0.2]])  # min 0, max 3 -> scale 0.2, bias 0
    qs, scale, bias = q4_affine.quantize(w, group=4)
    assert float(bias) == 0.0 and float(scale) == float(torch.tensor(0.2, dtype=torch.float16))
    s = float(scale)
    assert q4_affine.unpack_codes(qs).tolist() == [[0, round(1.5 / s), 15, round(0.2 / s)]]


def test_quantize_error_is_within_half_a_step():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    t = Q4Tensor.from_float(w, torch.float32)
    step = t.scale.float().repeat_interleave(64, dim=1)
    assert ((t.dequantize() - w).abs() <= step / 2 + 1e-3 * step).all()


# ---------------------------------------------------------------------------------------------
# the weight object
# ---------------------------------------------------------------------------------------------
def test_q4tensor_behaves_as_its_weight():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    t = Q4Tensor.from_float(w, torch.float32)
    assert t.shape == (8, 128) and t.dtype == torch.float32 and t.qtype == "Q4_AFFINE" and t.group_size == 64
    assert t.nbytes == 8 * 64 + 2 * 8 * 2 * 2
    with torch.inference_mode():
        b = t.to(torch.bfloat16)
        assert isinstance(b, Q4Tensor) and b.dtype == torch.bfloat16 and b.scale.dtype == torch.float16
        assert isinstance(t.detach(), Q4Tensor) and isinstance(t.clone(), Q4Tensor)
    x = torch.randn(3, 128)
    torch.testing.assert_close(F.linear(x, t), x @ t.dequantize().T)
    ids = torch.tensor([[3, 0], [7, 3]])
    assert torch.equal(F.embedding(ids, t), t.dequantize()[ids])
    with pytest.raises(TypeError, match="Q4_AFFINE"):
        t.copy_(torch.zeros(8, 128))


def test_bonsai_linear_takes_a_q4_weight():
    lin = torch.nn.Linear(128, 16, bias=True)
    q = BonsaiLinear.from_linear(lin, "Q4_AFFINE")
    assert isinstance(q.weight, Q4Tensor) and "Q4_AFFINE" in repr(q)
    x = torch.randn(2, 128)
    torch.testing.assert_close(q(x), F.linear(x, q.weight.dequantize(), lin.bias))


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------
def _save(path, t: Q4Tensor):
    checkpoint.save_tensors(path, {"l.weight": t, "n.weight": torch.ones(4)}, family="flux2_klein",
                            component="text_encoder")


def _q4(scale_dtype=torch.bfloat16):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    qs, scale, bias = q4_affine.quantize(w, 64, scale_dtype)
    return Q4Tensor(qs, scale, bias.to(torch.float32), (6, 128), torch.float32)


def test_file_round_trip_keeps_every_part(tmp_path):
    t = _q4()
    path = tmp_path / "m.safetensors"
    _save(path, t)
    entry = checkpoint.read_header(path)["tensors"]["l.weight"]
    assert entry == {"type": "Q4_AFFINE", "shape": [6, 128], "group_size": 64, "scale_dtype": "BF16",
                     "bias_dtype": "F32", "reason": "quantized: Q4_AFFINE"} or entry["type"] == "Q4_AFFINE"
    back = checkpoint.read_tensors(path).tensors["l.weight"]
    assert isinstance(back, Q4Tensor)
    for a, b in zip(back.parts, t.parts):
        assert a.dtype == b.dtype and torch.equal(a, b)
    checkpoint.check_scales(path)


def _rewrite(path, change):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    tensors = json.loads(header["__metadata__"]["tensors"])
    change(tensors["l.weight"])
    header["__metadata__"]["tensors"] = json.dumps(tensors)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(group_size=0), "group_size 0"),
    (lambda e: e.update(group_size=3), "group_size 3"),
    (lambda e: e.update(group_size="64"), "group_size '64'"),
    (lambda e: e.update(group_size=True), "group_size True"),
    (lambda e: e.pop("group_size"), "group_size None"),
    (lambda e: e.update(group_size=32), "should be uint8"),
    (lambda e: e.update(scale_dtype="F8"), "scale_dtype 'F8'"),
    (lambda e: e.update(bias_dtype=None), "bias_dtype None"),
    (lambda e: e.update(bias_dtype="F16"), "should be uint8"),
    (lambda e: e.update(shape=[6, 2, 64]), "Q4_AFFINE of shape"),
    (lambda e: e.update(shape=[0, 128]), "Q4_AFFINE of shape"),
    (lambda e: e.update(shape=[6, 256]), "should be uint8"),
])
def test_a_corrupt_q4_header_is_a_checkpoint_error(tmp_path, change, message):
    path = tmp_path / "m.safetensors"
    _save(path, _q4())
    _rewrite(path, change)
    with pytest.raises(BonsaiCheckpointError, match=message):
        checkpoint.read_tensors(path)


def test_a_nan_scale_or_bias_is_refused(tmp_path):
    for part in ("scale", "bias"):
        t = _q4()
        getattr(t, part)[2, 1] = float("nan")
        path = tmp_path / f"{part}.safetensors"
        _save(path, t)
        with pytest.raises(BonsaiCheckpointError, match=f"NaN/inf {part} at row 2, group 1"):
            checkpoint.read_tensors(path)
        with pytest.raises(BonsaiCheckpointError, match=f"NaN/inf {part} at row 2, group 1"):
            checkpoint.check_scales(path)


# ---------------------------------------------------------------------------------------------
# GGUF Q4_1
# ---------------------------------------------------------------------------------------------
def _decode_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """ggml's dequantize_row_q4_1, from the spec: d, m fp16; y[j] = (qs[j] & 15)*d + m, y[j+16] = (qs[j] >> 4)*d + m."""
    rows = blocks.shape[0]
    out = []
    for r in range(rows):
        row = []
        raw = bytes(blocks[r].tolist())
        for b in range(0, len(raw), 20):
            d, m = struct.unpack("<ee", raw[b:b + 4])
            qs = raw[b + 4:b + 20]
            row += [(q & 15) * d + m for q in qs] + [(q >> 4) * d + m for q in qs]
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_gguf_q4_1_holds_an_fp16_q4_weight_exactly():
    t = Q4Tensor.from_float(torch.randn(3, 128, generator=torch.Generator().manual_seed(3)), torch.float32)
    blocks = q4_affine.to_gguf_q4_1(t.qs, t.scale, t.bias)
    assert blocks.shape == (3, 4 * 20)
    assert torch.equal(_decode_q4_1(blocks), t.dequantize(torch.float64))


def test_gguf_q4_1_refuses_what_it_cannot_hold():
    t = _q4()
    t.bias[1, 1] = 1 / 3  # a float32 bias (as HQQ's -(zero*scale) becomes) with bits beyond fp16
    with pytest.raises(ValueError, match="bias at row 1, group 1 .* not an fp16 value"):
        q4_affine.to_gguf_q4_1(t.qs, t.scale, t.bias, "l.weight")
    w = torch.randn(2, 48)
    qs, s, b = q4_affine.quantize(w, 48)
    with pytest.raises(ValueError, match="not a multiple of Q4_1's 32"):
        q4_affine.to_gguf_q4_1(qs, s, b)


# ---------------------------------------------------------------------------------------------
# the public payloads, kept 4-bit, bit-exact
# ---------------------------------------------------------------------------------------------
def _assert_q4_exact(imp, truth, quantized):
    for n, want in truth.items():
        got = imp.state_dict[n]
        if n in quantized:
            assert isinstance(got, Q4Tensor), n
            assert torch.equal(got.dequantize(torch.float64), want), n
            # and in float32 compute, the values rounded once
            assert torch.equal(got.dequantize(torch.float32), want.to(torch.float32)), n
        else:
            assert not isinstance(got, Q4Tensor) and torch.equal(got.to(torch.float64), want), n


@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16])
def test_mlx_payload_kept_4bit_bit_exact(tmp_path, ref, sdtype):
    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref, sdtype=sdtype)
    imp = import_text_encoder(d, dtype=torch.float32, keep_4bit=True)
    quantized = set(linear_names(TINY_TE_CONFIG)) | {"model.embed_tokens.weight"}
    _assert_q4_exact(imp, truth, quantized)
    assert imp.state_dict["model.layers.0.mlp.up_proj.weight"].scale.dtype == sdtype
    assert "15 kept 4-bit as Q4_AFFINE" in imp.notes[0]
    # the model built from it computes what a dense model of the exact values computes
    got = hidden_states(imp.build_model(torch.float32))
    want = hidden_states(build_reference_model(TINY_TE_CONFIG, truth))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mlx_8bit_is_dequantized_with_a_note(tmp_path, ref):
    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref, bits=8, group=32)
    imp = import_text_encoder(d, dtype=torch.float32, keep_4bit=True)
    assert not any(isinstance(t, Q4Tensor) for t in imp.state_dict.values())
    assert "dequantized from MLX affine" in imp.notes[0]


def test_hqq_payload_kept_4bit_bit_exact(tmp_path, ref):
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref, axis=1)
    imp = import_text_encoder(d, dtype=torch.float32, keep_4bit=True)
    _assert_q4_exact(imp, truth, set(linear_names(TINY_TE_CONFIG)))
    w = imp.state_dict["model.layers.1.self_attn.o_proj.weight"]
    assert w.scale.dtype == torch.float16 and w.bias.dtype == torch.float32
    assert "14 kept 4-bit as Q4_AFFINE" in imp.notes[0]


def test_hqq_axis0_groups_stay_exact_but_dense(tmp_path, ref):
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref, axis=0)
    imp = import_text_encoder(d, dtype=torch.float32, keep_4bit=True)
    assert not any(isinstance(t, Q4Tensor) for t in imp.state_dict.values())
    for n in linear_names(TINY_TE_CONFIG):
        assert torch.equal(imp.state_dict[n], truth[n].to(torch.float32)), n


def test_imported_4bit_text_encoder_saves_and_loads_as_q4_layers(tmp_path, ref):
    from bonsai_core.loader import load_into
    from transformers import Qwen3Config, Qwen3ForCausalLM

    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref)
    imp = import_text_encoder(d, dtype=torch.float32, keep_4bit=True)
    path = tmp_path / "te.safetensors"
    checkpoint.save_tensors(path, imp.state_dict, family="flux2_klein", component="text_encoder",
                            tied={"lm_head.weight": "model.embed_tokens.weight"})
    from accelerate import init_empty_weights

    with init_empty_weights():  # as loader.build_skeleton: parameters on meta, buffers real
        skel = Qwen3ForCausalLM(Qwen3Config(**TINY_TE_CONFIG))
    model = load_into(skel, checkpoint.read_tensors(path), dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, BonsaiLinear)
    assert isinstance(model.model.embed_tokens.weight, Q4Tensor)
    got = hidden_states(model)
    want = hidden_states(build_reference_model(TINY_TE_CONFIG, truth))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gguf_file_with_a_q4_weight_reads_back_exactly_through_the_gguf_package(tmp_path):
    """Written as Q4_1 by our writer, read and dequantized by llama.cpp's own gguf package."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from bonsai_core.importers.gguf_q1 import add_tensor

    t = Q4Tensor.from_float(torch.randn(4, 128, generator=torch.Generator().manual_seed(5)), torch.float32)
    path = tmp_path / "q4.gguf"
    writer = gguf.GGUFWriter(str(path), "test")
    add_tensor(writer, gguf, path, "blk.weight", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (rt,) = gguf.GGUFReader(str(path)).tensors
    assert rt.tensor_type == gguf.GGMLQuantizationType.Q4_1
    got = torch.from_numpy(dequantize(rt.data, rt.tensor_type).copy()).reshape(4, 128)
    assert torch.equal(got.float(), t.dequantize(torch.float32))
    # a weight no GGUF type holds exactly is refused, naming it, and nothing is written for it
    bad = _q4()
    bad.bias[0, 0] = 1 / 3
    with pytest.raises(BonsaiCheckpointError, match="l.weight.*cannot be written exactly in GGUF"):
        add_tensor(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "test"), gguf, tmp_path / "x.gguf", "l.weight", bad)


ENTRY_VALUES = [None, 0, -64, 1, 3, 7, 64, 128, 2**40, 1.5, "64", "F16", "BF16", "F32", "F8", "", [], {}, True]


def test_fuzzed_q4_headers_are_refused_with_a_checkpoint_error_or_load_correctly(tmp_path):
    """Seeded corruptions of a Q4_AFFINE entry (every key set to odd values, keys dropped, the data cut
    short, bytes flipped) through read_header, read_tensors and check_scales: each one a
    BonsaiCheckpointError or a load whose values are the file's (never another exception)."""
    import random

    rng = random.Random(23)
    base = tmp_path / "base.safetensors"
    _save(base, _q4())
    good = checkpoint.read_tensors(base).tensors["l.weight"]
    refused = 0
    for case in range(80):
        path = tmp_path / f"case{case}.safetensors"
        path.write_bytes(base.read_bytes())
        kind = rng.choice(["value", "drop", "truncate", "flip"])
        if kind == "value":
            key, val = rng.choice(["group_size", "scale_dtype", "bias_dtype", "shape", "type"]), rng.choice(ENTRY_VALUES)
            _rewrite(path, lambda e: e.__setitem__(key, val))
        elif kind == "drop":
            key = rng.choice(["group_size", "scale_dtype", "bias_dtype", "shape", "type"])
            _rewrite(path, lambda e: e.pop(key))
        elif kind == "truncate":
            raw = path.read_bytes()
            path.write_bytes(raw[:rng.randrange(len(raw))])
        else:
            raw = bytearray(path.read_bytes())
            pos = rng.randrange(len(raw))
            raw[pos] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(raw))
        try:
            entry = checkpoint.read_header(path)["tensors"]["l.weight"]
            checkpoint.check_scales(path)
            got = checkpoint.read_tensors(path).tensors["l.weight"]
        except BonsaiCheckpointError:
            refused += 1
            continue
        # loaded: what the header says (a flipped data byte, or BF16 relabelled F16, changes values
        # undetectably, but never the layout the header gives)
        assert isinstance(got, Q4Tensor) and got.shape == good.shape and got.group_size == entry["group_size"], case
        assert got.scale.dtype == q4_affine.DTYPES[entry["scale_dtype"]], case
        assert got.bias.dtype == q4_affine.DTYPES[entry["bias_dtype"]], case
    assert refused >= 40


def test_plan_report_of_a_4bit_policy_counts_what_quantizing_holds():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.quant.layers import plan_report, quantize_model
    from bonsai_core.quant.policy import text_encoder_policy

    model = Qwen3ForCausalLM(Qwen3Config(**TINY_TE_CONFIG))
    plan = plan_report(model, text_encoder_policy(), reference_dtype=torch.float16)
    done = quantize_model(model, text_encoder_policy(), reference_dtype=torch.float16)
    assert [la.name for la in plan.layers if la.quantized] == [la.name for la in done.layers if la.quantized]
    assert len([la for la in done.layers if la.quantized]) == 14 and plan.bytes_after == done.bytes_after


def test_bonsai_info_counts_the_4bit_tensors(tmp_path, ref, capsys):
    from bonsai_core import cli

    d, _truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref)
    imp = import_text_encoder(d, dtype=torch.bfloat16, keep_4bit=True)
    path = tmp_path / "te.safetensors"
    checkpoint.save_tensors(path, imp.state_dict, family="flux2_klein", component="text_encoder",
                            tied={"lm_head.weight": "model.embed_tokens.weight"})
    assert cli.main(["info", str(path)]) == 0
    assert "Q1_0 tensors: 0   Q4_AFFINE tensors: 15   dense tensors: 9" in capsys.readouterr().out


def test_a_4bit_text_encoder_streams_layer_by_layer_through_accelerate():
    """The placement's last resort (accelerate's cpu_offload: each layer's weights moved for its
    forward) with packed weights: accelerate re-wraps a parameter as type(param)(value, requires_grad=...)."""
    from accelerate import cpu_offload
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import text_encoder_policy

    torch.manual_seed(0)
    m = Qwen3ForCausalLM(Qwen3Config(**TINY_TE_CONFIG)).eval()
    quantize_model(m, text_encoder_policy())
    emb = m.model.embed_tokens
    emb.weight = torch.nn.Parameter(Q4Tensor.from_float(emb.weight.detach(), torch.float32), requires_grad=False)
    m.tie_weights()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    cpu_offload(m, execution_device=torch.device("cpu"))
    assert m.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # parked: streamed in per forward
    with torch.inference_mode():
        got = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_4bit_text_encoder_can_be_parked_and_lent(monkeypatch):
    """HostParked (the klein family's host copy, lent to the device per prompt) swaps ``param.data``:
    with packed weights the parameters stay packed and compute the same after lend and park."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.families.flux2_klein import HostParked
    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import text_encoder_policy

    torch.manual_seed(0)
    m = Qwen3ForCausalLM(Qwen3Config(**TINY_TE_CONFIG)).eval()
    quantize_model(m, text_encoder_policy())
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m.model(input_ids=ids).last_hidden_state
    parked = HostParked(m)
    for _ in range(2):
        parked.lend(torch.device("cpu"))
        assert isinstance(m.model.layers[1].mlp.up_proj.weight, Q4Tensor)
        with torch.inference_mode():
            assert torch.equal(m.model(input_ids=ids).last_hidden_state, want)
        parked.park()
    assert isinstance(m.model.layers[1].mlp.up_proj.weight, Q4Tensor)


def test_hqq_float32_scale_and_zero_fall_back_to_exact_dense_values(tmp_path, ref):
    """An fp32 scale times an fp32 zero needs more than float32 holds: no Q4_AFFINE form, so those
    weights are dequantized (exactly, rounded once) and the notes say why."""
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref, axis=1)
    pt = d / "qmodel.pt"
    modules = torch.load(pt, weights_only=True)
    name = "model.layers.0.mlp.up_proj"
    modules[name]["scale"] = modules[name]["scale"].float() * (1 + 2**-20)
    modules[name]["zero"] = modules[name]["zero"].float() + 2**-18
    torch.save(modules, pt)
    imp = import_text_encoder(d, dtype=torch.float32, keep_4bit=True)
    assert not isinstance(imp.state_dict[f"{name}.weight"], Q4Tensor)
    assert isinstance(imp.state_dict["model.layers.0.mlp.down_proj.weight"], Q4Tensor)
    assert "13 kept 4-bit" in imp.notes[0] and "1 dequantized" in imp.notes[0] and "float32 does not hold" in imp.notes[0]


def test_an_empty_hqq_weight_has_no_4bit_form_and_is_left_to_the_dense_path():
    from bonsai_core.importers.text_encoder import _hqq_as_q4

    # a corrupted leaf of shape [0, 64]: no codes to take a max of; the dense path refuses it by name
    empty = torch.zeros(0, 64, dtype=torch.uint8)
    assert _hqq_as_q4(empty, torch.zeros(0, 1, dtype=torch.float16), torch.zeros(0, 1, dtype=torch.float16),
                      torch.float16, (0, 64), 64, 1, torch.bfloat16) is None


@pytest.mark.parametrize("make", ["q4", "q1"])
def test_assigning_data_of_a_packed_weight_takes_the_new_parts(make):
    """``param.data = other`` must leave the packed weight holding ``other``'s parts: before, only the
    tensor's own header changed and the parts stayed the old ones (on CUDA that put the parts on the
    host under a tensor that said cuda; here, the old values stay)."""
    from bonsai_core.quant.tensor import Q1Tensor

    cls = Q4Tensor if make == "q4" else Q1Tensor
    torch.manual_seed(0)
    a, b = torch.randn(8, 256), torch.randn(8, 256)
    p = torch.nn.Parameter(cls.from_float(a), requires_grad=False)
    p.data = cls.from_float(b)
    assert torch.equal(p.dequantize(torch.float32), cls.from_float(b).dequantize(torch.float32))
    with pytest.raises(TypeError, match=cls.QTYPE):
        p.data = torch.zeros(8, 256)
    with pytest.raises(TypeError, match=cls.QTYPE):
        p.data = cls.from_float(torch.randn(4, 256))


def test_host_parked_lends_packed_parts_and_pins_them(monkeypatch):
    """HostParked keeps the host copy of a packed weight (its parts pinned where pinning works) and
    lends parts that lie on the lending device."""
    from bonsai_core.families.flux2_klein import HostParked

    m = torch.nn.Linear(256, 8, bias=False)
    m.weight = torch.nn.Parameter(Q4Tensor.from_float(torch.randn(8, 256)), requires_grad=False)
    parked = HostParked(m)
    parked.lend(torch.device("meta"))
    assert all(t.device.type == "meta" for t in m.weight.parts)
    parked.park()
    assert all(t.device.type == "cpu" for t in m.weight.parts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinning_a_packed_weight_keeps_it_packed_and_lending_puts_its_parts_on_the_gpu():
    """On CUDA, Tensor.pin_memory on a packed weight once came back as a plain dense tensor (the
    whole weight expanded into pinned memory): the lent text encoder ran dense BonsaiLinear weights."""
    from bonsai_core.families.flux2_klein import HostParked

    w = Q4Tensor.from_float(torch.randn(64, 256))
    pinned = w.pin_memory()
    assert type(pinned) is Q4Tensor and all(t.is_pinned() for t in pinned.parts)
    m = torch.nn.Linear(256, 64, bias=False)
    m.weight = torch.nn.Parameter(w, requires_grad=False)
    parked = HostParked(m)
    assert type(m.weight) is Q4Tensor and all(t.is_pinned() for t in m.weight.parts)
    parked.lend(torch.device("cuda"))
    assert type(m.weight) is Q4Tensor and all(t.is_cuda for t in m.weight.parts)
    parked.park()
    assert all(t.device.type == "cpu" for t in m.weight.parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_in_row_chunks_equals_the_affine_formula(monkeypatch, dtype):
    """Dequantized a few rows at a time (uneven chunks, the last one short), every value is the
    affine formula's, codes x scale + bias in float32 (as MLX and HQQ compute it), to the bit."""
    g = torch.Generator().manual_seed(7)
    rows, cols, group = 11, 256, 64
    qs = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand(rows, cols // group, generator=g) * 0.1).half()
    bias = (torch.randn(rows, cols // group, generator=g) * 0.05).half()
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols).float()  # low nibble first
    want = (codes.view(rows, -1, group) * scale.float()[..., None] + bias.float()[..., None]).reshape(rows, cols)
    monkeypatch.setattr(q4_affine, "DEQUANT_CHUNK", 3 * cols)  # 3 rows a chunk: 4 chunks, the last of 2 rows
    assert torch.equal(q4_affine.dequantize(qs, scale, bias, dtype), want.to(dtype))
