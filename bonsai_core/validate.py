"""Checks every file of a model folder before anything is built from it.

Each function reads only what it checks (JSON files, safetensors headers, never tensor data) and
raises a ``BonsaiCheckpointError`` naming the file, the key, the value and what to do. The loader
(``loader.py``), ``bonsai info``, ``convert`` and the importers call them, so a file that one entry
point refuses is refused by all, and nothing is allocated from a value that was not checked first.

Why our own checks and not the libraries': diffusers and transformers trust their configs (a
``num_layers`` of 1e9 builds 1e9 blocks, a zero group count divides by zero), open whatever path
they are given (a FIFO blocks forever) and fill weights a file lacks with random values (a warning,
not an error). The checks here are bounds and types, each from what a real model can hold.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import BonsaiCheckpointError

MAX_JSON_BYTES = 64 * 2**20  # the largest tokenizer.json of a real model is ~30 MB
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")

# Config fields that give a size, and the most any real model holds (the largest public SD, FLUX
# and Qwen3 configs are far below each bound). A size must be a whole number >= 1 (or null where
# the library allows it); anything beyond the bound is refused before a module is built.
LAYER_FIELDS = {"num_layers", "num_single_layers", "num_hidden_layers", "layers_per_block",
                "transformer_layers_per_block", "num_decoder_layers", "num_encoder_layers"}
SIZE_BOUNDS = {
    **{k: 1024 for k in LAYER_FIELDS},
    "vocab_size": 1 << 21, "max_position_embeddings": 1 << 24, "intermediate_size": 1 << 18,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "attention_head_dim": 4096, "head_dim": 4096,
    "hidden_size": 1 << 16, "in_channels": 1 << 16, "out_channels": 1 << 16, "latent_channels": 1 << 12,
    "block_out_channels": 1 << 16, "norm_num_groups": 1 << 12, "cross_attention_dim": 1 << 16,
    "joint_attention_dim": 1 << 16, "projection_dim": 1 << 16, "patch_size": 64, "sample_size": 1 << 14,
    "timestep_guidance_channels": 1 << 16, "pooled_projection_dim": 1 << 16,
    "num_channels": 1 << 16, "image_size": 1 << 16, "encoder_hid_dim": 1 << 16,
}
POSITIVE_FLOAT_FIELDS = ("norm_eps", "rms_norm_eps", "layer_norm_eps", "eps", "batch_norm_eps", "scaling_factor",
                         "rope_theta", "theta")
TOKENIZER_CLASSES = {"CLIPTokenizer", "CLIPTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast",
                     "T5Tokenizer", "T5TokenizerFast", "PreTrainedTokenizerFast", "AutoTokenizer",
                     "LlamaTokenizer", "LlamaTokenizerFast", "GemmaTokenizer", "GemmaTokenizerFast"}
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit set" value of model_max_length
MAX_TOKENS = 1 << 20


def fail(path, what: str, fix: str | None = None) -> BonsaiCheckpointError:
    return BonsaiCheckpointError(f"{path}: {what}" + (f"; {fix}" if fix else ""))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def check_regular_file(path, what: str = "file") -> int:
    """``path`` is a plain file (not a FIFO, socket, device, folder or dangling link): its size.
    Checked with ``stat`` only, so a FIFO is never opened (opening one blocks until a writer comes)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise fail(path, f"{what} not found" + (" (a link to a missing file)" if path.is_symlink() else "")) from None
    except OSError as exc:
        raise fail(path, f"{what} cannot be read ({exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or special file")
        raise fail(path, f"expected a {what}, found {kind}", "replace it with the real file")
    return st.st_size


def check_folder_entries(folder, what: str) -> None:
    """Every entry of ``folder`` is a plain file or a folder: a library reading the folder never
    opens a FIFO, socket or device, and never follows a dangling link."""
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(folder, f"the {what} folder is missing (or is not a folder)")
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink() and p.suffix.lower() not in FILE_SUFFIXES:
            continue  # a sub-folder (a repo's tokenizer/ inside text_encoder/, say)
        check_regular_file(p, f"{what} file")


FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model", ".gguf", ".pt", ".bin")


def read_json_file(path, what: str = "JSON file", *, kind: type = dict):
    """Read a JSON file of the given top-level ``kind`` (checked as a plain file, bounded in size)."""
    path = Path(path)
    size = check_regular_file(path, what)
    if size == 0:
        raise fail(path, f"the {what} is empty", "restore it from the model's original files")
    if size > MAX_JSON_BYTES:
        raise fail(path, f"the {what} is {size} bytes, more than any real one ({MAX_JSON_BYTES})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise fail(path, f"the {what} is not valid JSON ({exc})", "restore it from the model's original files") \
            from None
    if not isinstance(data, kind):
        raise fail(path, f"the {what} holds a JSON {type(data).__name__}, expected a JSON "
                         f"{'object' if kind is dict else kind.__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# model_index.json
# ---------------------------------------------------------------------------------------------
def check_model_index(index, path) -> dict:
    """``model_index.json``: an object whose ``_class_name`` is a string and whose component entries
    are ``[library, class]`` pairs of strings (or ``[null, null]``: a component left out)."""
    if not isinstance(index, dict):
        raise fail(path, f"holds a JSON {type(index).__name__}, expected an object")
    cls = index.get("_class_name")
    if cls is not None and not isinstance(cls, str):
        raise fail(path, f"_class_name is {cls!r}, expected a pipeline class name such as 'StableDiffusionPipeline'")
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if name in KNOWN_COMPONENTS and not isinstance(entry, list):
            raise fail(path, f"component {name!r} is {entry!r}, expected a [library, class] pair such as "
                             "[\"diffusers\", \"AutoencoderKL\"] (or [null, null])")
        if isinstance(entry, list):
            ok = len(entry) == 2 and (entry == [None, None] or all(isinstance(v, str) and v for v in entry))
            if not ok:
                raise fail(path, f"component {name!r} is {entry!r}, expected a [library, class] pair such as "
                                 "[\"diffusers\", \"AutoencoderKL\"] (or [null, null])")
            if entry[0] is not None and not _is_component_name(name):
                raise fail(path, f"component name {name!r} is not a folder name")
    bonsai = index.get("_bonsai")
    if bonsai is not None:
        if not isinstance(bonsai, dict):
            raise fail(path, f"_bonsai is {bonsai!r}, expected an object written by `bonsai convert`/`import`")
        v = bonsai.get("format_version")
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise fail(path, f"_bonsai.format_version is {v!r}, expected a whole number >= 1")
        from .checkpoint import FORMAT_VERSION
        if v > FORMAT_VERSION:
            raise fail(path, f"_bonsai.format_version {v} is newer than this ComfyUI-Bonsai reads ({FORMAT_VERSION})",
                       "upgrade comfyui-bonsai")
        q = bonsai.get("quantized", [])
        if not (isinstance(q, list) and all(isinstance(x, str) for x in q)):
            raise fail(path, f"_bonsai.quantized is {q!r}, expected a list of component names")
    return index


KNOWN_COMPONENTS = {"unet", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                    "scheduler", "safety_checker", "feature_extractor", "image_encoder"}


def _is_component_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def components(index: dict) -> dict[str, list]:
    """The components a checked index names (entries with a library)."""
    return {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}


def check_required(index: dict, folder, required: tuple[str, ...]) -> None:
    folder = Path(folder)
    comps = components(index)
    missing = [c for c in required if c not in comps]
    if missing:
        raise fail(folder / "model_index.json", f"names no {', '.join(missing)} component",
                   "the model folder is incomplete: convert or import it again")
    for name in required:
        library = comps[name][0]
        if library not in ("diffusers", "transformers"):
            raise fail(folder / "model_index.json", f"component {name!r} comes from library {library!r}; "
                                                    "expected diffusers or transformers")
    for name in comps:
        if not (folder / name).is_dir():
            raise fail(folder, f"model_index.json names component {name!r} but the folder {folder / name} is missing")


# ---------------------------------------------------------------------------------------------
# Component config.json
# ---------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config_values(cfg: dict, path) -> dict:
    """Sizes are whole numbers from 1 to a bound no real model reaches; epsilons and scales are
    finite and positive. Refused from the config alone, before any module is built."""
    for key, bound in SIZE_BOUNDS.items():
        if key not in cfg or cfg[key] is None:
            continue
        value = cfg[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not value:
            raise fail(path, f"{key} is an empty list", "restore the model's config.json")
        for v in values:
            if not _is_int(v) or not 1 <= v <= bound:
                raise fail(path, f"{key} is {value!r}; expected a whole number from 1 to {bound}"
                                 f"{' (per entry)' if isinstance(value, (list, tuple)) else ''}",
                           "the config is corrupt: restore the model's config.json")
    v = cfg.get("mlp_ratio")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 64):
        raise fail(path, f"mlp_ratio is {v!r}; expected a number above 0, at most 64")
    for key in POSITIVE_FLOAT_FIELDS:
        if key in cfg:  # present means used: null is as broken as 0 (SD multiplies latents by scaling_factor)
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise fail(path, f"{key} is {v!r}; expected a finite number > 0")
    if "shift_factor" in cfg and cfg["shift_factor"] is not None:
        v = cfg["shift_factor"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise fail(path, f"shift_factor is {v!r}; expected a finite number (or null)")
    groups, chans = cfg.get("norm_num_groups"), cfg.get("block_out_channels")
    if _is_int(groups) and isinstance(chans, (list, tuple)):
        bad = [c for c in chans if _is_int(c) and c % groups]
        if bad:
            raise fail(path, f"block_out_channels {list(chans)} are not all divisible by norm_num_groups {groups}")
    return cfg


def read_component_config(component_dir, name: str = "config.json") -> dict:
    path = Path(component_dir) / name
    cfg = read_json_file(path, "component config")
    if not cfg:
        raise fail(path, "the component config is an empty object", "restore the model's config.json")
    cls = cfg.get("_class_name")
    if cls is not None and not isinstance(cls, str):
        raise fail(path, f"_class_name is {cls!r}, expected a class name")
    return check_config_values(cfg, path)


# ---------------------------------------------------------------------------------------------
# Weights: headers only
# ---------------------------------------------------------------------------------------------
def weight_files(component_dir) -> list[Path]:
    """The component's ``.safetensors`` files, each checked to be a plain file (never a FIFO)."""
    d = Path(component_dir)
    files = sorted(d.glob("*.safetensors"))
    for f in files:
        check_regular_file(f, "weights file")
    return files


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every file, from the headers (offsets checked against the file size)."""
    from .importers import read_safetensors_header

    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        header, _ = read_safetensors_header(f)
        for name, info in header.items():
            if name in out:
                raise fail(f, f"tensor {name!r} is stored twice (also in another file of the folder)")
            out[name] = tuple(int(s) for s in info["shape"])
    return out


def skeleton_shapes(model) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The state-dict shapes of a (meta-device) model, and the names tied to an earlier name (the very
    same parameter object: stored once, like ``lm_head.weight`` with tied embeddings)."""
    shapes: dict[str, tuple[int, ...]] = {}
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        shapes[name] = tuple(t.shape)
        if id(t) in first:
            tied[name] = first[id(t)]
        else:
            first[id(t)] = name
    # transformers declares its ties (a meta skeleton does not always share the parameter object yet)
    declared = getattr(model, "all_tied_weights_keys", None)
    if isinstance(declared, dict):
        tied.update({k: v for k, v in declared.items() if isinstance(k, str) and isinstance(v, str)
                     and k in shapes and v in shapes})
    return shapes, tied


def check_coverage(path, have: dict[str, tuple], want: dict[str, tuple], tied: dict[str, str],
                   what: str) -> None:
    """The weights hold exactly the model's tensors, shape for shape (tied names may be stored once)."""
    missing = sorted(k for k in want if k not in have and not (k in tied and tied[k] in have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} the model does not have (e.g. {extra[:3]})")
        if wrong:
            parts.append(f"tensor {wrong[0]!r} has shape {list(have[wrong[0]])}, the model expects "
                         f"{list(want[wrong[0]])}")
        raise fail(path, f"the weights do not match the {what} that config.json describes: " + "; ".join(parts),
                   "a model with missing or foreign weights would run with random values: restore the weights "
                   "and config of this component, or convert/import the model again")


def check_tokens(path, cfg: dict) -> None:
    v = cfg.get("model_max_length")
    if v is not None and not (_is_int(v) and (1 <= v <= MAX_TOKENS or v == VERY_LARGE_INTEGER)):
        raise fail(path, f"model_max_length is {v!r}; expected a whole number from 1 to {MAX_TOKENS}")


def check_chat_template(path, template) -> None:
    """A chat template is a string (or transformers' list of named templates) that jinja compiles and
    that renders one user message."""
    if isinstance(template, list):
        if not template:
            raise fail(path, "chat_template is an empty list", "copy chat_template.jinja from the model's repository")
        for t in template:
            if not (isinstance(t, dict) and isinstance(t.get("template"), str)):
                raise fail(path, f"chat template entry {t!r} is not {{'name': ..., 'template': '...'}}")
            check_chat_template(path, t["template"])
        return
    if not isinstance(template, str):
        raise fail(path, f"chat_template is {type(template).__name__} {template!r}, expected a jinja template string")
    try:
        try:  # transformers' own sandboxed environment (its filters, globals and extensions)
            from transformers.utils.chat_template_utils import _compile_jinja_template
            compiled = _compile_jinja_template(template)
        except ImportError:  # pragma: no cover - older transformers
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        text = compiled.render(messages=[{"role": "user", "content": "a red fox"}], add_generation_prompt=True,
                               enable_thinking=False)
    except Exception as exc:  # noqa: BLE001 - any template error (syntax, runtime, sandbox) is a broken template
        raise fail(path, f"the chat template does not render a prompt ({type(exc).__name__}: {exc})",
                   "copy chat_template.jinja from the model's original repository") from None
    if "a red fox" not in text:
        raise fail(path, f"the chat template drops the prompt (one user message 'a red fox' renders as "
                         f"{text[:80]!r})", "copy chat_template.jinja from the model's original repository")


def check_tokenizer(tok_dir, class_name: str | None = None) -> None:
    """A tokenizer folder: plain files only, every JSON file an object, no empty file, a class that
    never unpickles (some slow tokenizers ``pickle.load`` a vocabulary), no file entry naming a pickle,
    ``model_max_length`` in range and a chat template that renders."""
    tok_dir = Path(tok_dir)
    check_folder_entries(tok_dir, "tokenizer")
    for cls in (class_name,):
        if cls is not None and cls not in TOKENIZER_CLASSES:
            raise fail(tok_dir, f"tokenizer class {cls!r} is not one this pack loads "
                                f"({', '.join(sorted(TOKENIZER_CLASSES))})", "some tokenizer classes unpickle files")
    files = sorted(p for p in tok_dir.iterdir() if p.is_file())
    if not files:
        raise fail(tok_dir, "the tokenizer folder holds no files")
    if not any(p.name in ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model") for p in files):
        raise fail(tok_dir, "no tokenizer.json (or vocab.json + merges.txt) in the tokenizer folder")
    for p in files:
        if p.stat().st_size == 0:
            raise fail(p, "the tokenizer file is empty", "restore it from the model's original files")
        if p.suffix == ".json":
            read_json_file(p, "tokenizer file")
    if (tok_dir / "vocab.json").is_file() and not (tok_dir / "tokenizer.json").is_file() \
            and not (tok_dir / "merges.txt").is_file():
        raise fail(tok_dir, "vocab.json without merges.txt")
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = read_json_file(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
    tclass = cfg.get("tokenizer_class")
    if tclass is not None and (not isinstance(tclass, str) or tclass not in TOKENIZER_CLASSES):
        raise fail(cfg_path, f"tokenizer_class is {tclass!r}, not one this pack loads "
                             f"({', '.join(sorted(TOKENIZER_CLASSES))})", "some tokenizer classes unpickle files")
    if "auto_map" in cfg:
        raise fail(cfg_path, "auto_map asks for tokenizer code from the model folder; this pack never runs it")
    for key, value in cfg.items():
        if isinstance(value, str) and value.lower().endswith(PICKLE_SUFFIXES):
            raise fail(cfg_path, f"{key} is {value!r}: a pickle file, which transformers would unpickle; "
                                 "this pack never loads pickles", "remove the entry")
    check_tokens(cfg_path, cfg)
    if (tok_dir / "chat_template.jinja").is_file():
        tpath = tok_dir / "chat_template.jinja"
        try:
            text = tpath.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(tpath, f"the chat template is not UTF-8 text ({exc})",
                       "copy chat_template.jinja from the model's original repository") from None
        check_chat_template(tpath, text)
    elif "chat_template" in cfg and cfg["chat_template"] is not None:
        check_chat_template(cfg_path, cfg["chat_template"])


# ---------------------------------------------------------------------------------------------
# Scheduler, VAE, bonsai.json
# ---------------------------------------------------------------------------------------------
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _finite(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_scheduler_config(cfg: dict, path) -> dict:
    """Betas in (0, 1) and increasing, a known beta schedule, 1..100000 training timesteps, a positive
    shift, sequence lengths >= 1 and a diffusers scheduler class."""
    if not isinstance(cfg, dict):
        raise fail(path, f"holds a JSON {type(cfg).__name__}, expected an object")
    cls = cfg.get("_class_name")
    if "_class_name" in cfg:
        import diffusers

        if not isinstance(cls, str) or not cls.endswith("Scheduler") or getattr(diffusers, cls, None) is None:
            raise fail(path, f"_class_name is {cls!r}, not a scheduler of diffusers {diffusers.__version__}")
    # a key that is present must hold a value: null where a number belongs breaks the schedule later
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "shift", "base_shift", "max_shift",
                "base_image_seq_len", "max_image_seq_len", "prediction_type", "timestep_spacing"):
        if key in cfg and cfg[key] is None:
            raise fail(path, f"{key} is null; expected a value (or no {key} entry, for the library's default)")
    n = cfg.get("num_train_timesteps")
    if n is not None and not (_is_int(n) and 1 <= n <= 100_000):
        raise fail(path, f"num_train_timesteps is {n!r}; expected a whole number from 1 to 100000")
    b0, b1 = cfg.get("beta_start"), cfg.get("beta_end")
    for key, v in (("beta_start", b0), ("beta_end", b1)):
        if v is not None and not (_finite(v) and 0 < v < 1):
            raise fail(path, f"{key} is {v!r}; expected a number between 0 and 1")
    if _finite(b0) and _finite(b1) and not b0 < b1:
        raise fail(path, f"beta_start {b0} is not below beta_end {b1}")
    sched = cfg.get("beta_schedule")
    if sched is not None and sched not in BETA_SCHEDULES:
        raise fail(path, f"beta_schedule is {sched!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    tb = cfg.get("trained_betas")
    if tb is not None and not (isinstance(tb, list) and tb and all(_finite(b) and 0 < b < 1 for b in tb)):
        raise fail(path, "trained_betas is not a list of numbers between 0 and 1")
    for key in ("shift",):
        v = cfg.get(key)
        if v is not None and not (_finite(v) and v > 0):
            raise fail(path, f"{key} is {v!r}; expected a finite number > 0")
    for key in ("base_shift", "max_shift"):
        v = cfg.get(key)
        if v is not None and not _finite(v):
            raise fail(path, f"{key} is {v!r}; expected a finite number")
    for key in ("base_image_seq_len", "max_image_seq_len"):
        v = cfg.get(key)
        if v is not None and not (_is_int(v) and 1 <= v <= 1 << 24):
            raise fail(path, f"{key} is {v!r}; expected a whole number from 1 to {1 << 24}")
    lo, hi = cfg.get("base_image_seq_len"), cfg.get("max_image_seq_len")
    if _is_int(lo) and _is_int(hi) and not lo < hi:
        raise fail(path, f"base_image_seq_len {lo} is not below max_image_seq_len {hi}")
    off = cfg.get("steps_offset")
    if off is not None and not (_is_int(off) and 0 <= off <= 1000):
        raise fail(path, f"steps_offset is {off!r}; expected a whole number from 0 to 1000")
    for key, allowed in (("prediction_type", ("epsilon", "v_prediction", "sample", "flow_prediction")),
                         ("timestep_spacing", ("leading", "trailing", "linspace")),
                         ("time_shift_type", ("exponential", "linear"))):
        v = cfg.get(key)
        if v is not None and v not in allowed:
            raise fail(path, f"{key} is {v!r}; expected one of {', '.join(allowed)}")
    return cfg


def check_scheduler_dir(sch_dir) -> dict:
    path = Path(sch_dir) / "scheduler_config.json"
    check_folder_entries(sch_dir, "scheduler")
    return check_scheduler_config(read_json_file(path, "scheduler config"), path)


def check_settings(folder, te_layers: int | None) -> dict:
    """``bonsai.json``: an object; ``text_encoder_out_layers`` a non-empty list of hidden-state numbers the
    text encoder has (``-(n+1)`` .. ``n`` for ``n`` layers)."""
    path = Path(folder) / "bonsai.json"
    if not path.exists() and not path.is_symlink():
        return {}
    data = read_json_file(path, "settings file (bonsai.json)")
    if "text_encoder_out_layers" in data:
        layers = data["text_encoder_out_layers"]
        if not (isinstance(layers, list) and layers and all(_is_int(v) for v in layers)):
            raise fail(path, f"text_encoder_out_layers is {layers!r}; expected a non-empty list of layer numbers")
        if te_layers is not None:
            bad = [v for v in layers if not -(te_layers + 1) <= v <= te_layers]
            if bad:
                raise fail(path, f"text_encoder_out_layers {layers} reads hidden states {bad} but the text encoder "
                                 f"has {te_layers} layers", "set layer numbers from 1 to "
                                                            f"{te_layers} in text_encoder_out_layers")
    return data


# ---------------------------------------------------------------------------------------------
# A whole folder
# ---------------------------------------------------------------------------------------------
FAMILY_REQUIRED = {"sd_unet": ("unet", "vae", "text_encoder", "tokenizer"),
                   "flux2_klein": ("transformer", "text_encoder", "tokenizer", "vae")}


def check_folder(folder, index: dict, family: str) -> None:
    """Everything of a pipeline folder that is checkable from its small files: components present,
    configs in range, tokenizer, scheduler and settings. Weights are checked per component by
    ``check_component`` (the loader calls it before building a module)."""
    folder = Path(folder)
    check_required(index, folder, FAMILY_REQUIRED.get(family, ()))
    comps = components(index)
    te_layers = te_positions = None
    for name, (library, class_name) in comps.items():
        d = folder / name
        if "Tokenizer" in class_name or name.startswith("tokenizer"):
            check_tokenizer(d, class_name)
        elif "Scheduler" in class_name or name == "scheduler":
            check_scheduler_dir(d)
        else:
            check_folder_entries(d, name)
            if name not in FAMILY_REQUIRED.get(family, ()) and not (d / "config.json").exists():
                continue  # a part this pack does not load (feature_extractor has preprocessor_config.json)
            cfg = read_component_config(d)
            if name == "text_encoder" and _is_int(cfg.get("num_hidden_layers")):
                te_layers = cfg["num_hidden_layers"]
            if name == "text_encoder" and _is_int(cfg.get("max_position_embeddings")):
                te_positions = cfg["max_position_embeddings"]
    check_settings(folder, te_layers)
    if family == "sd_unet" and "tokenizer" in comps and te_positions is not None:
        # CLIP prompts are padded to model_max_length: it must exist and fit the text encoder's positions
        path = folder / "tokenizer" / "tokenizer_config.json"
        cfg = read_json_file(path, "tokenizer config") if (path.exists() or path.is_symlink()) else {}
        n = cfg.get("model_max_length")
        if not (_is_int(n) and 1 <= n <= te_positions):
            raise fail(path, f"model_max_length is {n!r}; the text encoder holds {te_positions} positions, so "
                             f"expected a whole number from 1 to {te_positions} (77 for CLIP)")
