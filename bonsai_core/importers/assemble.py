"""Turn a public Bonsai Image 4B payload into one Bonsai FLUX.2 [klein] folder, and back to GGUF.

``import_model(src, dst)`` reads every part of a public payload and writes a diffusers-style
``Flux2KleinPipeline`` folder that ``BonsaiImageEngine`` loads:

* ``transformer/``: the transformer through ``import_transformer`` (any public layout), written as
  a Bonsai component file (``checkpoint.save_tensors``): binary linears as Q1_0 with their bits and
  scales copied, never re-quantized; 16-bit tensors in the dtype the source holds them;
  ``config.json`` from the source, else derived from the tensor shapes;
* ``text_encoder/``: a dense transformers folder is copied; the public 4-bit forms (MLX
  ``text_encoder-mlx-4bit/``, HQQ ``text_encoder-hqq-4bit/``) are read by
  ``importers.text_encoder.import_text_encoder`` keeping their 4-bit weights (Q4_AFFINE, every value
  exact) into a Bonsai component file (a layout with no exact Q4_AFFINE form is dequantized to bf16
  and saved with ``save_pretrained``);
* ``tokenizer/``, ``vae/``, ``scheduler/``: copied (the chat template is taken from the repo's
  ``chat_template.jinja`` when the tokenizer folder has none); with no scheduler in the source the
  klein default is written;
* ``model_index.json`` with a ``_bonsai`` entry (format version, family, what is quantized, the
  source layout and every note), and the ``bonsai.json`` of the source (or of the text encoder
  folder) when there is one (it says which text encoder layers form the prompt embedding).

Where each public repo keeps each part (their Hub repos' file lists):

* gemlite repo: ``transformer-gemlite-int1/`` (its optional ``scheduler/`` inside), ``text_encoder-hqq-4bit/``
  with ``tokenizer/`` inside it, ``vae/``;
* MLX repo: ``transformer-packed-mflux/``, ``text_encoder-mlx-4bit/``, ``tokenizer/`` (chat template in the
  repo's ``chat_template.jinja``), ``vae/``, ``scheduler/``;
* unpacked repo (a diffusers folder): ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``.

A single transformer file or folder (a Q1_0 ``.gguf`` ...) takes the other parts from the keyword
arguments (``--text-encoder``, ``--vae``, ``--tokenizer``, ``--scheduler``), which also override what
a repo folder holds. Everything is written into a hidden temporary folder beside ``dst`` and
renamed at the end: a failure leaves nothing at ``dst``.

``export_gguf(model_dir, out)`` writes the transformer of a Bonsai klein folder as a BFL-named Q1_0
``.gguf`` (``gguf_q1.write_gguf``); importing that file again gives the same bits.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint
from ..errors import BonsaiCheckpointError
from ..quant.policy import FLUX2_KEEP, default_policy
from ..quant.tensor import PackedTensor, Q1Tensor
from . import ImportedTransformer, detect_layout, import_transformer, read_json, read_safetensors_header

FAMILY = "flux2_klein"
PIPELINE_CLASS = "Flux2KleinPipeline"
TRANSFORMER_CLASS = "Flux2Transformer2DModel"
VAE_CLASS = "AutoencoderKLFlux2"
TEXT_ENCODER_CLASS = "Qwen3ForCausalLM"
TOKENIZER_CLASS = "Qwen2TokenizerFast"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SETTINGS_FILE = "bonsai.json"

# Flux2KleinPipeline's scheduler config: dynamic shifting makes `shift` inert.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": SCHEDULER_CLASS,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}

TEXT_ENCODER_DIRS = ("text_encoder", "text_encoder-hqq-4bit", "text_encoder-mlx-4bit")
FLAGS = {"text_encoder": "--text-encoder DIR (text_encoder=...)", "vae": "--vae DIR (vae=...)",
         "tokenizer": "--tokenizer DIR (tokenizer=...)"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class ImportResult:
    dst: Path
    source_layout: str
    packed: int = 0          # transformer tensors stored Q1_0
    kept: int = 0            # transformer tensors stored dense
    packed_bytes: int = 0
    kept_bytes: int = 0
    parts: dict[str, str] = field(default_factory=dict)  # component -> where it came from / how
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        total = max(self.packed_bytes + self.kept_bytes, 1)
        lines = [f"imported {self.source_layout} -> {self.dst}",
                 f"{'transformer':<14}{'tensors':>8}{'MiB':>10}{'share':>8}",
                 f"{'  packed Q1_0':<14}{self.packed:>8}{self.packed_bytes / 2**20:>10.2f}"
                 f"{100 * self.packed_bytes / total:>7.1f}%",
                 f"{'  kept dense':<14}{self.kept:>8}{self.kept_bytes / 2**20:>10.2f}"
                 f"{100 * self.kept_bytes / total:>7.1f}%", "parts:"]
        lines += [f"  {name:<13} {how}" for name, how in self.parts.items()]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


# ---------------------------------------------------------------------------------------------
# Finding the parts
# ---------------------------------------------------------------------------------------------
def _first_dir(*candidates: Path | None) -> Path | None:
    for c in candidates:
        if c is not None and Path(c).is_dir():
            return Path(c)
    return None


def _given_dir(value, part: str) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_dir():
        raise BonsaiCheckpointError(f"{p}: the {part} folder given does not exist (or is not a folder)")
    return p


def _descend(d: Path | None, subdirs: tuple[str, ...], markers: tuple[str, ...]) -> Path | None:
    if d is None or any((d / m).is_file() for m in markers):
        return d
    for sub in subdirs:
        if any((d / sub / m).is_file() for m in markers):
            return d / sub
    return d


def _find_parts(src: Path, *, text_encoder, vae, tokenizer, scheduler) -> dict[str, Path | None]:
    repo = src if src.is_dir() else None
    te = _given_dir(text_encoder, "text encoder") or (
        _first_dir(*(repo / d for d in TEXT_ENCODER_DIRS)) if repo else None)
    tok = _given_dir(tokenizer, "tokenizer") or _first_dir(
        repo / "tokenizer" if repo else None, te / "tokenizer" if te else None)
    v = _given_dir(vae, "VAE") or (_first_dir(repo / "vae") if repo else None)
    sched_candidates = ([repo / "scheduler"] + [d / "scheduler" for d in sorted(repo.glob("transformer*"))]
                        if repo else [])
    sch = _given_dir(scheduler, "scheduler") or _first_dir(*sched_candidates)
    # a flag may name a repo folder rather than the part's own folder: step into the part
    te = _descend(te, TEXT_ENCODER_DIRS, ("config.json", "qmodel.pt"))
    tok = _descend(tok, ("tokenizer",), ("tokenizer.json", "vocab.json"))
    v = _descend(v, ("vae",), ("config.json",))
    sch = _descend(sch, ("scheduler",), ("scheduler_config.json",))
    parts = {"text_encoder": te, "tokenizer": tok, "vae": v, "scheduler": sch}
    missing = [k for k in ("text_encoder", "tokenizer", "vae") if parts[k] is None]
    if missing:
        if repo is None:
            where = f"{src} is a single transformer file"
        elif not any((repo / d).exists() for d in ("vae", "tokenizer") + TEXT_ENCODER_DIRS):
            where = f"{src} holds a transformer only"
        else:
            where = f"{src} holds no {', '.join(missing)}"
        raise BonsaiCheckpointError(
            f"cannot assemble a FLUX.2 [klein] model: missing {', '.join(missing)} ({where}). "
            f"Supply {'; '.join(FLAGS[m] for m in missing)}")
    return parts


def _text_encoder_kind(d: Path) -> str:
    """"hqq", "mlx" (the public 4-bit forms) or "dense"."""
    if (d / "qmodel.pt").is_file():
        return "hqq"
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise BonsaiCheckpointError(f"{d}: the text encoder folder has no config.json")
    cfg = read_json(cfg_path)
    if isinstance(cfg.get("quantization"), dict) or isinstance(cfg.get("quantization_config"), dict):
        return "mlx"
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise BonsaiCheckpointError(
            f"{d}: the text encoder has no .safetensors weights"
            f"{' (only ' + ', '.join(pickles) + ', which are never unpickled here)' if pickles else ''}; "
            "save it with save_pretrained(safe_serialization=True) or pass another --text-encoder")
    for f in weights:
        header, _ = read_safetensors_header(f)
        if any(n.endswith(".scales") for n in header):
            return "mlx"
    return "dense"


# ---------------------------------------------------------------------------------------------
# Writing each part
# ---------------------------------------------------------------------------------------------
def _copy_files(src: Path, dst: Path, what: str) -> list[str]:
    """Copy the plain files of ``src`` (not sub-folders, never pickles) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in PICKLE_SUFFIXES and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    if not copied:
        raise BonsaiCheckpointError(f"{src}: the {what} folder holds no files")
    return copied


def _policy_reason(name: str) -> str | None:
    module = name.rpartition(".")[0]
    for pattern in FLUX2_KEEP:
        if fnmatch.fnmatchcase(module, pattern):
            return f"kept: matches policy pattern {pattern!r}"
    return None


def _transformer_config(imported: ImportedTransformer, notes: list[str]) -> dict:
    import diffusers

    from .flux2_names import infer_config, shape_of

    if imported.config is not None:
        cfg = dict(imported.config)
    else:
        cfg = infer_config({n: shape_of(t) for n, t in imported.tensors.items()})
        head_dim = int(cfg["attention_head_dim"])
        if head_dim == 128:
            axes = [32, 32, 32, 32]  # FLUX.2 klein 4B
        elif head_dim % 4 == 0:
            axes = [head_dim // 4] * 4
        else:
            raise BonsaiCheckpointError(f"attention_head_dim {head_dim} is not FLUX.2-shaped (4 RoPE axes)")
        cfg.update(axes_dims_rope=axes, rope_theta=2000, eps=1e-6)
        notes.append(f"transformer config derived from tensor shapes; RoPE axes {axes}, rope_theta 2000, eps 1e-6 "
                     "taken from FLUX.2 [klein] (not visible in tensors)")
    cfg["_class_name"] = TRANSFORMER_CLASS
    cfg.setdefault("_diffusers_version", diffusers.__version__)
    return cfg


def _write_transformer(imported: ImportedTransformer, out: Path, result: ImportResult) -> None:
    out.mkdir(parents=True)
    layout = imported.source_layout
    reasons = {}
    for name, t in imported.tensors.items():
        if isinstance(t, Q1Tensor):
            reasons[name] = f"imported from {layout}: binary sign x scale, Q1_0 bits copied (not re-quantized)"
            result.packed += 1
            result.packed_bytes += t.qs.numel() + t.d.numel() * 2
        else:
            reasons[name] = _policy_reason(name) or f"kept: dense in the {layout} source"
            result.kept += 1
            result.kept_bytes += t.numel() * t.element_size()
    config = _transformer_config(imported, result.notes)
    checkpoint.save_tensors(out / checkpoint.WEIGHTS_NAME, imported.tensors, family=FAMILY,
                            component="transformer",
                            policy=default_policy(FAMILY).to_dict(), reasons=reasons,
                            extra={"source_layout": layout})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _save_dense_text_encoder(imported, out: Path) -> str:
    """An ImportedTextEncoder (dense state dict + transformers config) -> save_pretrained safetensors."""
    import transformers

    cfg = {k: v for k, v in imported.config.items() if k not in ("quantization", "quantization_config")}
    arch = (cfg.get("architectures") or [TEXT_ENCODER_CLASS])[0]
    build = getattr(imported, "build_model", None)
    if callable(build):
        model = build()
    else:
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise BonsaiCheckpointError(f"transformers {transformers.__version__} has no class {arch!r}")
        config = transformers.AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = cls(config)
        sd = dict(imported.state_dict)
        tied = bool(cfg.get("tie_word_embeddings"))
        if tied and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if tied:
            model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    return type(model).__name__


def _write_text_encoder(te_dir: Path, out: Path, result: ImportResult, log) -> str:
    from .. import validate
    from ..loader import check_component

    validate.check_folder_entries(te_dir, "text encoder")
    kind = _text_encoder_kind(te_dir)
    if kind == "dense":
        cfg = validate.read_component_config(te_dir)
        archs = cfg.get("architectures") or [TEXT_ENCODER_CLASS]
        arch = archs[0] if isinstance(archs, list) and archs else archs
        if not isinstance(arch, str):
            raise BonsaiCheckpointError(f"{te_dir / 'config.json'}: architectures is {archs!r}, expected a class name")
        check_component(te_dir.parent, te_dir.name, ["transformers", arch])  # weights cover the model
        _copy_files(te_dir, out, "text encoder")
        result.parts["text_encoder"] = f"{te_dir} (dense, copied)"
        return arch
    try:
        from .text_encoder import import_text_encoder
    except ImportError as exc:
        raise BonsaiCheckpointError(
            f"{te_dir}: a {kind.upper()} 4-bit text encoder needs bonsai_core.importers.text_encoder, which this "
            f"install lacks ({exc}); pass --text-encoder with a dense Qwen3 folder instead") from exc
    log(f"reading the {kind.upper()} 4-bit text encoder {te_dir} (kept 4-bit)")
    imported = import_text_encoder(te_dir, keep_4bit=True)
    if not any(isinstance(t, PackedTensor) for t in imported.state_dict.values()):
        arch = _save_dense_text_encoder(imported, out)
        result.notes.append(f"text encoder: {kind.upper()} 4-bit dequantized to dense bf16 and saved with "
                            "save_pretrained (its layout has no exact Q4_AFFINE form; about 4x the 4-bit size)")
        result.parts["text_encoder"] = f"{te_dir} ({kind} 4-bit -> bf16)"
    else:
        arch = _save_q4_text_encoder(imported, out, kind)
        result.notes.append(f"text encoder: {kind.upper()} 4-bit kept 4-bit (Q4_AFFINE: the file's own codes, "
                            "scales and biases, every value exact); norms and other float tensors in bf16")
        result.parts["text_encoder"] = f"{te_dir} ({kind} 4-bit, kept 4-bit)"
    result.notes += [f"text encoder: {n}" for n in getattr(imported, "notes", [])]
    return arch


def _save_q4_text_encoder(imported, out: Path, kind: str) -> str:
    """An ImportedTextEncoder holding ``Q4Tensor`` weights -> a Bonsai component file + its config."""
    cfg = {k: v for k, v in imported.config.items() if k not in ("quantization", "quantization_config")}
    arch = (cfg.get("architectures") or [TEXT_ENCODER_CLASS])[0]
    sd = dict(imported.state_dict)
    tied = {}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        tied["lm_head.weight"] = "model.embed_tokens.weight"
    reasons = {n: f"imported: {kind} 4-bit kept as {t.qtype}" for n, t in sd.items() if isinstance(t, PackedTensor)}
    checkpoint.save_tensors(out / checkpoint.TE_WEIGHTS_NAME, sd, family=FAMILY, component="text_encoder",
                            policy={"name": f"imported_{kind}_4bit"}, reasons=reasons, tied=tied,
                            extra={"source_layout": f"{kind}_4bit"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return arch


def _write_tokenizer(tok_dir: Path, out: Path, templates: list[Path], result: ImportResult) -> str:
    _copy_files(tok_dir, out, "tokenizer")
    if not (out / "tokenizer.json").is_file() and not (out / "vocab.json").is_file():
        raise BonsaiCheckpointError(
            f"{tok_dir}: no tokenizer.json (or vocab.json + merges.txt) in the tokenizer folder")
    from .. import validate

    cfg_path = out / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    has_template = bool(cfg.get("chat_template")) or (out / "chat_template.jinja").is_file()
    if not has_template:
        for t in templates:
            if t.is_file():
                shutil.copy2(t, out / "chat_template.jinja")
                result.notes.append(f"tokenizer: chat template taken from {t}")
                has_template = True
                break
    validate.check_tokenizer(out, cfg.get("tokenizer_class") if isinstance(cfg.get("tokenizer_class"), str) else None)
    tok_class = cfg.get("tokenizer_class")
    tok_class = TOKENIZER_CLASS if tok_class in (None, "Qwen2Tokenizer", "Qwen2TokenizerFast") else tok_class
    import transformers

    cls = getattr(transformers, tok_class, None) or transformers.AutoTokenizer
    try:
        tok = cls.from_pretrained(out)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for broken files
        raise BonsaiCheckpointError(f"{tok_dir}: the tokenizer does not load ({type(exc).__name__}: {exc})") from exc
    if not getattr(tok, "chat_template", None):
        raise BonsaiCheckpointError(
            f"{tok_dir}: the tokenizer has no chat template and none was found beside it "
            f"({', '.join(str(t) for t in templates) or 'nowhere to look'}); FLUX.2 [klein] prompts use Qwen3's: "
            "put chat_template.jinja into the tokenizer folder")
    result.parts["tokenizer"] = f"{tok_dir} (copied)"
    return tok_class


def _check_vae_layout(vae_dir: Path) -> None:
    """The VAE's tensors must be what diffusers' AutoencoderKLFlux2 expects, name for name and shape
    for shape: a VAE in another layout (an MLX conversion stores conv weights channels-last, say)
    is refused here, at import, rather than failing when the first image is decoded."""
    from .. import validate
    from ..loader import build_skeleton

    want, _tied = validate.skeleton_shapes(build_skeleton(vae_dir, "diffusers", VAE_CLASS))
    have = validate.header_shapes(validate.weight_files(vae_dir))  # headers checked, no data read
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong or extra:
        detail = (f"tensor {wrong[0]!r} has shape {list(have[wrong[0]])}, diffusers expects {list(want[wrong[0]])}"
                  if wrong else f"{len(missing)} tensors missing, e.g. {missing[:3]}" if missing
                  else f"{len(extra)} tensors the model does not have, e.g. {extra[:3]}")
        raise BonsaiCheckpointError(
            f"{vae_dir}: the VAE weights are not in diffusers' {VAE_CLASS} layout ({detail}); pass --vae with a "
            f"diffusers {VAE_CLASS} folder (config.json + safetensors)")


def _write_vae(vae_dir: Path, out: Path, result: ImportResult) -> None:
    from .. import validate

    cfg_path = vae_dir / "config.json"
    validate.check_folder_entries(vae_dir, "VAE")
    if not cfg_path.is_file():
        raise BonsaiCheckpointError(f"{vae_dir}: the VAE folder has no config.json")
    cls = validate.read_component_config(vae_dir).get("_class_name", VAE_CLASS)
    if cls != VAE_CLASS:
        raise BonsaiCheckpointError(f"{cfg_path}: the VAE is a {cls}; FLUX.2 [klein] needs {VAE_CLASS} "
                                    "(32 latent channels, batch-norm statistics)")
    if not any(vae_dir.glob("*.safetensors")):
        raise BonsaiCheckpointError(
            f"{vae_dir}: the VAE has no .safetensors weights (pickled weights are never loaded)")
    _check_vae_layout(vae_dir)
    _copy_files(vae_dir, out, "VAE")
    result.parts["vae"] = f"{vae_dir} (copied)"


def _write_scheduler(sch_dir: Path | None, out: Path, result: ImportResult) -> str:
    if sch_dir is not None:
        from .. import validate

        validate.check_folder_entries(sch_dir, "scheduler")
        _copy_files(sch_dir, out, "scheduler")
        cfg_path = out / "scheduler_config.json"
        if not cfg_path.is_file():
            raise BonsaiCheckpointError(f"{sch_dir}: the scheduler folder has no scheduler_config.json")
        cfg = validate.check_scheduler_dir(out)
        result.parts["scheduler"] = f"{sch_dir} (copied)"
        return cfg.get("_class_name", SCHEDULER_CLASS)
    out.mkdir(parents=True)
    (out / "scheduler_config.json").write_text(json.dumps(DEFAULT_SCHEDULER_CONFIG, indent=2))
    result.parts["scheduler"] = "default FLUX.2 [klein] FlowMatchEuler config (written)"
    result.notes.append("scheduler: none in the source; wrote FlowMatchEulerDiscreteScheduler with dynamic shifting "
                        "(base_shift 0.5, max_shift 1.15, seq 256..4096; shift 3.0 inert) as Flux2KleinPipeline's "
                        "published scheduler config")
    return SCHEDULER_CLASS


# ---------------------------------------------------------------------------------------------
# The two entry points
# ---------------------------------------------------------------------------------------------
def import_model(src, dst, *, layout: str | None = None, text_encoder=None, vae=None, tokenizer=None,
                 scheduler=None, allow_dequantize: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> ImportResult:
    """Assemble a Bonsai FLUX.2 [klein] folder ``dst`` from a public payload ``src``.

    ``src``: a public repo folder (gemlite, MLX or unpacked diffusers layout), or a single
    transformer file/folder (``.gguf`` ...) whose other parts come from ``text_encoder``, ``vae``,
    ``tokenizer`` (and optionally ``scheduler``) folders, which also override a repo's own parts.
    ``layout`` forces the transformer layout (``gguf_q1``, ``gemlite``, ``mlx``, ``unpacked``);
    ``allow_dequantize`` lets ternary linears be stored dense. Refuses an existing ``dst`` unless
    ``overwrite``. Raises ``BonsaiCheckpointError`` for anything missing or broken; nothing is left
    at ``dst`` then.
    """
    src, dst = Path(src), Path(dst)
    for line in checkpoint.clean_stale(dst):  # what a killed run left (a model it had moved aside comes back)
        log(line)
    if dst.exists() and not overwrite:
        raise BonsaiCheckpointError(f"{dst} already exists; pick another destination or pass --overwrite")
    if not src.exists():
        raise BonsaiCheckpointError(f"{src}: the source does not exist")
    layout = layout or detect_layout(src)
    parts = _find_parts(src, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, scheduler=scheduler)

    result = ImportResult(dst=dst, source_layout=layout)
    with checkpoint.staged_dir(dst) as tmp:
        log(f"importing the transformer ({layout}) from {src}")
        imported = import_transformer(src, layout=layout, allow_dequantize=allow_dequantize)
        result.notes += [f"transformer: {n}" for n in imported.notes]
        _write_transformer(imported, tmp / "transformer", result)
        result.parts["transformer"] = f"{src} ({layout})"
        del imported

        te_arch = _write_text_encoder(parts["text_encoder"], tmp / "text_encoder", result, log)
        templates = [p / "chat_template.jinja" for p in
                     ([src] if src.is_dir() else []) + [parts["text_encoder"], parts["tokenizer"].parent]]
        tok_class = _write_tokenizer(parts["tokenizer"], tmp / "tokenizer", templates, result)
        _write_vae(parts["vae"], tmp / "vae", result)
        sched_class = _write_scheduler(parts["scheduler"], tmp / "scheduler", result)

        from .. import validate

        te_layers = validate.read_json_file(tmp / "text_encoder" / "config.json", "text encoder config").get(
            "num_hidden_layers")
        for base in ([src] if src.is_dir() else []) + [parts["text_encoder"]]:
            if (base / SETTINGS_FILE).exists():
                validate.check_settings(base, te_layers if isinstance(te_layers, int) else None)
                shutil.copy2(base / SETTINGS_FILE, tmp / SETTINGS_FILE)
                result.notes.append(f"settings: {SETTINGS_FILE} taken from {base}")
                break

        import diffusers

        index = {}
        src_index = src / "model_index.json" if src.is_dir() else None
        if src_index is not None and src_index.is_file():
            index = {k: v for k, v in read_json(src_index).items() if not isinstance(v, list)}
        index.update({
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": diffusers.__version__,
            "is_distilled": index.get("is_distilled", True),
            "scheduler": ["diffusers", sched_class],
            "text_encoder": ["transformers", te_arch],
            "tokenizer": ["transformers", tok_class],
            "transformer": ["diffusers", TRANSFORMER_CLASS],
            "vae": ["diffusers", VAE_CLASS],
        })
        index["_bonsai"] = {"format_version": checkpoint.FORMAT_VERSION, "family": FAMILY,
                            "quantized": ["transformer"] if result.packed else [],
                            "source_layout": layout, "notes": list(result.notes)}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return result


def export_gguf(model_dir, out, *, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the transformer of a Bonsai FLUX.2 [klein] folder as a Q1_0 ``.gguf`` with BFL names.

    Q1_0 tensors are written as ggml type 41 blocks byte for byte, dense ones as BF16/F16/F32.
    """
    from ..loader import family_of, is_bonsai_component, read_model_index
    from .gguf_q1 import write_gguf

    model_dir, out = Path(model_dir), Path(out)
    checkpoint.clean_stale(out)
    if out.exists() and not overwrite:
        raise BonsaiCheckpointError(f"{out} already exists; pick another file name or pass --overwrite")
    index = read_model_index(model_dir)
    family, denoiser = family_of(index, model_dir)
    if family != FAMILY:
        raise BonsaiCheckpointError(f"{model_dir}: a {family} model; only FLUX.2 [klein] transformers export to GGUF")
    comp = model_dir / denoiser
    if not comp.is_dir() or not is_bonsai_component(comp):
        raise BonsaiCheckpointError(
            f"{comp}: not a Bonsai Q1_0 transformer (full precision?); run `bonsai convert` first, then export")
    from ..loader import check_component

    check_component(model_dir, denoiser, index[denoiser])  # the same checks as loading: config, shapes
    cf = checkpoint.read_tensors(checkpoint.find_weights(comp))
    out.parent.mkdir(parents=True, exist_ok=True)
    path, counts = write_gguf(out, cf.tensors, with_counts=True)
    log(f"wrote {out}: {counts['Q1_0']} Q1_0 tensors, {counts['dense']} dense (BFL names: q/k/v fused into qkv)")
    return path


__all__ = ["ImportResult", "import_model", "export_gguf", "DEFAULT_SCHEDULER_CONFIG"]
