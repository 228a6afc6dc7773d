"""Issue 21: every bad file gets a clear BonsaiError, nothing blocks, nothing is left behind.

Each test builds one bad input by hand (independent of the fuzzer) and states the expected refusal,
or the expected state of the disk after a run that was stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bonsai_core import checkpoint, validate
from bonsai_core.cli import describe_model
from bonsai_core.errors import BonsaiCheckpointError, BonsaiError
from bonsai_core.loader import load_component, read_model_index
from tests.sd_fixtures import make_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from bonsai_core.convert import convert_pipeline

    root = tmp_path_factory.mktemp("rel")
    src = make_tiny_sd_pipeline(root / "src")
    convert_pipeline(src, root / "bonsai", log=lambda m: None)
    return {"src": src, "bonsai": root / "bonsai"}


def copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def set_meta(path: Path, key: str, value: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"][key] = value
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def unet_file(folder: Path) -> Path:
    return folder / "unet" / checkpoint.WEIGHTS_NAME


# --------------------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("key,value,said", [
    ("tensors", "null", "header 'tensors' is NoneType"),
    ("tied", "[]", "header 'tied' is '\\[\\]', expected an object"),
    ("policy", "[]", "header 'policy' is list"),
    ("format_version", "0", "format_version 0 is not a Bonsai format version"),
])
def test_header_json_of_the_wrong_type_is_refused_naming_the_key(sd, tmp_path, key, value, said):
    m = copy(sd["bonsai"], tmp_path)
    set_meta(unet_file(m), key, value)
    with pytest.raises(BonsaiCheckpointError, match=f"{unet_file(m)}: {said}"):
        checkpoint.read_tensors(unet_file(m))
    with pytest.raises(BonsaiCheckpointError, match=said):  # bonsai info uses the same checks
        describe_model(m)


@pytest.mark.parametrize("shape", [None, True, ["128", "128"], [-1, 4]])
def test_a_shape_that_is_not_a_list_of_whole_numbers_is_refused(sd, tmp_path, shape):
    m = copy(sd["bonsai"], tmp_path)
    f = unet_file(m)
    index = checkpoint.read_header(f)["tensors"]
    name = next(iter(index))
    index[name]["shape"] = shape
    set_meta(f, "tensors", json.dumps(index))
    with pytest.raises(BonsaiCheckpointError, match=f"tensor '{name}' has shape"):
        checkpoint.read_tensors(f)


def test_type_123_is_refused_naming_the_tensor(sd, tmp_path):
    m = copy(sd["bonsai"], tmp_path)
    f = unet_file(m)
    index = checkpoint.read_header(f)["tensors"]
    name = next(iter(index))
    index[name]["type"] = 123
    set_meta(f, "tensors", json.dumps(index))
    with pytest.raises(BonsaiCheckpointError, match=f"tensor '{name}' has type 123"):
        checkpoint.read_tensors(f)


def test_a_truncated_bonsai_file_is_reported_as_a_broken_bonsai_file_not_as_dense(sd, tmp_path):
    m = copy(sd["bonsai"], tmp_path)
    f = unet_file(m)
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size - 1)
    assert checkpoint.sniff_format(f) == "broken-bonsai"
    with pytest.raises(BonsaiCheckpointError, match="truncated|not a readable"):
        describe_model(m)


def test_info_reports_a_nan_scale_as_the_loader_does(sd, tmp_path):
    m = copy(sd["bonsai"], tmp_path)
    f = unet_file(m)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in json.loads(header["__metadata__"]["tensors"]).items() if v["type"] == "Q1_0")
    begin = header[name]["data_offsets"][0]
    raw[8 + n + begin: 8 + n + begin + 2] = struct.pack("<H", 0x7C00)  # +inf in the first block
    f.write_bytes(bytes(raw))
    with pytest.raises(BonsaiCheckpointError, match=f"{name}.*NaN/inf scale at row 0, group 0"):
        checkpoint.read_tensors(f)
    with pytest.raises(BonsaiCheckpointError, match=f"{name}.*NaN/inf scale at row 0, group 0"):
        describe_model(m)


# --------------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize("text,said", [
    ("[]", "holds a JSON list, expected an object"),
    ('{"_class_name": 5}', "_class_name is 5"),
    ('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers"]}', "component 'unet' is \\['diffusers'\\]"),
    ("", "is empty"),
])
def test_a_broken_model_index_is_refused(sd, tmp_path, text, said):
    m = copy(sd["bonsai"], tmp_path)
    (m / "model_index.json").write_text(text)
    with pytest.raises(BonsaiCheckpointError, match=said):
        read_model_index(m)


def test_a_missing_component_is_refused_before_anything_loads(sd, tmp_path):
    m = copy(sd["bonsai"], tmp_path)
    index = json.loads((m / "model_index.json").read_text())
    del index["vae"]
    (m / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BonsaiCheckpointError, match="names no vae component"):
        read_model_index(m)


def test_num_layers_1e9_is_refused_from_the_config_alone_in_well_under_a_second(sd, tmp_path):
    m = copy(sd["src"], tmp_path)
    cfg = json.loads((m / "vae" / "config.json").read_text())
    cfg["layers_per_block"] = 10**9
    (m / "vae" / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(BonsaiCheckpointError, match="layers_per_block is 1000000000; expected a whole number from 1"):
        read_model_index(m)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("key,value", [("norm_num_groups", 0), ("block_out_channels", [-32, 32, 32, 32]),
                                       ("scaling_factor", 0), ("in_channels", 1.5)])
def test_impossible_config_values_are_refused_naming_key_and_value(sd, tmp_path, key, value):
    m = copy(sd["bonsai"], tmp_path)
    p = m / "vae" / "config.json"
    cfg = json.loads(p.read_text())
    cfg[key] = value
    p.write_text(json.dumps(cfg))
    with pytest.raises(BonsaiCheckpointError, match=f"{p}: {key} is"):
        read_model_index(m)


@pytest.mark.parametrize("edit", ["drop", "rename", "extra"])
def test_a_dense_vae_whose_weights_do_not_cover_the_model_is_refused_not_randomly_filled(sd, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    m = copy(sd["bonsai"], tmp_path)
    f = next((m / "vae").glob("*.safetensors"))
    tensors = load_file(str(f))
    name = sorted(tensors)[3]
    if edit == "drop":
        del tensors[name]
    elif edit == "rename":
        tensors["old." + name] = tensors.pop(name)
    else:
        tensors["decoder.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(f))
    index = read_model_index(m)
    with pytest.raises(BonsaiCheckpointError, match="the weights do not match the AutoencoderKL"):
        load_component(m, "vae", index["vae"], torch.float32)


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_fifo_or_folder_where_weights_belong_is_refused_without_blocking(sd, tmp_path, kind):
    m = copy(sd["bonsai"], tmp_path)
    f = next((m / "text_encoder").glob("*.safetensors"))
    f.unlink()
    os.mkfifo(f) if kind == "fifo" else f.mkdir()
    said = "FIFO" if kind == "fifo" else "folder"
    with pytest.raises(BonsaiCheckpointError, match=f"{f}: expected a .*file, found a {said}"):
        index = read_model_index(m)  # a FIFO is refused with the folder's small files
        load_component(m, "text_encoder", index["text_encoder"], torch.float32)
    with pytest.raises(BonsaiCheckpointError, match=said):
        describe_model(m)


@pytest.mark.parametrize("edit,said", [
    ({"model_max_length": -1}, "model_max_length is -1"),
    ({"tokenizer_class": "TransfoXLTokenizer"}, "tokenizer_class is 'TransfoXLTokenizer'"),
    ({"vocab_file": "vocab.bin"}, "vocab_file is 'vocab.bin': a pickle file"),
    ({"chat_template": "{% for m in messages %}"}, "chat template does not render"),
])
def test_a_broken_or_pickling_tokenizer_is_refused_before_transformers_sees_it(sd, tmp_path, edit, said):
    m = copy(sd["bonsai"], tmp_path)
    p = m / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(edit)
    p.write_text(json.dumps(cfg))
    with pytest.raises(BonsaiCheckpointError, match=said):
        read_model_index(m)


def test_an_empty_tokenizer_file_is_refused(sd, tmp_path):
    m = copy(sd["bonsai"], tmp_path)
    (m / "tokenizer" / "vocab.json").write_text("")
    with pytest.raises(BonsaiCheckpointError, match="vocab.json: the tokenizer file is empty"):
        read_model_index(m)


@pytest.mark.parametrize("edit,said", [
    ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start 0.5 is not below beta_end 0.1"),
    ({"num_train_timesteps": 0}, "num_train_timesteps is 0"),
    ({"beta_schedule": "cubic"}, "beta_schedule is 'cubic'"),
])
def test_impossible_scheduler_settings_are_refused(sd, tmp_path, edit, said):
    m = copy(sd["bonsai"], tmp_path)
    p = m / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(edit)
    p.write_text(json.dumps(cfg))
    with pytest.raises(BonsaiCheckpointError, match=said):
        read_model_index(m)


def test_bonsai_json_layers_beyond_the_text_encoder_are_refused(sd, tmp_path):
    m = copy(sd["bonsai"], tmp_path)  # the text encoder has 2 layers
    (m / "bonsai.json").write_text(json.dumps({"text_encoder_out_layers": [1, 3]}))
    with pytest.raises(BonsaiCheckpointError, match=r"reads hidden states \[3\] but the text encoder has 2 layers"):
        read_model_index(m)
    (m / "bonsai.json").write_text(json.dumps({"text_encoder_out_layers": [1, 2]}))
    read_model_index(m)


def test_every_check_error_is_a_bonsai_error():
    assert issubclass(BonsaiCheckpointError, BonsaiError)
    with pytest.raises(BonsaiCheckpointError):
        validate.check_scheduler_config([], "x")


# --------------------------------------------------------------------------------------------- GGUF
def _tiny_gguf(path: Path, entries):
    from tests.flux2_fixtures import write_raw_gguf

    return write_raw_gguf(path, entries)


def test_gguf_zero_dimension_is_refused_not_divided_by(tmp_path):
    from bonsai_core.importers.gguf_q1 import read_gguf

    p = _tiny_gguf(tmp_path / "z.gguf", [("img_in.weight", [128, 0], 41, b"")])
    with pytest.raises(BonsaiCheckpointError, match=r"img_in.weight.*dimensions ne \[128, 0\]"):
        read_gguf(p)


def test_gguf_overlapping_tensors_are_refused(tmp_path):
    from bonsai_core.importers.gguf_q1 import read_gguf

    block = struct.pack("<e", 1.0) + bytes(16)
    p = _tiny_gguf(tmp_path / "o.gguf", [("a.weight", [128, 1], 41, block), ("b.weight", [128, 1], 41, block)])
    raw = bytearray(p.read_bytes())
    # point b at a's data (offset 0): the second offset field is the last 8 bytes of the tensor table
    pos = raw.index(b"b.weight") + len(b"b.weight") + 4 + 16 + 4
    raw[pos:pos + 8] = struct.pack("<Q", 0)
    p.write_bytes(bytes(raw))
    with pytest.raises(BonsaiCheckpointError, match="overlaps tensor 'a.weight'"):
        read_gguf(p)


def test_gguf_nan_scale_is_refused_at_import_as_convert_does(tmp_path):
    from bonsai_core.importers.gguf_q1 import read_gguf

    block = struct.pack("<H", 0x7E00) + bytes(16)
    p = _tiny_gguf(tmp_path / "n.gguf", [("img_in.weight", [128, 1], 41, block)])
    with pytest.raises(BonsaiCheckpointError, match="img_in.weight.*NaN/inf scale at row 0, group 0"):
        read_gguf(p)


def test_gguf_absurd_tensor_count_is_refused_before_parsing(tmp_path):
    from bonsai_core.importers.gguf_q1 import read_gguf

    p = tmp_path / "c.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0) + bytes(64))
    with pytest.raises(BonsaiCheckpointError, match="claims 4611686018427387904 tensors"):
        read_gguf(p)


def test_a_fifo_named_like_a_gguf_is_refused_without_blocking(tmp_path):
    from bonsai_core.importers.gguf_q1 import read_gguf

    p = tmp_path / "f.gguf"
    os.mkfifo(p)
    with pytest.raises(BonsaiCheckpointError, match="FIFO"):
        read_gguf(p)


# --------------------------------------------------------------------------------------------- convert
def test_convert_refuses_a_group_whose_scale_overflows_fp16_and_writes_nothing(sd, tmp_path):
    from bonsai_core.convert import convert_pipeline
    from safetensors.torch import load_file, save_file

    src = copy(sd["src"], tmp_path)
    f = next((src / "unet").glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(k for k in sorted(tensors) if k.endswith("attn1.to_q.weight"))
    tensors[name] = tensors[name].float().clone()
    tensors[name][0, :] = 70000.0  # mean |w| of the first groups of row 0: beyond 65504
    save_file(tensors, str(f))
    with pytest.raises(BonsaiCheckpointError, match=f"{name.rsplit('.', 1)[0]}.*row 0, group 0.*beyond fp16"):
        convert_pipeline(src, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_the_convert_table_never_cuts_a_layer_name():
    from bonsai_core.quant.layers import LayerReport, QuantReport
    from bonsai_core.quant.policy import default_policy

    long = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_very_long_name"
    rep = QuantReport(policy=default_policy("sd_unet"))
    rep.layers.append(LayerReport(long, "linear", (320, 320), True, "quantized: Q1_0", 204800, 14400))
    table = rep.table(max_rows=None)
    assert long in table and "MiB" not in table.splitlines()[1] and "KiB" in table


def test_importing_the_same_gguf_twice_gives_identical_files(tmp_path):
    from bonsai_core.importers.assemble import import_model
    from tests.klein_fixtures import klein_ground_truth, make_gguf_and_parts

    gguf_path, parts = make_gguf_and_parts(tmp_path / "g", klein_ground_truth(0))
    digests = []
    for i in range(2):  # two processes: the hash seed differs, as between two real runs
        out = tmp_path / f"m{i}"
        code = ("import sys; from bonsai_core.importers.assemble import import_model; "
                f"import_model({str(gguf_path)!r}, {str(out)!r}, text_encoder={str(parts['text_encoder'])!r}, "
                f"vae={str(parts['vae'])!r}, tokenizer={str(parts['tokenizer'])!r}, log=lambda m: None)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(i)},
                       capture_output=True)
        f = out / "transformer" / checkpoint.WEIGHTS_NAME
        digests.append(hashlib.sha256(f.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# --------------------------------------------------------------------------------------------- leftovers
def test_a_stale_partial_of_a_dead_run_is_removed_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".model.bonsai-{pid}-deadbeef.partial"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    mine = tmp_path / f".model.bonsai-{os.getppid()}-cafe.partial"  # a live writer's: kept
    mine.mkdir()
    with checkpoint.staged_dir(tmp_path / "model") as tmp:
        (tmp / "a").write_text("a")
    assert not stale.exists() and mine.exists()
    assert (tmp_path / "model" / "a").read_text() == "a"


def test_an_overwrite_killed_between_the_renames_gets_the_old_model_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".model.bonsai-{int(dead.stdout)}-0001.old"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    assert not (tmp_path / "model").exists()  # the state a kill between the two renames leaves
    checkpoint.clean_stale(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").read_text() == "{}" and not old.exists()


def test_outputs_get_the_users_umask_not_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        checkpoint.save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)}, family="sd_unet", component="unet")
        with checkpoint.staged_dir(tmp_path / "m") as tmp:
            (tmp / "f").write_text("f")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def test_import_offline_advice_names_src_not_a_model_flag(tmp_path, monkeypatch, capsys):
    from bonsai_core import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(["import", "someone/not-cached-repo", str(tmp_path / "dst"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "--model" not in err and "SRC" in err


def test_export_gguf_reports_the_tensor_counts_of_the_file_it_wrote(tmp_path):
    import gguf

    from bonsai_core.importers.assemble import export_gguf, import_model
    from tests.klein_fixtures import klein_ground_truth, make_gguf_and_parts

    gguf_path, parts = make_gguf_and_parts(tmp_path / "g", klein_ground_truth(0))
    import_model(gguf_path, tmp_path / "m", text_encoder=parts["text_encoder"], vae=parts["vae"],
                 tokenizer=parts["tokenizer"], log=lambda m: None)
    said = []
    export_gguf(tmp_path / "m", tmp_path / "out.gguf", log=said.append)
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    q1 = sum(int(t.tensor_type) == 41 for t in reader.tensors)
    assert f"{q1} Q1_0 tensors, {len(reader.tensors) - q1} dense" in said[-1]


def test_leftovers_of_the_older_tempfile_names_are_cleaned_after_an_hour_and_a_model_inside_comes_back(tmp_path):
    partial = tmp_path / ".model.k3j_x9az.partial"  # tempfile.mkdtemp's names before this change
    partial.mkdir()
    old = tmp_path / ".model.q0w8e7r6.old"
    (old / "model").mkdir(parents=True)
    (old / "model" / "model_index.json").write_text("{}")
    fresh = tmp_path / ".model.abcdefgh.partial"  # a writer of an older version may still be at work
    fresh.mkdir()
    hour_ago = time.time() - 2 * checkpoint.LEGACY_STALE_SECONDS
    for p in (partial, old):
        os.utime(p, (hour_ago, hour_ago))
    checkpoint.clean_stale(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert not partial.exists() and not old.exists() and fresh.exists()


def test_a_real_sd15_layout_with_feature_extractor_and_safety_checker_entries_is_accepted(sd, tmp_path):
    m = copy(sd["src"], tmp_path)
    (m / "feature_extractor").mkdir()
    (m / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224}))
    index = json.loads((m / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (m / "model_index.json").write_text(json.dumps(index))
    assert read_model_index(m)["feature_extractor"] == ["transformers", "CLIPImageProcessor"]


def test_info_on_a_fifo_path_names_it_and_does_not_block(tmp_path, capsys):
    from bonsai_core import cli

    os.mkfifo(tmp_path / "m.safetensors")
    assert cli.main(["info", str(tmp_path / "m.safetensors")]) == 2
    assert "found a FIFO" in capsys.readouterr().err


def test_a_chat_template_that_drops_the_prompt_is_refused(tmp_path):
    with pytest.raises(BonsaiCheckpointError, match="drops the prompt"):
        validate.check_chat_template(tmp_path / "t.jinja", "[]")
    with pytest.raises(BonsaiCheckpointError, match="empty list"):
        validate.check_chat_template(tmp_path / "t.jinja", [])
    validate.check_chat_template(tmp_path / "t.jinja", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
