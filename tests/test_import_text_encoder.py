"""The Bonsai Image 4B text encoder importer (Qwen3 at 4 bit: MLX affine and HQQ; dense for completeness).

Each layout is written by an independent hand-written quantizer (tests/te_fixtures.py) from a random
tiny Qwen3ForCausalLM, imported, and compared with the quantizer's exact dequantized values; then
run through transformers' model and compared with a reference model holding those values.
"""

from __future__ import annotations

import json

import pytest
import torch

from bonsai_core.errors import BonsaiCheckpointError, BonsaiRequestError
from bonsai_core.importers.text_encoder import (
    ImportedTextEncoder, detect_text_encoder_layout, import_text_encoder, unpack_hqq, unpack_mlx_words,
)
from tests.te_fixtures import (
    TINY_TE_CONFIG, UNPICKLED, NotATensor, build_reference_model, config_with, hidden_states, hqq_leaves, linear_names,
    make_reference, write_hqq_te, write_mlx_te,
)

pytest.importorskip("transformers.models.qwen3")


@pytest.fixture(scope="module")
def ref_tied():
    return make_reference(TINY_TE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def ref_untied():
    return make_reference(config_with(tie_word_embeddings=False), seed=1)


def assert_exact(imp: ImportedTextEncoder, truth: dict, dtype=torch.float32):
    assert set(imp.state_dict) == set(truth)
    for n, want in truth.items():
        got = imp.state_dict[n]
        assert got.dtype == dtype and got.shape == want.shape, n
        assert torch.equal(got, want.to(dtype)), n


def assert_same_hidden_states(imp: ImportedTextEncoder, config: dict, truth: dict):
    ref = hidden_states(build_reference_model(config, truth))
    got = hidden_states(imp.build_model(torch.float32))
    assert len(got) == len(ref) == config["num_hidden_layers"] + 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# worked examples, by hand
# ---------------------------------------------------------------------------------------------
def test_worked_example_mlx_word():
    words = torch.tensor([[0x76543210]], dtype=torch.int64).to(torch.uint32)
    assert unpack_mlx_words(words, 4).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    # the top bit set: the sign of the int32 view must not leak into the codes
    words = torch.tensor([[0xF0000001]], dtype=torch.int64).to(torch.uint32)
    assert unpack_mlx_words(words, 4).tolist() == [[1, 0, 0, 0, 0, 0, 0, 15]]
    assert unpack_mlx_words(torch.tensor([[0x0000E4]], dtype=torch.int64).to(torch.uint32), 2)[0, :4].tolist() \
        == [0, 1, 2, 3]


def test_worked_example_hqq_byte():
    packed = torch.tensor([[0xA5]], dtype=torch.uint8)  # one byte: rows i and i + n/2 of a 2-row matrix
    assert unpack_hqq(packed, "4bit_u8").tolist() == [[10], [5]]
    # 2 bit: 0b11_10_01_00 -> rows 3, 2, 1, 0
    assert unpack_hqq(torch.tensor([[0b11100100]], dtype=torch.uint8), "2bit_u8").tolist() == [[3], [2], [1], [0]]
    assert unpack_hqq(torch.tensor([[200]], dtype=torch.uint8), "8bit_u8").tolist() == [[200]]


def test_hand_quantizers_are_what_the_spec_says():
    """The fixture quantizers against the spec's formulas on a hand-checkable row."""
    from tests.te_fixtures import hqq_quantize, mlx_quantize

    w = torch.arange(64, dtype=torch.float32).reshape(1, 64) / 4  # 0 .. 15.75
    words, scales, biases, exact = mlx_quantize(w, 4, 64)
    assert float(scales[0, 0]) == float(torch.tensor(15.75 / 15).to(torch.bfloat16))  # (max - min) / 15
    assert float(biases[0, 0]) == 0.0
    assert int(words[0, 0]) & 0xF == 0  # column 0 -> q 0 in the lowest nibble
    packed, scale, zero, exact = hqq_quantize(torch.arange(128, dtype=torch.float32).reshape(2, 64), 4, 64, axis=1)
    assert packed.shape == (1, 64) and scale.shape == (2, 1)
    assert int(packed[0, 63]) >> 4 == 15  # row 0 column 63 is its group's max -> 15, in the high nibble


# ---------------------------------------------------------------------------------------------
# MLX
# ---------------------------------------------------------------------------------------------
def test_mlx_exact_fp32_and_runs(tmp_path, ref_tied):
    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    assert detect_text_encoder_layout(d) == "mlx_4bit"
    assert detect_text_encoder_layout(tmp_path) == "mlx_4bit"  # the repo folder holding text_encoder-mlx-4bit/
    imp = import_text_encoder(tmp_path, dtype=torch.float32)
    assert imp.source_layout == "mlx_4bit"
    assert_exact(imp, truth)
    assert "lm_head.weight" not in imp.state_dict  # tied, as Qwen3-4B
    assert "quantization" not in imp.config and "quantization_config" not in imp.config
    assert imp.config["architectures"] == ["Qwen3ForCausalLM"] and imp.config["model_type"] == "qwen3"
    assert imp.notes[0].startswith("14 linears + embedding dequantized from MLX affine (4-bit group 64: 15)")
    assert_same_hidden_states(imp, TINY_TE_CONFIG, truth)


def test_mlx_bf16_is_the_exact_values_rounded_once(tmp_path, ref_tied):
    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    imp = import_text_encoder(d)  # default bf16
    assert_exact(imp, truth, torch.bfloat16)
    assert "rounded to bfloat16" in imp.notes[0] and "max rel err" in imp.notes[0]


def test_mlx_sharded_untied_quantized_lm_head(tmp_path, ref_untied):
    cfg = config_with(tie_word_embeddings=False)
    d, truth = write_mlx_te(tmp_path, cfg, ref_untied, shards=3)
    assert not (d / "model.safetensors").exists()
    imp = import_text_encoder(d, dtype=torch.float32)
    assert "lm_head.weight" in imp.state_dict
    assert_exact(imp, truth)
    assert imp.notes[0].startswith("15 linears + embedding")
    assert_same_hidden_states(imp, cfg, truth)


@pytest.mark.parametrize("bits", [2, 8])
def test_mlx_other_bit_widths(tmp_path, ref_tied, bits):
    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied, bits=bits, group=32)
    imp = import_text_encoder(d, dtype=torch.float32)
    assert_exact(imp, truth)
    assert f"{bits}-bit group 32" in imp.notes[0]


def test_mlx_per_module_override(tmp_path, ref_tied):
    from safetensors.torch import load_file, save_file
    from tests.te_fixtures import mlx_quantize

    d, truth = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    name = "model.layers.1.mlp.down_proj"
    t = load_file(str(d / "model.safetensors"))
    words, scales, biases, exact = mlx_quantize(ref_tied[f"{name}.weight"], 8, 32)
    t[f"{name}.weight"], t[f"{name}.scales"], t[f"{name}.biases"] = words, scales, biases
    truth[f"{name}.weight"] = exact
    save_file(t, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"][name] = {"group_size": 32, "bits": 8}
    (d / "config.json").write_text(json.dumps(cfg))
    assert_exact(import_text_encoder(d, dtype=torch.float32), truth)


def test_mlx_refuses_3_bits(tmp_path, ref_tied):
    d, _ = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 3}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BonsaiCheckpointError, match=r"config\.json.*bits = 3.*2, 4 or 8"):
        import_text_encoder(d)


def test_mlx_refuses_truncated_safetensors(tmp_path, ref_tied):
    d, _ = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BonsaiCheckpointError, match=r"model\.safetensors.*truncated"):
        import_text_encoder(d)


def test_mlx_refuses_wrong_shape_naming_tensor(tmp_path, ref_tied):
    from safetensors.torch import load_file, save_file

    d, _ = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    t = load_file(str(d / "model.safetensors"))
    n = "model.layers.0.self_attn.k_proj"
    t[f"{n}.weight"] = t[f"{n}.weight"][:16].contiguous()  # 16 rows instead of 32
    t[f"{n}.scales"], t[f"{n}.biases"] = t[f"{n}.scales"][:16].contiguous(), t[f"{n}.biases"][:16].contiguous()
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(BonsaiCheckpointError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'.*\[16, 8\]"
                             r".*expected uint32 \[32, 8\]"):
        import_text_encoder(d)


def test_mlx_refuses_unknown_name(tmp_path, ref_tied):
    from safetensors.torch import load_file, save_file

    d, _ = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.qkv.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match=r"'model\.layers\.0\.self_attn\.qkv\.weight'.*not a parameter"):
        import_text_encoder(d)


def test_mlx_refuses_missing_tensor(tmp_path, ref_tied):
    from safetensors.torch import load_file, save_file

    d, _ = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    t = load_file(str(d / "model.safetensors"))
    del t["model.norm.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match=r"'model\.norm\.weight': is missing; expected shape \[64\]"):
        import_text_encoder(d)


def test_refuses_non_qwen3_config_and_bad_dtype(tmp_path, ref_tied):
    d, _ = write_mlx_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    with pytest.raises(BonsaiRequestError, match="not a float dtype"):
        import_text_encoder(d, dtype=torch.int8)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BonsaiCheckpointError, match=r"config\.json: model_type = 'llama'"):
        import_text_encoder(d)


# ---------------------------------------------------------------------------------------------
# HQQ
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 0])
def test_hqq_exact_fp32_and_runs(tmp_path, ref_tied, axis):
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied, axis=axis)
    assert detect_text_encoder_layout(tmp_path) == "hqq_4bit"
    assert detect_text_encoder_layout(d / "qmodel.pt") == "hqq_4bit"
    imp = import_text_encoder(d / "qmodel.pt", dtype=torch.float32)
    assert imp.source_layout == "hqq_4bit"
    assert_exact(imp, truth)  # the tied lm_head copy is folded into the embedding
    assert imp.notes[0].startswith(f"14 HQQ linears dequantized (14x packing '4bit_u8' nbits 4 group_size 64 "
                                   f"axis {axis})")
    assert any("tied" in n for n in imp.notes)
    assert_same_hidden_states(imp, TINY_TE_CONFIG, truth)


def test_hqq_bf16_rounded_once(tmp_path, ref_tied):
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    assert_exact(import_text_encoder(d), truth, torch.bfloat16)


@pytest.mark.parametrize("axis", [1, 0])
def test_hqq_encoded_values_and_view_as_float(tmp_path, ref_untied, axis):
    cfg = config_with(tie_word_embeddings=False)
    d, truth = write_hqq_te(tmp_path, cfg, ref_untied, axis=axis, encoded=True, view_as_float=True)
    imp = import_text_encoder(d, dtype=torch.float32)
    assert_exact(imp, truth)
    assert "lm_head.weight" in imp.state_dict
    assert_same_hidden_states(imp, cfg, truth)


@pytest.mark.parametrize("nbits", [8, 2])
def test_hqq_8bit_and_2bit(tmp_path, ref_tied, nbits):
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied, nbits=nbits, axis=1)
    imp = import_text_encoder(d, dtype=torch.float32)
    assert_exact(imp, truth)
    assert f"'{nbits}bit_u8' nbits {nbits}" in imp.notes[0]


def test_hqq_bare_qwen3model_names_get_prefix(tmp_path, ref_tied):
    d, truth = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied, tied_head_copy=False)
    mods = torch.load(d / "qmodel.pt", weights_only=True)
    torch.save({k[len("model."):]: v for k, v in mods.items()}, d / "qmodel.pt")
    imp = import_text_encoder(d, dtype=torch.float32)
    assert_exact(imp, truth)
    assert any("prefix" in n for n in imp.notes)


def _rewrite_leaf(d, module, **leaves):
    mods = torch.load(d / "qmodel.pt", weights_only=True)
    mods[module].update(leaves)
    torch.save(mods, d / "qmodel.pt")


@pytest.mark.parametrize("packing", ["3bit_32", "5bit_u8"])
def test_hqq_refuses_unknown_packing(tmp_path, ref_tied, packing):
    d, _ = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    _rewrite_leaf(d, "model.layers.0.mlp.up_proj", packing=packing)
    with pytest.raises(BonsaiCheckpointError,
                       match=rf"qmodel\.pt: tensor 'model\.layers\.0\.mlp\.up_proj\.packing': packing '{packing}' "
                             r"is not supported"):
        import_text_encoder(d)


def test_hqq_refuses_wrong_shape(tmp_path, ref_tied):
    d, _ = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    # consistent leaves for a [64, 128] weight where the config says q_proj is [64, 64]
    leaves, _ = hqq_leaves(torch.randn(64, 128))
    mods = torch.load(d / "qmodel.pt", weights_only=True)
    mods["model.layers.1.self_attn.q_proj"] = leaves
    torch.save(mods, d / "qmodel.pt")
    with pytest.raises(BonsaiCheckpointError,
                       match=r"qmodel\.pt: tensor 'model\.layers\.1\.self_attn\.q_proj\.weight': "
                             r"has shape \[64, 128\]; expected \[64, 64\]"):
        import_text_encoder(d)


def test_hqq_refuses_w_q_that_does_not_match_its_shape(tmp_path, ref_tied):
    d, _ = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    _rewrite_leaf(d, "model.layers.0.self_attn.v_proj", shape=torch.Size([64, 64]))  # really [32, 64]
    with pytest.raises(BonsaiCheckpointError, match=r"'model\.layers\.0\.self_attn\.v_proj\.W_q'.*unpacks.*expected"):
        import_text_encoder(d)


def test_hqq_refuses_custom_object_without_unpickling(tmp_path, ref_tied):
    d, _ = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    _rewrite_leaf(d, "model.norm", extra=NotATensor())
    UNPICKLED.clear()
    with pytest.raises(BonsaiCheckpointError,
                       match=r"qmodel\.pt: refused by torch\.load\(weights_only=True\): UnpicklingError: Unsupported "
                             r"global: GLOBAL tests\.te_fixtures\._record_unpickling"):
        import_text_encoder(d)
    assert UNPICKLED == []  # refused before anything ran
    torch.load(d / "qmodel.pt", weights_only=False)  # what a careless loader would do: the object's code runs
    assert UNPICKLED == ["NotATensor"]


def test_hqq_refuses_non_dict_and_broken_pt(tmp_path, ref_tied):
    d, _ = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    torch.save([torch.zeros(2)], d / "qmodel.pt")
    with pytest.raises(BonsaiCheckpointError, match=r"qmodel\.pt: holds a list"):
        import_text_encoder(d)
    (d / "qmodel.pt").write_bytes(b"not a zip")
    with pytest.raises(BonsaiCheckpointError, match=r"qmodel\.pt: refused by torch\.load"):
        import_text_encoder(d)


def test_hqq_refuses_lm_head_that_breaks_the_tie(tmp_path, ref_tied):
    d, _ = write_hqq_te(tmp_path, TINY_TE_CONFIG, ref_tied)
    _rewrite_leaf(d, "lm_head", weight=torch.zeros(256, 64, dtype=torch.float16))
    with pytest.raises(BonsaiCheckpointError, match=r"'lm_head\.weight': differs from model\.embed_tokens\.weight"):
        import_text_encoder(d)


# ---------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------
def test_dense_round_trip(tmp_path, ref_tied):
    from safetensors.torch import save_file

    d = tmp_path / "text_encoder"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_TE_CONFIG))
    save_file({k: v.to(torch.bfloat16) for k, v in ref_tied.items()}, str(d / "model.safetensors"))
    assert detect_text_encoder_layout(tmp_path) == "dense"
    imp = import_text_encoder(tmp_path)
    assert imp.source_layout == "dense"
    assert_exact(imp, {k: v.to(torch.bfloat16).to(torch.float64) for k, v in ref_tied.items()}, torch.bfloat16)


def test_detect_refuses_unknown_folder(tmp_path):
    with pytest.raises(BonsaiCheckpointError, match="Looked for"):
        detect_text_encoder_layout(tmp_path)
    with pytest.raises(BonsaiCheckpointError, match="does not exist"):
        import_text_encoder(tmp_path / "nope")


def test_linear_count_of_qwen3_4b():
    """252 = 36 layers x 7 linears: what the notes of a real Qwen3-4B import count."""
    assert len(linear_names({"num_hidden_layers": 36})) == 252
