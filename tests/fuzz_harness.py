"""A seeded, bounded fuzzer for every file a Bonsai model is made of.

Tiny models of every kind are built once (``build_bases``): a full-precision SD pipeline, its Bonsai
conversion, a FLUX.2 [klein] Q1_0 ``.gguf`` with part folders, its Bonsai import, and MLX / gemlite
repos. A *case* copies one base, applies one *mutation* (a corrupted header, an impossible config
value, a FIFO where a file should be ...) and runs one *entry point* (``read_tensors``, ``bonsai
info``, the engine with a one-step generation, ``import``, ``convert``, ``export-gguf``) on it.

Every case runs in a forked child with a timeout (``signal.alarm``) and an address-space limit, so
a hang or a memory blow-up is seen, counted and stopped. An outcome is one of:

* ``refused``      a ``BonsaiError`` (the only acceptable failure);
* ``loaded``       the entry point succeeded: fine where the mutation cannot be detected (a bit flip
                   inside weight data, counted apart as ``undetectable``) or leaves the model valid
                   (``benign``); a failure (``silent``) where the mutation is a corruption a check can see;
* ``raw``          any other exception (a bug);
* ``hang``         the timeout fired;
* ``memory``       MemoryError / the allocator failed under the limit.

The mutations are data, one function each: ``MUTATIONS`` maps a kind to (base, entry points,
function). A function gets the copied folder and a ``random.Random`` and returns
``(detail, expect)``, ``expect`` being ``"refuse"``, ``"undetectable"`` or ``"any"``.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------
BASE_NAMES = ("sd_src", "sd_bonsai", "klein_gguf", "klein_bonsai", "mlx_repo", "gemlite_repo")


def fork_safe_child() -> None:
    """In a forked child: transformers 5 loads weights on worker threads, and a worker's first
    parallel torch op sets its thread count through torch's thread pool, which a forked child
    does not have once the parent set a thread count ("pool INTERNAL ASSERT FAILED ... Invalid
    thread pool!", now and then, in whichever run's loader hit it). Loading on the calling thread
    avoids it; it is an artefact of testing by fork, not of what the tests check."""
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"


def build_bases(root: Path) -> dict[str, Path]:
    """Write every base model under ``root`` (once; a second call reuses them)."""
    import torch

    root = Path(root)
    done = root / ".done"
    out = {name: root / name for name in BASE_NAMES}
    if done.is_file():
        return out
    from bonsai_core.convert import convert_pipeline
    from bonsai_core.importers.assemble import import_model
    from tests.klein_fixtures import klein_ground_truth, make_gguf_and_parts, make_mlx_repo, make_gemlite_repo
    from tests.sd_fixtures import make_tiny_sd_pipeline

    torch.manual_seed(0)
    make_tiny_sd_pipeline(out["sd_src"])
    convert_pipeline(out["sd_src"], out["sd_bonsai"], log=lambda m: None)
    gt = klein_ground_truth(0)
    gguf_path, parts = make_gguf_and_parts(out["klein_gguf"], gt)
    import_model(gguf_path, out["klein_bonsai"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                 tokenizer=parts["tokenizer"], log=lambda m: None)
    make_mlx_repo(out["mlx_repo"], gt, te="dense")
    make_gemlite_repo(out["gemlite_repo"], gt, te="dense")
    done.write_text("ok")
    return out


# ---------------------------------------------------------------------------------------------
# Entry points: (folder of the mutated copy, scratch folder) -> None; raise on refusal
# ---------------------------------------------------------------------------------------------
def _component_file(folder: Path, comp: str) -> Path:
    return next((folder / comp).glob("*.safetensors"))


def ep_read_tensors(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core import checkpoint

    comp = "unet" if base.startswith("sd") else "transformer"
    files = sorted((case_dir / comp).glob("*.safetensors"))
    if not files:
        from bonsai_core.errors import BonsaiCheckpointError
        raise BonsaiCheckpointError(f"{case_dir / comp}: no weights file")  # the mutation removed it
    checkpoint.read_tensors(files[0])


def ep_info(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core.cli import describe_model

    describe_model(case_dir)


def ep_engine(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core.engine import BonsaiImageEngine

    eng = BonsaiImageEngine.from_pretrained(case_dir, device="cpu", dtype="fp32")
    if base.startswith("sd"):
        eng.generate("a red fox", steps=1, width=64, height=64, seed=1, guardrail="refuse")
    else:
        eng.generate("a red fox", steps=1, width=64, height=64, seed=1, guardrail="refuse")


def ep_convert(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core.convert import convert_pipeline

    convert_pipeline(case_dir, scratch / "out", log=lambda m: None)


def _gguf_src(case_dir: Path) -> Path:
    return case_dir / "bonsai-image-4b-q1_0.gguf"


def ep_read_gguf(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core.importers.gguf_q1 import read_gguf

    read_gguf(_gguf_src(case_dir))


def ep_import(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core.importers.assemble import import_model

    if base == "klein_gguf":
        parts = case_dir / "parts"
        import_model(_gguf_src(case_dir), scratch / "out", text_encoder=parts / "text_encoder", vae=parts / "vae",
                     tokenizer=parts / "tokenizer", log=lambda m: None)
    else:
        import_model(case_dir, scratch / "out", log=lambda m: None)


def ep_export(case_dir: Path, scratch: Path, base: str) -> None:
    from bonsai_core.importers.assemble import export_gguf

    export_gguf(case_dir, scratch / "out.gguf", log=lambda m: None)


ENTRY_POINTS = {"read_tensors": ep_read_tensors, "info": ep_info, "engine": ep_engine, "convert": ep_convert,
                "read_gguf": ep_read_gguf, "import": ep_import, "export": ep_export}


# ---------------------------------------------------------------------------------------------
# Helpers for mutations
# ---------------------------------------------------------------------------------------------
def _st_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _edit_meta(path: Path, edit) -> None:
    header, data = _st_parts(path)
    meta = header.get("__metadata__", {})
    edit(meta)
    header["__metadata__"] = meta
    _st_write(path, header, data)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    data = edit(data)
    path.write_text(json.dumps(data))


def _rewrite_tensors(path: Path, edit) -> None:
    """Load a safetensors file, let ``edit(tensors, index_or_None)`` change it, write it back with
    the header metadata kept (the Bonsai ``tensors`` index follows the change when ``edit`` says so)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    index = json.loads(meta["tensors"]) if "tensors" in meta else None
    edit(tensors, index)
    if index is not None:
        meta["tensors"] = json.dumps(index)
    save_file(tensors, str(path), metadata=meta or None)


WRONG_JSON = ["null", "[]", "123", "\"x\"", "true", "[1, 2]", "{\"a\": 1}", "1e999", "not json {"]
BAD_SHAPES = [None, True, ["128", "128"], [-1, 128], [0], [2**40, 2**40], "abc", [1.5, 2], [[1]], {}]
BAD_TYPES = [123, "Q2_0", None, "F8", ["Q1_0"], "", "q1_0"]
BAD_NUMBERS = [0, -1, -64, 10**9, 1e9, 2**63, 1.5, "abc", None, True, [], 1e308]
SPECIALS = ["fifo", "dir", "socket", "empty", "dangling", "garbage"]


def _make_special(path: Path, kind: str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
        (path / "x").write_text("x")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(path))
        except OSError:  # path too long for a socket name: a FIFO instead
            os.mkfifo(path)
        finally:
            s.close()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling":
        path.symlink_to(path.parent / "does-not-exist")
    else:
        path.write_bytes(os.urandom(64))


def _bonsai_file(d: Path) -> Path:
    for comp in ("unet", "transformer"):
        if (d / comp).is_dir():
            return _component_file(d, comp)
    raise FileNotFoundError(d)


# ---------------------------------------------------------------------------------------------
# Mutations of Bonsai component files (sd_bonsai, klein_bonsai)
# ---------------------------------------------------------------------------------------------
def m_meta_wrong_json(d: Path, rng: random.Random):
    key = rng.choice(["tensors", "tied", "policy"])
    val = rng.choice(WRONG_JSON)
    if key == "tied" and val == "{\"a\": 1}":
        val = "[]"
    _edit_meta(_bonsai_file(d), lambda m: m.__setitem__(key, val))
    benign = key == "policy" and val == "{\"a\": 1}"
    return f"metadata {key} = {val}", "any" if benign else "refuse"


def m_meta_missing_key(d: Path, rng: random.Random):
    key = rng.choice(["format", "format_version", "group_size", "tensors"])
    _edit_meta(_bonsai_file(d), lambda m: m.pop(key, None))
    return f"metadata {key} removed", "refuse"


def m_meta_bad_version(d: Path, rng: random.Random):
    key, val = rng.choice([("format_version", v) for v in ("-1", "0", "1.5", "1e9", "abc", "", "2")]
                          + [("group_size", v) for v in ("64", "0", "-128", "abc")])
    _edit_meta(_bonsai_file(d), lambda m: m.__setitem__(key, val))
    return f"metadata {key} = {val!r}", "refuse"


def _edit_entry(d: Path, rng: random.Random, change) -> None:
    """Apply ``change(index, name)`` to one random entry of the Bonsai header's tensor index."""
    def edit(m):
        idx = json.loads(m["tensors"])
        change(idx, rng.choice(sorted(idx)))
        m["tensors"] = json.dumps(idx)
    _edit_meta(_bonsai_file(d), edit)


def m_entry_shape(d: Path, rng: random.Random):
    val = rng.choice(BAD_SHAPES)
    _edit_entry(d, rng, lambda idx, name: idx[name].__setitem__("shape", val))
    return f"a tensor's shape = {val!r}", "refuse"


def m_entry_type(d: Path, rng: random.Random):
    val = rng.choice(BAD_TYPES)
    _edit_entry(d, rng, lambda idx, name: idx[name].__setitem__("type", val))
    return f"a tensor's type = {val!r}", "refuse"


def m_entry_not_object(d: Path, rng: random.Random):
    val = rng.choice([5, [], None, "Q1_0", [1, 2]])
    _edit_entry(d, rng, lambda idx, name: idx.__setitem__(name, val))
    return f"a tensors entry = {val!r}", "refuse"


def m_tied_bad(d: Path, rng: random.Random):
    val = rng.choice([{"x.weight": 5}, {"x.weight": None}, {"x.weight": "nope"}, {"a": ["b"]}])
    _edit_meta(_bonsai_file(d), lambda m: m.__setitem__("tied", json.dumps(val)))
    return f"tied = {val!r}", "refuse"


def m_truncate(d: Path, rng: random.Random):
    f = _bonsai_file(d)
    size = f.stat().st_size
    cut = rng.choice([0, 4, 8, 20, rng.randrange(8, size), size - 1])
    with open(f, "r+b") as h:
        h.truncate(cut)
    return f"truncated to {cut} of {size} bytes", "refuse"


def m_header_length(d: Path, rng: random.Random):
    f = _bonsai_file(d)
    raw = bytearray(f.read_bytes())
    val = rng.choice([0, 1, 7, 2**32, 2**63, len(raw), len(raw) - 8])
    raw[:8] = struct.pack("<Q", val)
    f.write_bytes(bytes(raw))
    return f"header length field = {val}", "refuse"


def m_header_flip(d: Path, rng: random.Random):
    f = _bonsai_file(d)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    pos = 8 + rng.randrange(n)
    raw[pos] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(raw))
    return f"bit flip in header byte {pos}", "any"


def m_data_flip(d: Path, rng: random.Random):
    f = _bonsai_file(d)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    pos = 8 + n + rng.randrange(len(raw) - 8 - n)
    raw[pos] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(raw))
    return f"bit flip in data byte {pos}", "undetectable"


def m_scale_nonfinite(d: Path, rng: random.Random):
    f = _bonsai_file(d)
    header, data = _st_parts(f)
    idx = json.loads(header["__metadata__"]["tensors"])
    name = rng.choice(sorted(k for k, v in idx.items() if v["type"] == "Q1_0"))
    begin, end = header[name]["data_offsets"]
    rows, width = header[name]["shape"]
    block = rng.randrange((end - begin) // 18)
    data = bytearray(data)
    val = rng.choice([0x7C00, 0xFC00, 0x7E00])  # +inf, -inf, NaN
    data[begin + block * 18: begin + block * 18 + 2] = struct.pack("<H", val)
    _st_write(f, header, bytes(data))
    return f"{name}: scale of block {block} = {val:#x}", "refuse"


def m_tensor_removed(d: Path, rng: random.Random):
    f = _bonsai_file(d)
    kind = rng.choice(["drop", "rename", "extra", "reshape"])

    def edit(tensors, index):
        import torch
        name = rng.choice(sorted(tensors))
        if kind == "drop":
            tensors.pop(name)
            index.pop(name)
        elif kind == "rename":
            tensors[name + "_x"] = tensors.pop(name)
            index[name + "_x"] = index.pop(name)
        elif kind == "extra":
            tensors["extra.weight"] = torch.zeros(4, 4, dtype=torch.float16)
            index["extra.weight"] = {"type": "F16", "shape": [4, 4]}
        else:
            dense = sorted(k for k, v in index.items() if v["type"] != "Q1_0")
            name = rng.choice(dense)
            tensors[name] = torch.cat([tensors[name].reshape(-1)] * 2)
            index[name]["shape"] = list(tensors[name].shape)
    _rewrite_tensors(f, edit)
    return f"tensor {kind}", "refuse"


def m_weights_special(d: Path, rng: random.Random):
    kind = rng.choice(SPECIALS)
    _make_special(_bonsai_file(d), kind)
    return f"weights file is a {kind}", "refuse"


# ---------------------------------------------------------------------------------------------
# Folder-level mutations (any pipeline folder)
# ---------------------------------------------------------------------------------------------
def _index_path(d: Path) -> Path:
    return d / "model_index.json"


def m_index_not_object(d: Path, rng: random.Random):
    val = rng.choice(["[]", "null", "\"x\"", "5", "", "{", "\x00\x01garbage", "[[\"diffusers\", \"X\"]]"])
    _index_path(d).write_text(val)
    return f"model_index.json = {val!r}", "refuse"


def m_index_bad_entry(d: Path, rng: random.Random):
    index = json.loads(_index_path(d).read_text())
    comps = [k for k, v in index.items() if isinstance(v, list) and v[0]]
    comp = rng.choice(comps)
    val = rng.choice(["x", [1], ["diffusers"], [1, 2], ["diffusers", 5], ["torch", "UNet"], {"a": 1},
                      ["diffusers", "NoSuchClass"], ["transformers", "os.system"], ["diffusers", ""], 7])
    index[comp] = val
    _index_path(d).write_text(json.dumps(index))
    return f"model_index {comp} = {val!r}", "refuse"


def m_index_missing_component(d: Path, rng: random.Random):
    index = json.loads(_index_path(d).read_text())
    comps = [k for k, v in index.items() if isinstance(v, list) and v[0]]
    comp = rng.choice(comps)
    how = rng.choice(["entry", "folder"])
    if how == "entry":
        index.pop(comp)
        _index_path(d).write_text(json.dumps(index))
    else:
        shutil.rmtree(d / comp)
    # a scheduler left out of the index falls back to the family's schedule: a valid model
    return f"component {comp} missing ({how})", "any" if (comp == "scheduler" and how == "entry") else "refuse"


def m_index_class_name(d: Path, rng: random.Random):
    val = rng.choice([123, [], None, {}, "Foo", ["StableDiffusionPipeline"], True])
    index = json.loads(_index_path(d).read_text())
    index["_class_name"] = val
    for comp in ("unet", "transformer"):  # the denoiser entry would otherwise name the family
        if comp in index and rng.random() < 0.5:
            index[comp] = ["diffusers", val] if not isinstance(val, str) else index[comp]
    _index_path(d).write_text(json.dumps(index))
    return f"_class_name = {val!r}", "any"


def m_index_bonsai_entry(d: Path, rng: random.Random):
    val = rng.choice(["x", 5, [], None, {"format_version": "abc"}, {"format_version": 99}, {"quantized": 5}])
    index = json.loads(_index_path(d).read_text())
    index["_bonsai"] = val
    _index_path(d).write_text(json.dumps(index))
    return f"_bonsai = {val!r}", "any"


def _components(d: Path) -> list[str]:
    index = json.loads(_index_path(d).read_text())
    return [k for k, v in index.items() if isinstance(v, list) and v[0] and (d / k / "config.json").is_file()]


# Fields that must be positive where present, and how large any real model makes them.
CONFIG_FIELDS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                 "out_channels", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                 "layers_per_block", "norm_num_groups", "latent_channels", "block_out_channels",
                 "joint_attention_dim", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "cross_attention_dim", "patch_size", "sample_size", "timestep_guidance_channels")


def m_config_value(d: Path, rng: random.Random):
    comp = rng.choice(_components(d))
    path = d / comp / "config.json"
    cfg = json.loads(path.read_text())
    keys = [k for k in CONFIG_FIELDS if k in cfg]
    key = rng.choice(keys)
    val = rng.choice(BAD_NUMBERS)
    if isinstance(cfg[key], list):
        cfg[key] = list(cfg[key])
        i = rng.randrange(len(cfg[key]))
        cfg[key][i] = val
        what = f"{comp}/config.json {key}[{i}] = {val!r}"
    else:
        cfg[key] = val
        what = f"{comp}/config.json {key} = {val!r}"
    path.write_text(json.dumps(cfg))
    # null is the library's "use the default" for several sizes (a UNet's num_attention_heads): either
    # outcome is right, as long as it is not a raw exception
    return what, "any" if val is None else "refuse"


def m_config_broken(d: Path, rng: random.Random):
    comp = rng.choice(_components(d))
    val = rng.choice(["", "{", "[]", "null", "\"x\"", "{\"_class_name\": 5}", "\xff\xfe"])
    (d / comp / "config.json").write_text(val, errors="surrogateescape") if False else \
        (d / comp / "config.json").write_bytes(val.encode("latin-1"))
    return f"{comp}/config.json = {val!r}", "refuse"


def m_config_special(d: Path, rng: random.Random):
    comp = rng.choice(_components(d))
    kind = rng.choice(SPECIALS)
    _make_special(d / comp / "config.json", kind)
    return f"{comp}/config.json is a {kind}", "refuse"


def _dense_weight_files(d: Path) -> list[Path]:
    out = []
    for comp in ("vae", "text_encoder"):
        for f in sorted((d / comp).glob("*.safetensors")):
            from bonsai_core.checkpoint import is_bonsai_file
            if not is_bonsai_file(f):
                out.append(f)
    return out


def m_dense_coverage(d: Path, rng: random.Random):
    f = rng.choice(_dense_weight_files(d))
    kind = rng.choice(["drop", "rename", "extra", "reshape", "empty"])

    def edit(tensors, index):
        import torch
        name = rng.choice(sorted(tensors))
        if kind == "drop":
            tensors.pop(name)
        elif kind == "rename":
            tensors["renamed." + name] = tensors.pop(name)
        elif kind == "extra":
            tensors["extra_layer.weight"] = torch.zeros(4, 4)
        elif kind == "reshape":
            t = tensors[name]
            tensors[name] = torch.zeros(t.numel() + 1, dtype=t.dtype)
        else:
            tensors.clear()
    if kind == "empty":
        header, _ = _st_parts(f)
        _st_write(f, {"__metadata__": header.get("__metadata__", {"format": "pt"})}, b"")
    else:
        _rewrite_tensors(f, edit)
    return f"{f.parent.name}/{f.name}: {kind}", "refuse"


def m_dense_special(d: Path, rng: random.Random):
    f = rng.choice(_dense_weight_files(d))
    kind = rng.choice(SPECIALS)
    _make_special(f, kind)
    return f"{f.parent.name}/{f.name} is a {kind}", "refuse"


def _tokenizer_dir(d: Path) -> Path:
    for p in (d / "tokenizer", d / "parts" / "tokenizer", d / "text_encoder-hqq-4bit" / "tokenizer"):
        if p.is_dir():
            return p
    raise FileNotFoundError(d)


def m_tokenizer(d: Path, rng: random.Random):
    tok = _tokenizer_dir(d)
    files = sorted(p for p in tok.iterdir() if p.is_file())
    kind = rng.choice(["empty", "broken", "max_length", "template", "class", "pickle_entry", "special", "list"])
    cfg_path = tok / "tokenizer_config.json"
    expect = "refuse"
    if kind == "empty":
        f = rng.choice(files)
        f.write_bytes(b"")
        what = f"{f.name} emptied"
    elif kind == "broken":
        f = rng.choice([p for p in files if p.suffix == ".json"] or files)
        f.write_text("{\"model\": ")
        what = f"{f.name} broken JSON"
    elif kind == "list":
        f = rng.choice([p for p in files if p.suffix == ".json"] or files)
        f.write_text("[1, 2]")
        what = f"{f.name} a JSON list"
    elif kind == "max_length":
        val = rng.choice([0, -1, 10**30, "abc", None, 1.5, True])
        _edit_json(cfg_path, lambda c: {**c, "model_max_length": val})
        what = f"model_max_length = {val!r}"
        expect = "any" if val is None else "refuse"
    elif kind == "template":
        val = rng.choice(["{% for m in messages %}{{ m", "{{ raise_exception('x') }}", "{% if %}", 5, []])
        if (tok / "chat_template.jinja").is_file() and rng.random() < 0.5:
            (tok / "chat_template.jinja").write_text(str(val))
        else:
            (tok / "chat_template.jinja").unlink(missing_ok=True)
            _edit_json(cfg_path, lambda c: {**c, "chat_template": val})
        what = f"chat template = {val!r}"
        if d.name.startswith("sd"):
            expect = "any"  # SD never uses a chat template
    elif kind == "class":
        val = rng.choice(["TransfoXLTokenizer", "os.system", 5, "NoSuchTokenizer", "PreTrainedTokenizerFast", None])
        _edit_json(cfg_path, lambda c: {**c, "tokenizer_class": val})
        what = f"tokenizer_class = {val!r}"
        expect = "any"
    elif kind == "pickle_entry":
        (tok / "vocab.bin").write_bytes(b"\x80\x04K\x01.")
        key = rng.choice(["vocab_file", "tokenizer_file", "pretrained_vocab_file", "merges_file"])
        _edit_json(cfg_path, lambda c: {**c, key: "vocab.bin"})
        what = f"tokenizer_config {key} = vocab.bin"
    else:
        f = rng.choice(files)
        k = rng.choice(SPECIALS)
        _make_special(f, k)
        what = f"{f.name} is a {k}"
    return what, expect


def _scheduler_cfg(d: Path) -> Path:
    for p in (d / "scheduler" / "scheduler_config.json", d / "parts" / "scheduler" / "scheduler_config.json"):
        if p.is_file():
            return p
    raise FileNotFoundError(d)


def m_scheduler(d: Path, rng: random.Random):
    p = _scheduler_cfg(d)
    cfg = json.loads(p.read_text())
    choices = [("whole", v) for v in ("[]", "null", "", "{", "5")]
    choices += [("num_train_timesteps", v) for v in (0, -5, 10**12, "x", 1.5, None)]
    if "beta_start" in cfg:
        choices += [("beta_start", v) for v in (-1, 0.5, 2, "x", None)]
        choices += [("beta_end", v) for v in (-0.1, 0, 1.5, 0.0001)]
        choices += [("beta_schedule", v) for v in ("bogus", 5)]
    if "shift" in cfg:
        choices += [("shift", v) for v in (0, -1, "x", None)] + [("base_shift", "x"), ("max_shift", None)]
        choices += [("max_image_seq_len", v) for v in (0, -1)]
    choices += [("_class_name", v) for v in (5, "NoSuchScheduler", None)]
    key, val = rng.choice(choices)
    if key == "whole":
        p.write_text(val)
    else:
        cfg[key] = val
        p.write_text(json.dumps(cfg))
    return f"scheduler {key} = {val!r}", "refuse"


def m_settings(d: Path, rng: random.Random):
    p = d / "bonsai.json"
    val = rng.choice(["[]", "5", "{", "", json.dumps({"text_encoder_out_layers": [99]}),
                      json.dumps({"text_encoder_out_layers": "abc"}), json.dumps({"text_encoder_out_layers": []}),
                      json.dumps({"text_encoder_out_layers": [1.5, 2]}), json.dumps({"text_encoder_out_layers": None}),
                      json.dumps({"text_encoder_out_layers": [-99]}), json.dumps({"text_encoder_out_layers": [True]})])
    p.write_text(val)
    return f"bonsai.json = {val!r}", "refuse"


def m_vae_config(d: Path, rng: random.Random):
    p = d / "vae" / "config.json"
    if not p.is_file():
        p = d / "parts" / "vae" / "config.json"
    cfg = json.loads(p.read_text())
    key, val = rng.choice([("scaling_factor", v) for v in (0, -1, 0.0, "x", None, 1e309)]
                          + [("batch_norm_eps", v) for v in (-1e-4, -1, "x")]
                          + [("shift_factor", "x"), ("norm_num_groups", 0), ("norm_num_groups", 7)])
    if key not in cfg and key == "batch_norm_eps":
        key = "norm_num_groups"
        val = 0
    cfg[key] = val
    p.write_text(json.dumps(cfg))
    return f"vae {key} = {val!r}", "refuse"


# ---------------------------------------------------------------------------------------------
# GGUF mutations (klein_gguf)
# ---------------------------------------------------------------------------------------------
def _gguf_table(path: Path):
    """Parse our fixture's GGUF (v3, string kvs) into (raw bytes, list of (name, ne, type, offset, field_pos),
    data start)."""
    raw = path.read_bytes()
    _magic, _ver, n_t, n_kv = struct.unpack("<4sIQQ", raw[:24])
    pos = 24
    for _ in range(n_kv):
        (kl,) = struct.unpack("<Q", raw[pos:pos + 8])
        pos += 8 + kl
        (vt,) = struct.unpack("<I", raw[pos:pos + 4])
        pos += 4
        assert vt == 8
        (vl,) = struct.unpack("<Q", raw[pos:pos + 8])
        pos += 8 + vl
    entries = []
    for _ in range(n_t):
        start = pos
        (nl,) = struct.unpack("<Q", raw[pos:pos + 8])
        name = raw[pos + 8:pos + 8 + nl].decode()
        pos += 8 + nl
        (nd,) = struct.unpack("<I", raw[pos:pos + 4])
        pos += 4
        ne = list(struct.unpack(f"<{nd}Q", raw[pos:pos + 8 * nd]))
        pos += 8 * nd
        ttype, off = struct.unpack("<IQ", raw[pos:pos + 12])
        entries.append({"name": name, "ne": ne, "type": ttype, "offset": off, "start": start, "ne_pos": pos - 8 * nd,
                        "type_pos": pos, "off_pos": pos + 4})
        pos += 12
    data_start = pos + ((-pos) % 32)
    return bytearray(raw), entries, data_start


def m_gguf(d: Path, rng: random.Random):
    p = _gguf_src(d)
    raw, entries, data_start = _gguf_table(p)
    kind = rng.choice(["truncate", "version", "n_tensors", "n_kv", "zero_dim", "huge_dim", "n_dims", "out_of_file",
                       "overlap", "scale_nan", "type_id", "name_len", "dup_name", "flip_header", "flip_data",
                       "special", "ne0_partial"])
    e = rng.choice(entries)
    q1 = [x for x in entries if x["type"] == 41]
    expect = "refuse"
    if kind == "truncate":
        cut = rng.choice([0, 3, 10, 24, rng.randrange(24, data_start), rng.randrange(data_start, len(raw))])
        raw = raw[:cut]
        what = f"truncated to {cut}"
    elif kind == "version":
        val = rng.choice([0, 1, 4, 99, 2**31])
        raw[4:8] = struct.pack("<I", val)
        what = f"version {val}"
        expect = "any" if val in (2,) else "refuse"
    elif kind == "n_tensors":
        val = rng.choice([0, len(entries) + 1, 2**40, 2**63])
        raw[8:16] = struct.pack("<Q", val)
        what = f"n_tensors {val}"
    elif kind == "n_kv":
        val = rng.choice([2**40, 2**63, 1000])
        raw[16:24] = struct.pack("<Q", val)
        what = f"n_kv {val}"
    elif kind == "zero_dim":
        i = rng.randrange(len(e["ne"]))
        raw[e["ne_pos"] + 8 * i: e["ne_pos"] + 8 * i + 8] = struct.pack("<Q", 0)
        what = f"{e['name']} ne[{i}] = 0"
    elif kind == "huge_dim":
        i = rng.randrange(len(e["ne"]))
        val = rng.choice([2**31, 2**40, 2**62, 2**64 - 1])
        raw[e["ne_pos"] + 8 * i: e["ne_pos"] + 8 * i + 8] = struct.pack("<Q", val)
        what = f"{e['name']} ne[{i}] = {val}"
    elif kind == "n_dims":
        val = rng.choice([0, 5, 100, 2**31])
        raw[e["ne_pos"] - 4: e["ne_pos"]] = struct.pack("<I", val)
        what = f"{e['name']} n_dims = {val}"
    elif kind == "out_of_file":
        val = rng.choice([len(raw), 2**40, 2**63])
        raw[e["off_pos"]: e["off_pos"] + 8] = struct.pack("<Q", val)
        what = f"{e['name']} offset = {val}"
    elif kind == "overlap":
        other = rng.choice([x for x in entries if x is not e])
        raw[e["off_pos"]: e["off_pos"] + 8] = struct.pack("<Q", other["offset"])
        what = f"{e['name']} data at {other['name']}'s offset"
    elif kind == "scale_nan":
        e = rng.choice(q1)
        rows = e["ne"][1]
        nb = e["ne"][0] // 128
        blk = rng.randrange(rows * nb)
        pos = data_start + e["offset"] + 18 * blk
        raw[pos:pos + 2] = struct.pack("<H", rng.choice([0x7C00, 0xFC00, 0x7E01]))
        what = f"{e['name']} block {blk} scale non-finite"
    elif kind == "type_id":
        val = rng.choice([2, 3, 12, 42, 99, 2**31, 40])
        raw[e["type_pos"]: e["type_pos"] + 4] = struct.pack("<I", val)
        what = f"{e['name']} type {val}"
    elif kind == "name_len":
        val = rng.choice([0, 2**40, 2**63, 10**6])
        raw[e["start"]: e["start"] + 8] = struct.pack("<Q", val)
        what = f"{e['name']} name length {val}"
    elif kind == "dup_name":
        other = rng.choice([x for x in entries if x is not e and len(x["name"]) == len(e["name"])] or [e])
        if other is e:
            return m_gguf(d, rng)
        raw[other["start"] + 8: other["start"] + 8 + len(e["name"])] = e["name"].encode()
        what = f"{other['name']} renamed {e['name']}"
    elif kind == "flip_header":
        pos = rng.randrange(24, data_start)
        raw[pos] ^= 1 << rng.randrange(8)
        what = f"bit flip in header byte {pos}"
        expect = "any"
    elif kind == "flip_data":
        pos = rng.randrange(data_start, len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        what = f"bit flip in data byte {pos}"
        expect = "undetectable"
    elif kind == "special":
        k = rng.choice(SPECIALS)
        _make_special(p, k)
        return f"gguf is a {k}", "refuse"
    else:
        e = rng.choice(q1)
        val = e["ne"][0] - rng.choice([1, 64, 127])
        raw[e["ne_pos"]: e["ne_pos"] + 8] = struct.pack("<Q", val)
        what = f"{e['name']} ne[0] = {val} (not whole groups)"
    p.write_bytes(bytes(raw))
    return what, expect


# ---------------------------------------------------------------------------------------------
# MLX / gemlite
# ---------------------------------------------------------------------------------------------
def m_mlx(d: Path, rng: random.Random):
    f = d / "transformer-packed-mflux" / "diffusion_pytorch_model.safetensors"
    kind = rng.choice(["cut_width", "cut_scales", "drop", "dtype", "truncate", "qcfg", "special"])
    if kind == "truncate":
        size = f.stat().st_size
        with open(f, "r+b") as h:
            h.truncate(rng.randrange(size))
        return "truncated", "refuse"
    if kind == "special":
        k = rng.choice(SPECIALS)
        _make_special(f, k)
        return f"weights are a {k}", "refuse"
    if kind == "qcfg":
        q = d / "transformer-packed-mflux" / "quantization_config.json"
        val = rng.choice(["", "[]", "{\"bits\": 3}", "{\"group_size\": 0}", "{\"group_size\": 100}", "{\"bits\": \"x\"}"])
        q.write_text(val)
        return f"quantization_config = {val!r}", "any"

    def edit(tensors, index):
        import torch
        names = sorted(n for n in tensors if n.endswith(".scales")) if kind == "cut_scales" else \
            sorted(n for n in tensors if n.endswith(".weight") and tensors[n].dtype == torch.uint32) or sorted(tensors)
        name = rng.choice(names or sorted(tensors))
        t = tensors[name]
        if kind in ("cut_width", "cut_scales"):
            tensors[name] = t[..., : max(t.shape[-1] - 1, 0)].contiguous() if t.dim() else t
        elif kind == "drop":
            tensors.pop(name)
        else:
            tensors[name] = t.to(torch.float32) if t.dtype != torch.float32 else t.to(torch.int16)
    _rewrite_tensors(f, edit)
    return f"mlx {kind}", "refuse"


def m_gemlite(d: Path, rng: random.Random):
    import torch

    g = d / "transformer-gemlite-int1"
    f = g / "state_dict.pt"
    kind = rng.choice(["cut", "drop", "truncate", "qcfg", "special", "not_dict"])
    if kind == "truncate":
        size = f.stat().st_size
        with open(f, "r+b") as h:
            h.truncate(rng.randrange(size))
        return "truncated", "refuse"
    if kind == "special":
        k = rng.choice(SPECIALS)
        _make_special(f, k)
        return f"state_dict.pt is a {k}", "refuse"
    if kind == "qcfg":
        val = rng.choice(["", "[]", "{\"w_nbits\": 3}", "{\"group_size\": 0}", "5"])
        (g / "quantization_config.json").write_text(val)
        return f"quantization_config = {val!r}", "any"
    sd = torch.load(f, weights_only=True)
    if kind == "not_dict":
        torch.save([1, 2], f)
        return "state_dict.pt holds a list", "refuse"
    name = rng.choice(sorted(k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.dim() >= 1))
    if kind == "cut":
        t = sd[name]
        sd[name] = t[..., : max(t.shape[-1] - 1, 0)].contiguous()
    else:
        sd.pop(name)
    torch.save(sd, f)
    return f"gemlite {kind} {name}", "refuse"


# kind -> (base, entry points, mutation)
BONSAI_EPS = ("read_tensors", "info", "engine")
MUTATIONS = {}
for _base in ("sd_bonsai", "klein_bonsai"):
    _eps = BONSAI_EPS + (("export",) if _base == "klein_bonsai" else ())
    for _kind, _fn in [("meta_wrong_json", m_meta_wrong_json), ("meta_missing_key", m_meta_missing_key),
                       ("meta_bad_version", m_meta_bad_version), ("entry_shape", m_entry_shape),
                       ("entry_type", m_entry_type), ("entry_not_object", m_entry_not_object), ("tied_bad", m_tied_bad),
                       ("truncate", m_truncate), ("header_length", m_header_length), ("header_flip", m_header_flip),
                       ("data_flip", m_data_flip), ("scale_nonfinite", m_scale_nonfinite),
                       ("tensor_set", m_tensor_removed), ("weights_special", m_weights_special)]:
        MUTATIONS[f"{_base}:{_kind}"] = (_base, _eps, _fn)
    for _kind, _fn in [("index_not_object", m_index_not_object), ("index_bad_entry", m_index_bad_entry),
                       ("index_missing_component", m_index_missing_component),
                       ("index_class_name", m_index_class_name), ("index_bonsai_entry", m_index_bonsai_entry),
                       ("config_value", m_config_value), ("config_broken", m_config_broken),
                       ("config_special", m_config_special), ("dense_coverage", m_dense_coverage),
                       ("dense_special", m_dense_special), ("tokenizer", m_tokenizer), ("scheduler", m_scheduler),
                       ("vae_config", m_vae_config)]:
        MUTATIONS[f"{_base}:{_kind}"] = (_base, ("info", "engine"), _fn)
MUTATIONS["klein_bonsai:settings"] = ("klein_bonsai", ("engine",), m_settings)
for _kind, _fn in [("index_not_object", m_index_not_object), ("index_bad_entry", m_index_bad_entry),
                   ("index_missing_component", m_index_missing_component), ("config_value", m_config_value),
                   ("config_broken", m_config_broken), ("dense_coverage", m_dense_coverage),
                   ("dense_special", m_dense_special)]:
    MUTATIONS[f"sd_src:{_kind}"] = ("sd_src", ("convert", "info"), _fn)
MUTATIONS["klein_gguf:gguf"] = ("klein_gguf", ("read_gguf", "import"), m_gguf)
for _kind, _fn in [("tokenizer", m_tokenizer), ("dense_coverage", None), ("vae_config", m_vae_config)]:
    pass
MUTATIONS["mlx_repo:mlx"] = ("mlx_repo", ("import",), m_mlx)
MUTATIONS["gemlite_repo:gemlite"] = ("gemlite_repo", ("import",), m_gemlite)


def _gguf_parts_mutation(fn):
    def run(d: Path, rng: random.Random):
        return fn(d / "parts", rng)
    return run


def _m_parts_tokenizer(d, rng):
    return m_tokenizer(d, rng)


MUTATIONS["klein_gguf:parts_tokenizer"] = ("klein_gguf", ("import",), _m_parts_tokenizer)
MUTATIONS["klein_gguf:parts_vae_config"] = ("klein_gguf", ("import",), m_vae_config)


def _m_parts_dense(d, rng):
    return m_dense_coverage(d / "parts", rng)


def _m_parts_config(d, rng):
    comp = rng.choice(["vae", "text_encoder"])
    path = d / "parts" / comp / "config.json"
    cfg = json.loads(path.read_text())
    key = rng.choice([k for k in CONFIG_FIELDS if k in cfg])
    val = rng.choice(BAD_NUMBERS)
    cfg[key] = val if not isinstance(cfg[key], list) else [val] + cfg[key][1:]
    path.write_text(json.dumps(cfg))
    return f"parts/{comp}/config.json {key} = {val!r}", "any" if val is None else "refuse"


MUTATIONS["klein_gguf:parts_dense"] = ("klein_gguf", ("import",), _m_parts_dense)
MUTATIONS["klein_gguf:parts_config"] = ("klein_gguf", ("import",), _m_parts_config)


# ---------------------------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: int
    kind: str
    entry: str
    detail: str
    expect: str
    result: str         # refused | loaded | raw | hang | memory | setup
    message: str = ""
    seconds: float = 0.0

    @property
    def bad(self) -> bool:
        return self.result in ("raw", "hang", "memory", "setup") or (self.result == "loaded" and self.expect == "refuse")

    @property
    def label(self) -> str:
        if self.result == "loaded":
            return {"refuse": "silent", "undetectable": "undetectable", "any": "benign"}[self.expect]
        return self.result


def _is_memory_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower() \
        or "std::bad_alloc" in text


def _run_child(fn, case_dir: Path, scratch: Path, base: str, timeout: float, mem_bytes: int) -> tuple[str, str]:
    from bonsai_core.errors import BonsaiError

    class _Timeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    if mem_bytes:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            vsize = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vsize + mem_bytes, hard))
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        fn(case_dir, scratch, base)
        return "loaded", ""
    except _Timeout:
        return "hang", "".join(traceback.format_exc().splitlines(True)[-6:])
    except BonsaiError as exc:
        return "refused", f"{type(exc).__name__}: {exc}"[:600]
    except BaseException as exc:  # noqa: BLE001 - every other exception is what we count
        if _is_memory_error(exc):
            return "memory", f"{type(exc).__name__}: {str(exc)[:300]}"
        tb = traceback.extract_tb(exc.__traceback__)
        where = " <- ".join(f"{Path(fr.filename).name}:{fr.lineno}" for fr in reversed(tb[-4:]))
        return "raw", f"{type(exc).__name__}: {str(exc)[:300]} @ {where}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_case(bases: dict[str, Path], work: Path, case: int, kind: str, entry: str, seed: int,
             timeout: float = 30.0, mem_bytes: int = 3 * 2**30) -> Outcome:
    """Copy the base, mutate it, run ``entry`` in a forked child; the parent enforces a hard timeout."""
    base, _eps, mutate = MUTATIONS[kind]
    rng = random.Random(f"{seed}:{case}:{kind}")
    case_dir = work / f"case{case}" / base
    scratch = work / f"case{case}" / "scratch"
    shutil.rmtree(work / f"case{case}", ignore_errors=True)
    shutil.copytree(bases[base], case_dir, symlinks=True)
    scratch.mkdir(parents=True)
    try:
        detail, expect = mutate(case_dir, rng)
        if entry == "read_tensors" and kind.endswith(":tensor_set"):
            expect = "any"  # a file alone cannot say which tensors its model has; the loader checks that
    except Exception as exc:  # noqa: BLE001 - a mutation that does not apply to this base
        shutil.rmtree(work / f"case{case}", ignore_errors=True)
        return Outcome(case, kind, entry, f"mutation failed: {exc!r}", "any", "setup")
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        fork_safe_child()
        os.close(r)
        try:
            result, message = _run_child(ENTRY_POINTS[entry], case_dir, scratch, base, timeout, mem_bytes)
        except BaseException as exc:  # noqa: BLE001
            result, message = "raw", repr(exc)
        with os.fdopen(w, "w") as f:
            f.write(json.dumps([result, message]))
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout + 15
    data = b""
    eof = False
    import select
    with os.fdopen(r, "rb") as f:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([f], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                break
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                eof = True
                break
            data += chunk
    done, status = os.waitpid(pid, 0 if eof else os.WNOHANG)
    if done == 0:  # still running past the hard deadline: a hang the alarm could not interrupt
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        result, message = "hang", "killed by the parent (blocked in C code)"
    else:
        try:
            result, message = json.loads(data.decode() or "null") or ("raw", f"child died, status {status}")
        except ValueError:
            result, message = "raw", f"child wrote {data[:200]!r}"
        if not data:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            result, message = ("memory" if sig == signal.SIGKILL else "raw"), f"child died, status {status}"
    shutil.rmtree(work / f"case{case}", ignore_errors=True)
    return Outcome(case, kind, entry, detail, expect, result, message, time.perf_counter() - t0)


# kinds with many sub-kinds inside get more cases (the GGUF mutation alone has 17)
WEIGHTS = {"gguf": 10, "mlx": 3, "gemlite": 3, "tokenizer": 2, "parts_tokenizer": 2, "parts_dense": 2}


def plan(n_cases: int, seed: int, kinds: list[str] | None = None) -> list[tuple[int, str, str]]:
    """``n_cases`` (case, kind, entry) triples, cycling through every kind and its entry points so a short
    run still covers each kind; the order is fixed by ``seed``."""
    kinds = sorted(kinds or MUTATIONS)
    pairs = [(k, e) for k in kinds for e in MUTATIONS[k][1] for _ in range(WEIGHTS.get(k.split(":")[1], 1))]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    return [(i, *pairs[i % len(pairs)]) for i in range(n_cases)]


def warm_up(bases: dict[str, Path], work: Path) -> None:
    """Import and run every entry point once on the intact bases in this process, so the forked
    children find diffusers, transformers and their lazy modules already imported (seconds per case
    otherwise). An intact base must load: anything else is a failure of the harness."""
    import contextlib
    import io

    scratch = work / "warm"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    done = set()
    with contextlib.redirect_stderr(io.StringIO()):
        for kind, (base, eps, _fn) in sorted(MUTATIONS.items()):
            for ep in eps:
                if (base, ep) in done:
                    continue
                done.add((base, ep))
                shutil.rmtree(scratch / "out", ignore_errors=True)
                (scratch / "out.gguf").unlink(missing_ok=True)
                ENTRY_POINTS[ep](bases[base], scratch, base)
    shutil.rmtree(scratch, ignore_errors=True)


def run_campaign(bases: dict[str, Path], work: Path, n_cases: int, seed: int = 0, timeout: float = 30.0,
                 kinds: list[str] | None = None, log=None) -> list[Outcome]:
    import torch

    torch.set_num_threads(1)
    warm_up(bases, work)
    out = []
    for case, kind, entry in plan(n_cases, seed, kinds):
        o = run_case(bases, work, case, kind, entry, seed, timeout=timeout)
        out.append(o)
        if log is not None:
            log(o)
    return out


def summary(outcomes: list[Outcome]) -> str:
    from collections import Counter, defaultdict

    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind.split(":")[1]][o.label] += 1
    labels = ["refused", "undetectable", "benign", "silent", "raw", "hang", "memory", "setup"]
    lines = [f"{'kind':<26}" + "".join(f"{lab:>13}" for lab in labels)]
    total = Counter()
    for kind in sorted(by_kind):
        c = by_kind[kind]
        total.update(c)
        lines.append(f"{kind:<26}" + "".join(f"{c[lab]:>13}" for lab in labels))
    lines.append(f"{'TOTAL':<26}" + "".join(f"{total[lab]:>13}" for lab in labels))
    ep = Counter(o.entry for o in outcomes)
    lines.append("entry points: " + ", ".join(f"{k} {v}" for k, v in sorted(ep.items())))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tests.fuzz_harness N [seed]
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    root = Path(os.environ.get("BONSAI_FUZZ_DIR", "/tmp/bonsai-fuzz"))
    bases = build_bases(root / "bases")
    kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else None

    def log(o):
        if o.bad:
            print(f"[{o.case}] {o.kind} {o.entry}: {o.detail} -> {o.label}: {o.message}", flush=True)
    outs = run_campaign(bases, root / "work", n, seed, kinds=kinds, log=log)
    print(summary(outs))
