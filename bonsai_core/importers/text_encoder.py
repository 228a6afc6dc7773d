"""Bonsai Image 4B text encoder (Qwen3-4B at 4 bit) -> a dense transformers ``Qwen3ForCausalLM`` state dict.

The public payloads (their Hub repos' file lists and model cards):

* ``text_encoder-mlx-4bit/`` (HF ``prism-ml/bonsai-image-*-4B-mlx-*``): a byte-identical copy of
  ``mlx-community/Qwen3-4B-4bit`` [V]: ``config.json`` (a transformers Qwen3 config plus
  ``"quantization": {"group_size": 64, "bits": 4}``) and ``model.safetensors`` (or shards listed by
  ``model.safetensors.index.json``). MLX affine quantization (ml-explore/mlx docs,
  ``mlx.core.quantize``/``dequantize``): a quantized module ``<p>`` has ``<p>.weight`` uint32
  ``[out, in*bits/32]``, ``<p>.scales`` and ``<p>.biases`` ``[out, in/group_size]``; element k of word j
  of a row is column ``j*(32/bits) + k`` at bits ``k*bits`` (LSB first); ``w = scale*q + bias``.
  mlx-lm quantizes every module that can be (``nn.quantize``), so ``model.embed_tokens`` is packed the
  same way as the linears; norms stay float. mlx-lm's Qwen3 (``mlx_lm/models/qwen3.py``) uses the
  transformers parameter names (``model.layers.N.self_attn.q_proj``, ``model.norm``, ``lm_head`` only
  when embeddings are untied; Qwen3-4B ties them). mlx-lm may also write per-module overrides inside
  ``quantization`` (``"<module>": {"group_size", "bits"}`` or ``false``); those are honoured.
* ``text_encoder-hqq-4bit/`` (HF ``prism-ml/bonsai-image-*-4B-gemlite-*``): an HQQ save [V mobiusml/hqq
  ``hqq/models/base.py``: ``save_quantized`` = ``config.json`` via ``config.save_pretrained`` +
  ``qmodel.pt`` = ``torch.save({leaf_module_name: module.state_dict()})`` with the raw (not
  safetensors-encoded) HQQLinear state]. Read here ONLY with ``torch.load(weights_only=True)``.
  HQQLinear leaves (``hqq/core/quantize.py``: ``HQQLinear.state_dict_keys``): ``W_q``, ``nbits``,
  ``group_size``, ``shape``, ``scale``, ``zero``, ``axis``, ``packing``, ``unpack_view_dtype``,
  ``view_as_float``, ``compute_dtype``, ``quant_scale``, ``quant_zero``, ``bias``, ``offload_meta``,
  ``encoded_state_dict``, ``stores_quant_config``, ``channel_wise``, ``optimize``, ``round_zero``.
  Values may be python scalars/strings/``torch.dtype``/``torch.Size``, or, in the safetensors-encoded
  form (``hqq/core/utils.py`` ``encode_safetensor_type``), tensors: ints int32, bools uint8,
  strings and dtype names uint8 character codes; both are read.
  ``Quantizer.quantize``: the weight is reshaped to ``[-1, group_size]`` (axis 1; scale/zero
  ``[-1, 1]``) or ``[group_size, -1]`` (axis 0; scale/zero ``[1, -1]``), q = round(W/scale + zero)
  in ``[0, 2^nbits - 1]``; ``scale`` is stored already inverted, so ``Quantizer.dequantize`` is
  ``w = (q - zero) * scale`` reshaped to ``shape``. ``hqq/core/bitpack.py`` packs the rows of the
  group-reshaped matrix in E = 8/bits equal slices: ``4bit_u8`` byte i = ``q[i] << 4 | q[i + n/2]``,
  ``2bit_u8`` = ``q[i]<<6 | q[i+n/4]<<4 | q[i+n/2]<<2 | q[i+3n/4]``, ``1bit_u8`` the same with 8
  slices, ``8bit_u8`` unpacked. ``view_as_float``: W_q was stored viewed as a float dtype and is
  viewed back to ``unpack_view_dtype`` (uint8). hqq's ``_IGNORE_LINEAR = ["lm_head"]`` and it only
  replaces ``nn.Linear``: embedding, norms and lm_head come as plain 16-bit state dicts.
  Which group_size/axis Bonsai used is [U]: both axes are supported as HQQ defines them.
* ``dense``: a transformers folder (``config.json`` + ``model.safetensors`` or shards), for completeness.

Values: every quantized weight is computed exactly in float64 from the stored codes, scales and
biases/zeros (the products of 16-bit floats and small integers are exact there) and rounded ONCE
to the requested dtype; notes report how many values that rounding moved and by how much. (MLX
and HQQ kernels compute in 16-bit arithmetic themselves, which can differ from this by an ulp.)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BonsaiCheckpointError, BonsaiRequestError
from . import load_pt_weights_only, load_safetensors_dir, read_json, read_safetensors_header, refuse

LAYOUTS = ("mlx_4bit", "hqq_4bit", "dense")
MLX_DIR = "text_encoder-mlx-4bit"
HQQ_DIR = "text_encoder-hqq-4bit"
DENSE_DIRS = ("text_encoder",)
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
HQQ_WEIGHTS = "qmodel.pt"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

_CHUNK = 1 << 22  # elements per float64 dequantization slice (32 MB)


@dataclass
class ImportedTextEncoder:
    """A Qwen3 text encoder as imported: dense transformers ``Qwen3ForCausalLM`` tensors.

    ``state_dict`` has no ``lm_head.weight`` when ``config["tie_word_embeddings"]`` is true (it is
    the embedding); ``build_model`` ties it.
    """

    state_dict: dict[str, torch.Tensor]
    config: dict
    source_layout: str
    notes: list[str] = field(default_factory=list)

    def build_model(self, dtype: torch.dtype | None = None):
        """A ``Qwen3ForCausalLM`` in eval mode holding these weights (strict load; tied lm_head from the
        embedding). Without ``dtype`` the parameters ARE the tensors of ``state_dict`` (no copy)."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        sd = _with_tied_head(self.state_dict, self.config)
        with torch.device("meta"):
            model = Qwen3ForCausalLM(Qwen3Config(**self.config))
        model.load_state_dict(sd, strict=True, assign=True)
        if self.config.get("tie_word_embeddings"):
            model.tie_weights()
        # non-persistent buffers (rotary inv_freq) are not in the state dict: build that module on the CPU
        rot = model.model.rotary_emb
        model.model.rotary_emb = type(rot)(config=model.config)
        for name, b in model.named_buffers():
            if b.is_meta:
                raise BonsaiCheckpointError(f"internal: buffer {name} of Qwen3ForCausalLM was not materialized")
        model.eval().requires_grad_(False)
        return model.to(dtype) if dtype is not None else model


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
LOOKED_FOR = (
    f"a folder with {HQQ_WEIGHTS} + config.json (hqq_4bit); a folder with {WEIGHTS} (or {INDEX}) + config.json "
    "whose tensors have .scales/.biases or whose config has 'quantization' (mlx_4bit), or dense float "
    f"tensors (dense); or a repo folder holding {HQQ_DIR}/, {MLX_DIR}/ or text_encoder/"
)


def _has_weights(d: Path) -> bool:
    return d.is_dir() and ((d / WEIGHTS).is_file() or (d / INDEX).is_file())


def _is_te_dir(d: Path) -> bool:
    return d.is_dir() and ((d / HQQ_WEIGHTS).is_file() or _has_weights(d))


def _resolve_dir(path) -> Path:
    p = Path(path)
    if p.is_file():
        return p.parent
    if not p.is_dir():
        raise BonsaiCheckpointError(f"{p}: the path does not exist. Looked for: {LOOKED_FOR}.")
    if _is_te_dir(p):
        return p
    found = [p / n for n in (HQQ_DIR, MLX_DIR) + DENSE_DIRS if _is_te_dir(p / n)]
    if len(found) > 1:
        raise refuse(p, f"holds several text encoders ({', '.join(f.name for f in found)})",
                     expected="one", fix="Pass the folder of the one you mean")
    if found:
        return found[0]
    raise BonsaiCheckpointError(f"{p}: not a Bonsai Image text encoder layout this importer knows. "
                                f"Looked for: {LOOKED_FOR}.")


def _mlx_qcfg(config: dict) -> dict | None:
    """The MLX quantization dict (mlx-lm writes it as 'quantization' and again as 'quantization_config')."""
    q = config.get("quantization")
    if isinstance(q, dict):
        return q
    q = config.get("quantization_config")
    if isinstance(q, dict) and "quant_method" not in q and "bits" in q and "group_size" in q:
        return q
    return None


def _weight_files(d: Path) -> list[Path]:
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    try:
        idx = read_json(d / INDEX)
    except BonsaiCheckpointError:
        return []
    wmap = idx.get("weight_map")
    return [d / s for s in sorted(set(wmap.values()))] if isinstance(wmap, dict) else []


def detect_text_encoder_layout(path) -> str:
    """Which text encoder layout ``path`` holds: "mlx_4bit", "hqq_4bit" or "dense"."""
    p = Path(path)
    if p.is_file() and p.name == HQQ_WEIGHTS:
        return "hqq_4bit"
    d = _resolve_dir(p)
    if (d / HQQ_WEIGHTS).is_file():
        return "hqq_4bit"
    if not _has_weights(d):
        raise BonsaiCheckpointError(f"{d}: not a Bonsai Image text encoder layout this importer knows. "
                                    f"Looked for: {LOOKED_FOR}.")
    if (d / "config.json").is_file():
        try:
            if _mlx_qcfg(read_json(d / "config.json")) is not None:
                return "mlx_4bit"
        except BonsaiCheckpointError:
            pass  # the importer reports the broken config
    for f in _weight_files(d):
        try:
            header, _ = read_safetensors_header(f)
        except BonsaiCheckpointError:
            continue  # the importer reports the broken file
        if any(n.endswith(".scales") for n in header):
            return "mlx_4bit"
    return "dense"


# ---------------------------------------------------------------------------------------------
# Config, expected shapes, rounding bookkeeping, validation
# ---------------------------------------------------------------------------------------------
def _read_config(d: Path, notes: list[str]) -> tuple[dict, dict]:
    """-> (config as in the file, cleaned transformers Qwen3ForCausalLM config)."""
    path = d / "config.json"
    raw = read_json(path)
    mt = raw.get("model_type")
    if mt != "qwen3":
        raise refuse(path, f"model_type = {mt!r}", expected="'qwen3' (the Bonsai Image 4B text encoder is Qwen3-4B)")
    cfg = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
    dropped = [k for k in ("quantization", "quantization_config") if k in raw]
    if dropped:
        notes.append(f"config: removed {dropped} (the weights are dense now)")
    if cfg.get("architectures") != ["Qwen3ForCausalLM"]:
        notes.append(f"config: architectures {cfg.get('architectures')!r} -> ['Qwen3ForCausalLM']")
        cfg["architectures"] = ["Qwen3ForCausalLM"]
    return raw, cfg


def _meta_model(path: Path, config: dict):
    """``Qwen3ForCausalLM(Qwen3Config(**config))`` on the meta device (no memory), for names, shapes, strict load."""
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError as e:  # transformers < 4.51
        raise BonsaiCheckpointError(f"transformers with Qwen3 support (>= 4.51) is needed to import a Qwen3 "
                                    f"text encoder ({e})") from None
    try:
        with torch.device("meta"):
            model = Qwen3ForCausalLM(Qwen3Config(**config))
    except Exception as e:  # a config transformers cannot build
        raise refuse(path, f"transformers cannot build Qwen3ForCausalLM from it ({type(e).__name__}: {e})",
                     expected="a complete Qwen3 config.json") from None
    return model


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _cfg_brief(config: dict) -> str:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size")
    return ", ".join(f"{k}={config.get(k)}" for k in keys)


class _Rounding:
    """Counts values moved by the one rounding from exact (float64) to the target dtype."""

    def __init__(self) -> None:
        self.n_values = 0
        self.n_moved = 0
        self.max_rel = 0.0

    def cast(self, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = exact.to(dtype)
        back = out.to(torch.float64)
        moved = back != exact
        self.n_values += exact.numel()
        n = int(moved.sum())
        if n:
            self.n_moved += n
            nz = moved & (exact != 0)
            if nz.any():
                rel = ((back - exact).abs()[nz] / exact.abs()[nz]).max()
                self.max_rel = max(self.max_rel, float(rel))
            if (moved & (exact == 0)).any() or not torch.isfinite(back[moved]).all():
                self.max_rel = math.inf
        return out

    def describe(self, dtype: torch.dtype) -> str:
        d = str(dtype).replace("torch.", "")
        if not self.n_moved:
            return f"every value exact in {d}"
        return (f"rounded to {d}: {self.n_moved} of {self.n_values} values moved, "
                f"max rel err {self.max_rel:.3g}")


def _check_float_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BonsaiRequestError(f"dtype {dtype!r} is not a float dtype; use torch.bfloat16 (default), "
                                 "torch.float16 or torch.float32")
    return dtype


def _with_tied_head(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    if config.get("tie_word_embeddings") and LM_HEAD not in sd and EMBED in sd:
        sd = dict(sd)
        sd[LM_HEAD] = sd[EMBED]
    return sd


def _finish(path: Path, sd: dict[str, torch.Tensor], config: dict, model, notes: list[str]) -> dict[str, torch.Tensor]:
    """Tied lm_head handling, then names and shapes against Qwen3ForCausalLM, then a strict load on meta."""
    expected = _shapes(model)
    tied = bool(config.get("tie_word_embeddings"))
    if tied and LM_HEAD in sd and EMBED in sd:
        if sd[LM_HEAD].shape == sd[EMBED].shape and torch.equal(sd[LM_HEAD], sd[EMBED]):
            del sd[LM_HEAD]
            notes.append("lm_head.weight equals the embedding and the config ties them: kept once (tied)")
        else:
            raise refuse(path, "differs from model.embed_tokens.weight but the config has tie_word_embeddings "
                               "= true", tensor=LM_HEAD, expected="a copy of the embedding, or an untied config")
    for name, shape in expected.items():
        if name not in sd and not (tied and name == LM_HEAD):
            raise refuse(path, "is missing", tensor=name,
                         expected=f"shape {list(shape)} (Qwen3ForCausalLM, {_cfg_brief(config)})")
    for name, t in sd.items():
        if name not in expected:
            raise refuse(path, "is not a parameter of Qwen3ForCausalLM", tensor=name,
                         expected=f"only the model's parameters ({_cfg_brief(config)})")
        if tuple(t.shape) != expected[name]:
            raise refuse(path, f"has shape {list(t.shape)}", tensor=name,
                         expected=f"{list(expected[name])} (Qwen3ForCausalLM, {_cfg_brief(config)})")
    try:
        model.load_state_dict(_with_tied_head(sd, config), strict=True, assign=True)
    except RuntimeError as e:  # cannot happen after the checks above unless transformers changes
        raise refuse(path, f"does not load into Qwen3ForCausalLM with strict=True ({e})") from None
    return sd


def _plain(path: Path, name: str, t, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise refuse(path, f"is a {type(t).__name__}", tensor=name, expected="a tensor")
    if not t.is_floating_point():
        raise refuse(path, f"dtype {str(t.dtype).replace('torch.', '')} without quantization data", tensor=name,
                     expected="a float tensor (a quantized weight comes with scales and biases/zeros)")
    return t.detach().to(dtype).contiguous()


def _dtypes(ts) -> list[str]:
    return sorted({str(t.dtype).replace("torch.", "") for t in ts})


# ---------------------------------------------------------------------------------------------
# MLX affine
# ---------------------------------------------------------------------------------------------
MLX_BITS = (2, 4, 8)


def unpack_mlx_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words ``[rows, W]`` -> int32 codes ``[rows, W*32/bits]``: code k of word j is column
    ``j*(32/bits) + k``, bits ``k*bits .. k*bits+bits-1`` (LSB first; MLX affine packing)."""
    if bits not in MLX_BITS:
        raise ValueError(f"bits {bits} does not divide 32 evenly into whole codes")
    per = 32 // bits
    w = words.contiguous().view(torch.int32)  # same bits; the mask below drops the arithmetic shift's sign fill
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], w.shape[1] * per)


def _mlx_module_params(qcfg: dict, module: str, qpath: Path) -> tuple[int, int] | None:
    """(group_size, bits) for ``module`` from the MLX quantization dict; None if it says 'not quantized'."""
    over = qcfg.get(module)
    if over is False:
        return None
    src = over if isinstance(over, dict) else qcfg
    gs, bits = src.get("group_size", qcfg.get("group_size")), src.get("bits", qcfg.get("bits"))
    where = f"quantization['{module}']" if isinstance(over, dict) else "quantization"
    if bits not in MLX_BITS:
        raise refuse(qpath, f"{where} has bits = {bits!r}",
                     expected="2, 4 or 8 (codes that fill a uint32 evenly; MLX packs 3/5/6 bits across words, "
                              "which this importer does not read)")
    if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
        raise refuse(qpath, f"{where} has group_size = {gs!r}", expected="a positive integer (64 for Qwen3-4B-4bit)")
    return gs, bits


def _mlx_as_q4(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, cols: int,
               dtype: torch.dtype):
    """MLX affine codes of at most 4 bits as a ``Q4Tensor`` holding the very codes, scales and biases
    (``w = scale*q + bias`` is Q4_AFFINE's own formula), or None when they do not fit it."""
    from ..quant.q4_affine import DTYPE_NAMES, pack_codes
    from ..quant.tensor import Q4Tensor

    if bits > 4 or scales.dtype not in DTYPE_NAMES or biases.dtype not in DTYPE_NAMES or (cols // scales.shape[1]) % 2:
        return None
    if bits == 4 and sys.byteorder == "little":  # a uint32 word's bytes are Q4_AFFINE's bytes, in order
        qs = words.contiguous().view(torch.uint8).reshape(words.shape[0], cols // 2)
    else:
        qs = torch.cat([pack_codes(unpack_mlx_words(words[r0:r0 + 4096], bits))
                        for r0 in range(0, words.shape[0], 4096)])
    return Q4Tensor(qs.clone(), scales.contiguous(), biases.contiguous(), (words.shape[0], cols), dtype)


def _import_mlx(d: Path, dtype: torch.dtype, keep_4bit: bool = False) -> ImportedTextEncoder:
    notes: list[str] = []
    raw_cfg, config = _read_config(d, notes)
    cfg_path = d / "config.json"
    qcfg = _mlx_qcfg(raw_cfg)
    if qcfg is None:
        raise refuse(cfg_path, "has no 'quantization' entry", expected='"quantization": {"group_size": 64, "bits": 4} '
                     "(mlx-lm writes it; group size and bits are not guessed)")
    mode = qcfg.get("mode", "affine")
    if mode != "affine":
        raise refuse(cfg_path, f"quantization mode = {mode!r}", expected="'affine' (w = scale*q + bias)")
    model = _meta_model(cfg_path, config)
    expected = _shapes(model)
    raw, files = load_safetensors_dir(d, WEIGHTS, INDEX)
    where = files[0] if len(files) == 1 else d

    prefixes = sorted(n[:-len(".scales")] for n in raw if n.endswith(".scales"))
    kept: list[str] = []
    consumed: set[str] = set()
    sd: dict[str, torch.Tensor] = {}
    rounding = _Rounding()
    used: dict[tuple[int, int], int] = {}
    sdtypes: set[str] = set()
    for pre in prefixes:
        name = f"{pre}.weight"
        if name not in expected:
            raise refuse(where, "is not a quantized parameter of Qwen3ForCausalLM", tensor=f"{pre}.scales",
                         expected=f"the transformers/mlx-lm Qwen3 names ({_cfg_brief(config)})")
        words, scales, biases = raw.get(name), raw[f"{pre}.scales"], raw.get(f"{pre}.biases")
        if words is None:
            raise refuse(where, "is missing", tensor=name, expected=f"uint32 packed codes beside {pre}.scales")
        if biases is None:
            raise refuse(where, "is missing", tensor=f"{pre}.biases",
                         expected=f"affine biases beside {pre}.scales (mode 'affine')")
        consumed.update({name, f"{pre}.scales", f"{pre}.biases"})
        params = _mlx_module_params(qcfg, pre, cfg_path)
        if params is None:
            raise refuse(where, f"has scales but config.json quantization['{pre}'] is false", tensor=name,
                         expected="a float weight, or a quantization entry for it")
        gs, bits = params
        out, cols = expected[name]
        per = 32 // bits
        if words.dtype != torch.uint32 or tuple(words.shape) != (out, cols // per) or cols % per:
            raise refuse(where, f"is {str(words.dtype).replace('torch.', '')} {list(words.shape)}", tensor=name,
                         expected=f"uint32 [{out}, {cols // per}] = [out, in*{bits}/32] for a [{out}, {cols}] "
                                  f"weight at {bits} bits")
        if cols % gs:
            raise refuse(where, f"in_features {cols} is not a multiple of group_size {gs}", tensor=name,
                         expected="whole groups")
        G = cols // gs
        for leaf, v in (("scales", scales), ("biases", biases)):
            if not v.is_floating_point() or tuple(v.shape) != (out, G):
                raise refuse(where, f"is {str(v.dtype).replace('torch.', '')} {list(v.shape)}", tensor=f"{pre}.{leaf}",
                             expected=f"float [{out}, {G}] = [out, in/group_size] (group_size {gs}, bits {bits})")
        sdtypes.add(str(scales.dtype).replace("torch.", ""))
        used[(gs, bits)] = used.get((gs, bits), 0) + 1
        packed = _mlx_as_q4(words, scales, biases, bits, cols, dtype) if keep_4bit else None
        if packed is not None:
            sd[name] = packed
            kept.append(name)
            continue
        result = torch.empty(out, cols, dtype=dtype)
        step = max(1, _CHUNK // cols)
        for r0 in range(0, out, step):
            r1 = min(out, r0 + step)
            q = unpack_mlx_words(words[r0:r1], bits).to(torch.float64).view(r1 - r0, G, gs)
            exact = q * scales[r0:r1].to(torch.float64).unsqueeze(-1) + biases[r0:r1].to(torch.float64).unsqueeze(-1)
            result[r0:r1] = rounding.cast(exact.view(r1 - r0, cols), dtype)
        sd[name] = result

    n_quant = len(sd)
    plain_dtypes = set()
    for n, t in raw.items():
        if n in consumed:
            continue
        if n.endswith(".biases"):
            raise refuse(where, "has no matching .scales", tensor=n, expected="scales and biases in pairs")
        if n not in expected:
            raise refuse(where, "is not a parameter of Qwen3ForCausalLM", tensor=n,
                         expected=f"the transformers/mlx-lm Qwen3 names ({_cfg_brief(config)})")
        plain_dtypes.add(str(t.dtype).replace("torch.", ""))
        sd[n] = _plain(where, n, t, dtype)

    has_embed = EMBED in sd and EMBED[:-len(".weight")] in prefixes
    n_lin = n_quant - int(has_embed)
    desc = ", ".join(f"{bits}-bit group {gs}: {n}" for (gs, bits), n in sorted(used.items()))
    exact = (f"w = scale*q + bias exactly from the stored {sorted(sdtypes)} scales/biases, "
             f"{rounding.describe(dtype)}")
    if not kept:
        notes.insert(0, f"{n_lin} linears{' + embedding' if has_embed else ''} dequantized from MLX affine ({desc}) "
                        f"to {str(dtype).replace('torch.', '')}: {exact}")
    else:
        n_dense = n_quant - len(kept)
        notes.insert(0, f"{n_lin} linears{' + embedding' if has_embed else ''} read from MLX affine ({desc}): "
                        f"{len(kept)} kept 4-bit as Q4_AFFINE with the file's own codes and {sorted(sdtypes)} "
                        "scales/biases (w = scale*q + bias: every value exact)"
                        + (f"; {n_dense} dequantized to {str(dtype).replace('torch.', '')} (more than 4 bits): "
                           f"{exact}" if n_dense else ""))
    if len(sd) > n_quant:
        notes.append(f"{len(sd) - n_quant} float tensors ({sorted(plain_dtypes)}) taken as they are, "
                     f"cast to {str(dtype).replace('torch.', '')}")
    notes.append(f"read {len(files)} safetensors file(s): {', '.join(f.name for f in files)}")
    sd = _finish(where, sd, config, model, notes)
    return ImportedTextEncoder(state_dict=sd, config=config, source_layout="mlx_4bit", notes=notes)


# ---------------------------------------------------------------------------------------------
# HQQ
# ---------------------------------------------------------------------------------------------
HQQ_PACKINGS = {"8bit_u8": 8, "4bit_u8": 4, "2bit_u8": 2, "1bit_u8": 1}
_HQQ_KNOWN = {"W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing", "unpack_view_dtype",
              "view_as_float", "compute_dtype", "quant_scale", "quant_zero", "bias", "offload_meta",
              "encoded_state_dict", "stores_quant_config", "channel_wise", "optimize", "round_zero",
              "zero_scale", "meta", "device"}
_DTYPES = {str(t): t for t in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                               torch.bfloat16, torch.float32, torch.float64)}


def unpack_hqq(W_q: torch.Tensor, packing: str) -> torch.Tensor:
    """HQQ ``<n>bit_u8`` bytes ``[R, C]`` -> uint8 codes ``[R*8/n, C]``: slice k (rows k*R..(k+1)*R-1)
    comes from bits ``n*(E-1-k)`` up, E = 8/n (hqq/core/bitpack.py; 4 bit: high nibble = first half)."""
    bits = HQQ_PACKINGS[packing]
    per = 8 // bits
    mask = (1 << bits) - 1
    return torch.cat([(W_q >> (bits * (per - 1 - k))) & mask for k in range(per)], dim=0)


def _load_pt(path: Path) -> dict:
    return load_pt_weights_only(
        path, what="an HQQ qmodel.pt",
        expected="a dict {module_name: state_dict} of tensors, numbers, strings and dtypes only (hqq save)")


def _scalar(v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"a tensor of shape {list(v.shape)}")
        return v.item()
    return v


def _as_int(v) -> int:
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"{v!r}")
    return int(v)


def _as_bool(v) -> bool:
    v = _scalar(v)
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    raise ValueError(f"{v!r}")


def _as_str(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1:  # encode_safetensor_type
        return "".join(chr(int(c)) for c in v.tolist())
    raise ValueError(f"a {type(v).__name__}")


def _as_dtype(v) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    s = _as_str(v)
    if s not in _DTYPES:  # a name from the list above; never evaluated
        raise ValueError(f"{s!r}")
    return _DTYPES[s]


def _as_shape(v) -> tuple[int, ...]:
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist()
    if not isinstance(v, (list, tuple, torch.Size)):
        raise ValueError(f"a {type(v).__name__}")
    return tuple(_as_int(x) for x in v)


def _as_number(v) -> float:
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{v!r}")
    return v


def _leaf(path: Path, module: str, leaves: dict, key: str, conv, expected: str, default=...):
    if key not in leaves:
        if default is not ...:
            return default
        raise refuse(path, f"has no '{key}'", tensor=module, expected=f"HQQLinear leaf '{key}' ({expected})")
    try:
        return conv(leaves[key])
    except (ValueError, TypeError) as e:
        raise refuse(path, f"is {e}", tensor=f"{module}.{key}", expected=expected) from None


def _float_leaf(path: Path, name: str, v) -> torch.Tensor:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.tensor(float(v), dtype=torch.float64)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise refuse(path, f"is {getattr(v, 'dtype', type(v).__name__)}", tensor=name, expected="a float tensor")
    return v.detach().to(torch.float64)


def _source_dtype(v) -> torch.dtype:
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32


def _hqq_as_q4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scale_dtype: torch.dtype,
               shape: tuple[int, ...], gs: int | None, axis: int, dtype: torch.dtype):
    """HQQ codes as a ``Q4Tensor`` holding exactly ``(q - zero)*scale``, or None where Q4_AFFINE cannot:
    groups must run along a row (axis 1, ``in`` a multiple of group_size), codes fit 4 bits, and the
    bias ``-(zero*scale)`` must be an exact float32 (it is for 16-bit scale and zero: 11 x 11 bits)."""
    from ..quant.q4_affine import DTYPE_NAMES, pack_codes
    from ..quant.tensor import Q4Tensor

    if axis != 1 or gs is None or gs % 2 or len(shape) != 2 or shape[1] % gs or scale_dtype not in DTYPE_NAMES:
        return None
    if q.numel() == 0 or int(q.max()) > 15:  # an empty weight has no 4-bit form (nor max): the dense path judges it
        return None
    rows, cols = shape
    s = scale.reshape(rows, cols // gs)
    if not torch.equal(s.to(scale_dtype).to(torch.float64), s):
        return None
    b64 = -(zero.reshape(rows, cols // gs) * s)
    b32 = b64.to(torch.float32)
    if not torch.equal(b32.to(torch.float64), b64):
        return None
    return Q4Tensor(pack_codes(q.reshape(rows, cols)), s.to(scale_dtype).contiguous(), b32.contiguous(), shape, dtype)


def _hqq_dequantize(path: Path, module: str, leaves: dict, dtype: torch.dtype,
                    rounding: _Rounding, seen: dict, keep_4bit: bool = False) -> torch.Tensor:
    """One HQQLinear state -> the dense weight ``shape`` in ``dtype`` (exact, rounded once), or with
    ``keep_4bit`` a ``Q4Tensor`` of exactly the same values where the layout allows (``_hqq_as_q4``)."""
    if any(k in leaves for k in ("zero_q", "scale_q", "meta_zero", "meta_scale")) or \
            _leaf(path, module, leaves, "quant_zero", _as_bool, "a bool", False) or \
            _leaf(path, module, leaves, "quant_scale", _as_bool, "a bool", False):
        raise refuse(path, "stores quantized zero/scale (quant_zero/quant_scale, deprecated in hqq)", tensor=module,
                     expected="plain float scale and zero", fix="Re-save the model with a current hqq")
    W_q = leaves["W_q"]
    if not isinstance(W_q, torch.Tensor):
        raise refuse(path, f"is a {type(W_q).__name__}", tensor=f"{module}.W_q", expected="a tensor")
    W_q = W_q.detach()
    packing = _leaf(path, module, leaves, "packing", _as_str, "a packing name such as '4bit_u8'")
    nbits = _leaf(path, module, leaves, "nbits", _as_number, "a number of bits")
    shape = _leaf(path, module, leaves, "shape", _as_shape, "the weight shape [out, in]")
    axis = _leaf(path, module, leaves, "axis", _as_int, "0 or 1")
    gs = _leaf(path, module, leaves, "group_size", lambda v: None if v is None else _as_int(v), "an int or None")
    view_as_float = _leaf(path, module, leaves, "view_as_float", _as_bool, "a bool", False)
    view_dtype = _leaf(path, module, leaves, "unpack_view_dtype", _as_dtype, "a dtype", None)
    compute = _leaf(path, module, leaves, "compute_dtype", _as_dtype, "a dtype", None)
    if axis not in (0, 1):
        raise refuse(path, f"is {axis}", tensor=f"{module}.axis", expected="0 or 1")
    numel = math.prod(shape)

    if packing is None:  # hqq quantize(bitpack=False): W_q holds the codes as floats
        q = W_q.to(torch.float64)
        if not bool((q == q.round()).all()) or bool((q < 0).any()):
            raise refuse(path, "holds non-integer or negative codes with packing None", tensor=f"{module}.W_q",
                         expected="codes 0 .. 2^nbits-1")
        pbits = 8
    elif packing in HQQ_PACKINGS:
        pbits = HQQ_PACKINGS[packing]
        if view_as_float:
            if view_dtype not in (None, torch.uint8):
                raise refuse(path, f"unpack_view_dtype {view_dtype}", tensor=module,
                             expected=f"uint8 for packing {packing!r}")
            W_q = W_q.contiguous().view(torch.uint8)
        if W_q.dtype != torch.uint8 or W_q.dim() != 2:
            raise refuse(path, f"is {str(W_q.dtype).replace('torch.', '')} {list(W_q.shape)} "
                               f"(view_as_float={view_as_float})", tensor=f"{module}.W_q",
                         expected=f"uint8 2-D bytes for packing {packing!r}")
        q = unpack_hqq(W_q, packing)
    else:
        raise refuse(path, f"packing {packing!r} is not supported", tensor=f"{module}.packing",
                     expected=f"one of {sorted(HQQ_PACKINGS)} (hqq's uint8 packings)")
    if nbits > pbits or nbits <= 0:
        raise refuse(path, f"nbits {nbits} does not fit packing {packing!r}", tensor=module,
                     expected=f"nbits <= {pbits}")

    if gs is None:
        if len(shape) != 2:
            raise refuse(path, f"shape {list(shape)} with group_size None", tensor=module, expected="a 2-D shape")
        qshape = tuple(shape)
    else:
        if gs <= 0 or numel % gs:
            raise refuse(path, f"group_size {gs} does not divide shape {list(shape)}", tensor=module,
                         expected="whole groups")
        qshape = (numel // gs, gs) if axis == 1 else (gs, numel // gs)
    if tuple(q.shape) != qshape:
        raise refuse(path, f"W_q {list(W_q.shape)} unpacks ({packing}) to {list(q.shape)}", tensor=f"{module}.W_q",
                     expected=f"{list(qshape)} = the group-reshaped matrix for shape {list(shape)}, group_size {gs}, "
                              f"axis {axis}")

    if "zero_scale" in leaves and ("zero" not in leaves or "scale" not in leaves):
        zs = leaves["zero_scale"]
        if not isinstance(zs, torch.Tensor) or not zs.is_floating_point() or zs.shape[0] != 2:
            raise refuse(path, f"is {getattr(zs, 'dtype', type(zs).__name__)}", tensor=f"{module}.zero_scale",
                         expected="a float tensor stacking (zero, scale) (hqq offload_meta)")
        zero, scale = _float_leaf(path, module, zs[0]), _float_leaf(path, module, zs[1])
        scale_dtype = zs.dtype
    else:
        for k in ("scale", "zero"):
            if k not in leaves:
                raise refuse(path, f"has no '{k}'", tensor=module, expected="HQQLinear leaves 'scale' and 'zero'")
        scale = _float_leaf(path, f"{module}.scale", leaves["scale"])
        zero = _float_leaf(path, f"{module}.zero", leaves["zero"])
        scale_dtype = _source_dtype(leaves["scale"])
    n_per = qshape[0] if axis == 1 else qshape[1]
    b_shape = (-1, 1) if axis == 1 else (1, -1)
    for nm, v in (("scale", scale), ("zero", zero)):
        if v.numel() not in (1, n_per):
            raise refuse(path, f"has shape {list(v.shape)}", tensor=f"{module}.{nm}",
                         expected=f"{n_per} values ({[n_per, 1] if axis == 1 else [1, n_per]} for axis {axis}, "
                                  f"group_size {gs}) or one")
    scale, zero = scale.reshape(b_shape), zero.reshape(b_shape)
    if scale.numel() == 1:
        scale = scale.expand(*(n_per if s == -1 else 1 for s in b_shape))
    if zero.numel() == 1:
        zero = zero.expand(*(n_per if s == -1 else 1 for s in b_shape))

    key = (packing, nbits, gs, axis)
    seen[key] = seen.get(key, 0) + 1
    if compute is not None:
        seen.setdefault(("compute_dtype", str(compute).replace("torch.", "")), 0)
    if keep_4bit:
        packed = _hqq_as_q4(q, scale, zero, scale_dtype, shape, gs, axis, dtype)
        if packed is not None:
            seen[("kept",)] = seen.get(("kept",), 0) + 1
            return packed
    out = torch.empty(qshape, dtype=dtype)
    if axis == 1:
        step = max(1, _CHUNK // qshape[1])
        for r0 in range(0, qshape[0], step):
            r1 = min(qshape[0], r0 + step)
            out[r0:r1] = rounding.cast((q[r0:r1].to(torch.float64) - zero[r0:r1]) * scale[r0:r1], dtype)
    else:
        step = max(1, _CHUNK // qshape[0])
        for c0 in range(0, qshape[1], step):
            c1 = min(qshape[1], c0 + step)
            out[:, c0:c1] = rounding.cast((q[:, c0:c1].to(torch.float64) - zero[:, c0:c1]) * scale[:, c0:c1], dtype)
    return out.reshape(shape)


def _import_hqq(d: Path, dtype: torch.dtype, keep_4bit: bool = False) -> ImportedTextEncoder:
    notes: list[str] = []
    _raw_cfg, config = _read_config(d, notes)
    model = _meta_model(d / "config.json", config)
    pt = d / HQQ_WEIGHTS
    modules = _load_pt(pt)
    sd: dict[str, torch.Tensor] = {}
    rounding = _Rounding()
    seen: dict = {}
    quantized: list[str] = []
    plain_src: list[torch.Tensor] = []
    unknown: set[str] = set()
    for module, leaves in modules.items():
        if not isinstance(module, str):
            raise refuse(pt, f"has a key of type {type(module).__name__}", expected="module names (str)")
        if not isinstance(leaves, dict):
            raise refuse(pt, f"is a {type(leaves).__name__}", tensor=module,
                         expected="a module state dict (hqq save: {module_name: state_dict})")
        leaves = dict(leaves)
        if isinstance(leaves.get("meta"), dict):  # hqq < 0.2 saved {'W_q', 'meta', 'bias'}
            leaves = {**leaves.pop("meta"), **leaves}
        if "W_q" in leaves:
            unknown |= set(leaves) - _HQQ_KNOWN
            name = f"{module}.weight" if module else "weight"
            sd[name] = _hqq_dequantize(pt, module, leaves, dtype, rounding, seen, keep_4bit)
            quantized.append(name)
            if leaves.get("bias") is not None:
                sd[f"{module}.bias"] = _plain(pt, f"{module}.bias", leaves["bias"], dtype)
            continue
        for leaf, t in leaves.items():
            name = f"{module}.{leaf}" if module else str(leaf)
            if t is None:
                raise refuse(pt, "is None", tensor=name, expected="a tensor")
            if isinstance(t, torch.Tensor):
                plain_src.append(t)
            sd[name] = _plain(pt, name, t, dtype)

    # HQQ names are those of the model it quantized: Qwen3ForCausalLM ("model.layers...") or a bare
    # Qwen3Model ("layers...", "embed_tokens", "norm"), which gets the "model." prefix.
    if not any(n.startswith("model.") for n in sd) and any(n.startswith(("layers.", "embed_tokens.")) for n in sd):
        sd = {(n if n.startswith("lm_head.") else f"model.{n}"): t for n, t in sd.items()}
        quantized = [n if n.startswith("lm_head.") else f"model.{n}" for n in quantized]
        notes.append("module names had no 'model.' prefix (a saved Qwen3Model): prefixed to Qwen3ForCausalLM names")

    n_kept = seen.pop(("kept",), 0)
    groups = {k: v for k, v in seen.items() if k[0] != "compute_dtype"}
    computes = sorted(k[1] for k in seen if k[0] == "compute_dtype")
    desc = "; ".join(f"{n}x packing {p!r} nbits {nb} group_size {g} axis {a}" for (p, nb, g, a), n in groups.items())
    exact = f"w = (q - zero)*scale exactly from the stored scale/zero, {rounding.describe(dtype)}"
    if not n_kept:
        notes.insert(0, f"{len(quantized)} HQQ linears dequantized ({desc}) to {str(dtype).replace('torch.', '')}: "
                        + exact + (f"; HQQ compute_dtype {computes}" if computes else ""))
    else:
        n_dense = len(quantized) - n_kept
        notes.insert(0, f"{len(quantized)} HQQ linears read ({desc}): {n_kept} kept 4-bit as Q4_AFFINE with the "
                        "file's own codes and scales, bias = -(zero*scale) in float32 (exact: every value is "
                        "(q - zero)*scale)"
                        + (f"; {n_dense} dequantized to {str(dtype).replace('torch.', '')} (no exact Q4_AFFINE form: "
                           "groups not along a row, codes over 4 bits, or a bias -(zero*scale) that float32 does not "
                           f"hold): {exact}" if n_dense else "")
                        + (f"; HQQ compute_dtype {computes}" if computes else ""))
    if len(sd) > len(quantized):
        notes.append(f"{len(sd) - len(quantized)} float tensors ({_dtypes(plain_src)}) taken as they are, "
                     f"cast to {str(dtype).replace('torch.', '')}")
    if unknown:
        notes.append(f"HQQ leaves not used by the dequantization, ignored: {sorted(unknown)}")
    notes.append(f"read {pt.name} with torch.load(weights_only=True)")
    sd = _finish(pt, sd, config, model, notes)
    return ImportedTextEncoder(state_dict=sd, config=config, source_layout="hqq_4bit", notes=notes)


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------
def _import_dense(d: Path, dtype: torch.dtype) -> ImportedTextEncoder:
    notes: list[str] = []
    raw_cfg, config = _read_config(d, notes)
    qc = raw_cfg.get("quantization_config")
    model = _meta_model(d / "config.json", config)
    raw, files = load_safetensors_dir(d, WEIGHTS, INDEX)
    where = files[0] if len(files) == 1 else d
    sd: dict[str, torch.Tensor] = {}
    for n, t in raw.items():
        if not t.is_floating_point():
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            raise refuse(where, f"dtype {str(t.dtype).replace('torch.', '')}", tensor=n,
                         expected="a float tensor (dense layout)" + (
                             f"; config.json says quant_method {method!r}, which this importer does not read"
                             if method else ""))
        sd[n] = t.to(dtype).contiguous()
    notes.insert(0, f"{len(sd)} dense tensors ({_dtypes(raw.values())}) cast to {str(dtype).replace('torch.', '')}; "
                    f"read {len(files)} safetensors file(s)")
    sd = _finish(where, sd, config, model, notes)
    return ImportedTextEncoder(state_dict=sd, config=config, source_layout="dense", notes=notes)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def import_text_encoder(path, dtype: torch.dtype = torch.bfloat16, keep_4bit: bool = False) -> ImportedTextEncoder:
    """Read a Bonsai Image 4B text encoder folder (``text_encoder-mlx-4bit/``, ``text_encoder-hqq-4bit/``,
    a dense transformers folder, or a repo folder holding one of them) into a Qwen3ForCausalLM state
    dict computing in ``dtype``: dense, or with ``keep_4bit`` every 4-bit weight whose layout Q4_AFFINE
    holds exactly as a ``Q4Tensor`` with the file's own codes, scales and biases (no re-quantization;
    the others dequantized, as the notes say)."""
    dtype = _check_float_dtype(dtype)
    layout = detect_text_encoder_layout(path)
    d = _resolve_dir(path)
    if layout == "mlx_4bit":
        return _import_mlx(d, dtype, keep_4bit)
    if layout == "hqq_4bit":
        return _import_hqq(d, dtype, keep_4bit)
    return _import_dense(d, dtype)


__all__ = ["ImportedTextEncoder", "detect_text_encoder_layout", "import_text_encoder", "unpack_mlx_words",
           "unpack_hqq", "LAYOUTS"]
