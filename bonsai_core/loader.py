"""Load Bonsai models: from a folder's ``model_index.json`` to modules on a device.

The path a newcomer follows is ``checkpoint.py`` (the file format) -> this module (folders,
skeletons, filling them) -> ``quant/layers.py`` (the Q1_0 layers) -> ``families/`` (how a model
family runs its modules) -> ``sampling.py`` (the denoising loop).

A component stored as a Bonsai file is built as a skeleton on the meta device (no memory for
weights); every layer the file holds as Q1_0 becomes a ``BonsaiLinear`` / ``BonsaiConv2d``, and the
file's tensors are assigned through ``load_state_dict`` under their own keys (a Q1_0 weight is one
``Q1Tensor`` at ``<module>.weight``), so no full-precision copy of a quantized weight ever exists
and no key is renamed. The loader trusts the file, not its own defaults: the file says, tensor by
tensor, what it holds. Any other component loads through its library's ``from_pretrained``
(safetensors only: nothing is unpickled).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, validate
from .checkpoint import ComponentFile
from .errors import BonsaiCheckpointError
from .quant.layers import QUANTIZED_TYPES, empty_like_float
from .quant.tensor import PackedTensor

# model_index.json `_class_name` -> (family, denoiser component)
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": ("sd_unet", "unet"),
    "StableDiffusionXLPipeline": ("sd_unet", "unet"),
    "Flux2KleinPipeline": ("flux2_klein", "transformer"),
}
DENOISER_CLASSES = {"UNet2DConditionModel": "sd_unet", "Flux2Transformer2DModel": "flux2_klein"}



def read_model_index(folder: Path) -> dict:
    """The folder's checked ``model_index.json``. For a supported family every small file of the
    folder is checked too (``validate.check_folder``: components present, configs in range, tokenizer,
    scheduler, ``bonsai.json``), so every entry point refuses a broken folder before building anything."""
    folder = Path(folder)
    if not folder.exists():
        checkpoint.clean_stale(folder)  # a model a killed --overwrite had moved aside comes back
    path = folder / "model_index.json"
    if not path.exists() and not path.is_symlink():
        raise BonsaiCheckpointError(
            f"{folder}: no model_index.json; expected a diffusers pipeline folder (unet/ or transformer/, "
            "vae/, text_encoder/, tokenizer/, scheduler/)")
    index = validate.check_model_index(validate.read_json_file(path, "model_index.json", kind=object), path)
    try:
        family, _ = family_of(index, folder)
    except BonsaiCheckpointError:
        return index  # not a supported family: family_of says so where the caller asks
    validate.check_folder(folder, index, family)
    return index


def family_of(index: dict, folder: Path) -> tuple[str, str]:
    validate.check_model_index(index, Path(folder) / "model_index.json")
    cls = index.get("_class_name", "")
    if cls in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[cls]
    for comp in ("unet", "transformer"):
        entry = index.get(comp)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] in DENOISER_CLASSES:
            return DENOISER_CLASSES[entry[1]], comp
    raise BonsaiCheckpointError(
        f"{folder}/model_index.json: pipeline {cls!r} is not a supported family; supported: "
        f"{', '.join(PIPELINE_FAMILIES)}")


def component_class(library: str, class_name: str):
    """The diffusers / transformers class a ``model_index.json`` entry names."""
    if not isinstance(class_name, str) or not class_name.isidentifier():
        raise BonsaiCheckpointError(f"component class {class_name!r} is not a class name")
    if library not in ("diffusers", "transformers"):
        raise BonsaiCheckpointError(f"component library {library!r} is not supported (diffusers or transformers)")
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BonsaiCheckpointError(
            f"{library} {getattr(module, '__version__', '?')} has no class {class_name!r}; upgrade {library}")
    return cls


def build_skeleton(component_dir: Path, library: str, class_name: str) -> nn.Module:
    """The component's module tree with parameters on the meta device (no memory for weights).

    The config is checked first (``validate.read_component_config``: sizes bounded, epsilons
    positive), so no value a real model cannot hold reaches the library; whatever else the library
    refuses in the config is a ``BonsaiCheckpointError`` naming it."""
    from accelerate import init_empty_weights

    component_dir = Path(component_dir)
    cls = component_class(library, class_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BonsaiCheckpointError(f"{component_dir}: {library}.{class_name} is not a model class")
    cfg = validate.read_component_config(component_dir)
    try:
        with init_empty_weights():
            if library == "diffusers":
                model = cls.from_config(cls.load_config(component_dir))
            else:
                from transformers import AutoConfig

                model = cls._from_config(AutoConfig.from_pretrained(component_dir))
    except BonsaiCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - the library's refusal of a config value, whatever its type
        raise BonsaiCheckpointError(
            f"{component_dir / 'config.json'}: {class_name} cannot be built from this config "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"restore the model's config.json (model_type {cfg.get('model_type', cfg.get('_class_name'))!r})"
        ) from None
    return model


def is_bonsai_component(component_dir: Path) -> bool:
    """True when a ``.safetensors`` file of the folder is a Bonsai file, even a broken one (a
    truncated Bonsai file is reported as broken, never taken for a dense component)."""
    return any(checkpoint.sniff_format(p) in ("bonsai", "broken-bonsai")
               for p in sorted(Path(component_dir).glob("*.safetensors")))


def check_component(folder: Path, name: str, entry: list) -> tuple[nn.Module, list[Path], bool]:
    """Check one component before loading it: its folder, config, a skeleton built from the config
    on the meta device, and the weight files' headers against that skeleton, name for name and
    shape for shape. Returns ``(skeleton, weight files, is_bonsai)``; reads no tensor data."""
    library, class_name = entry
    comp_dir = Path(folder) / name
    if not comp_dir.is_dir():
        raise BonsaiCheckpointError(f"{folder}: model_index.json names component {name!r} but {comp_dir} is missing")
    validate.check_folder_entries(comp_dir, name)
    files = validate.weight_files(comp_dir)
    if not files:
        pickles = [p.name for p in comp_dir.iterdir() if p.suffix in validate.PICKLE_SUFFIXES]
        raise BonsaiCheckpointError(
            f"{comp_dir}: no .safetensors weights{' (only ' + ', '.join(pickles) + ', never unpickled)' if pickles else ''}"
            "; save the component with safe_serialization=True")
    kinds = {p: checkpoint.sniff_format(p) for p in files}
    for p, kind in kinds.items():
        if kind == "broken-bonsai":
            checkpoint.read_header(p)  # raises, saying what is wrong
        if kind == "broken":
            from .importers import read_safetensors_header
            read_safetensors_header(p)  # raises with the reason
            raise BonsaiCheckpointError(f"{p}: not a readable safetensors file; download or convert it again")
    model = build_skeleton(comp_dir, library, class_name)
    want, tied = validate.skeleton_shapes(model)
    bonsai = any(k == "bonsai" for k in kinds.values())
    if bonsai:
        weights = checkpoint.find_weights(comp_dir)
        meta = checkpoint.read_header(weights)
        have = {k: tuple(v["shape"]) for k, v in meta["tensors"].items()}
        have.update({k: want.get(k, ()) for k in meta.get("tied", {}) if k in want})
        validate.check_coverage(weights, have, want, tied, f"{class_name}")
    else:
        validate.check_coverage(comp_dir, validate.header_shapes(files), want, tied, class_name)
    return model, files, bonsai


def _fail(path: Path, what: str) -> BonsaiCheckpointError:
    return BonsaiCheckpointError(f"{path}: {what}")


def load_into(model: nn.Module, cf: ComponentFile, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> nn.Module:
    """Fill a skeleton ``model`` (built on the meta device) with the tensors of ``cf``.

    Layers the file holds as Q1_0 become ``BonsaiLinear``/``BonsaiConv2d`` computing in ``dtype``;
    dense floating tensors are cast to ``dtype`` (when given). Shapes are checked against the skeleton.
    """
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, t in cf.tensors.items():
        mod_name, _, leaf = name.rpartition(".")
        if isinstance(t, PackedTensor):
            module = modules.get(mod_name)
            # Q1_0: linears and convs; Q4_AFFINE: linears, and embeddings (rows expanded as looked up)
            kinds = (nn.Linear, nn.Conv2d) if t.qtype == "Q1_0" else (nn.Linear, nn.Embedding)
            if module is None or leaf != "weight" or not isinstance(module, kinds):
                raise _fail(cf.path, f"tensor {name!r} is {t.qtype} but the model has no "
                                     f"{'/'.join(k.__name__ for k in kinds)} named {mod_name!r}: wrong model for this file")
            if tuple(module.weight.shape) != tuple(t.shape):
                raise _fail(cf.path, f"tensor {name!r} has shape {list(t.shape)}, the model expects "
                                     f"{list(module.weight.shape)}")
            if not isinstance(module, (*QUANTIZED_TYPES, nn.Embedding)):
                q = empty_like_float(module, device="meta", dtype=dtype)
                parent_name, _, attr = mod_name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
                modules[mod_name] = q
            state[name] = t.to(device=device, dtype=dtype or t.dtype)  # dtype: compute dtype; scales stay fp16
        else:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[name] = t.to(device)
    for name, source in cf.meta.get("tied", {}).items():
        state[name] = state[source]  # same tensor: the tie costs no memory; tie_weights() below restores it
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise _fail(cf.path, f"tensor {name!r} has shape {list(t.shape)}, the model expects "
                                 f"{list(expected[name].shape)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected or missing:
        raise _fail(cf.path, f"tensors do not match the model: missing {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                             f"{' ...' if len(unexpected) > 6 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    if cf.meta.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    # Buffers that are not in files (non-persistent: CLIP's position_ids, rotary tables) were made by
    # the skeleton on the CPU: move them where the model runs, keeping their dtype.
    for mod in model.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and not buf.is_meta and buf.device != torch.device(device):
                mod._buffers[bname] = buf.to(device)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            raise _fail(cf.path, "a tensor of the model was not filled from the file")
    return model.eval().requires_grad_(False)


def load_component(folder: Path, name: str, entry: list, dtype: torch.dtype | None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Load one pipeline component: a Bonsai file through the skeleton, anything else through
    its library's ``from_pretrained`` (safetensors only). ``check_component`` runs first: a
    component whose weights do not cover its model is refused, never filled with random values."""
    library, class_name = entry
    comp_dir = Path(folder) / name
    model, _files, bonsai = check_component(folder, name, entry)
    if bonsai:
        cf = checkpoint.read_tensors(checkpoint.find_weights(comp_dir))
        return load_into(model, cf, dtype=dtype, device=device)
    del model
    cls = component_class(library, class_name)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(comp_dir, use_safetensors=True, **kwargs)
    except (OSError, EnvironmentError, ValueError, RuntimeError) as exc:
        raise BonsaiCheckpointError(f"{comp_dir}: cannot load {class_name} ({exc})") from exc
    return model.to(device).eval().requires_grad_(False)


def read_text_encoder(path) -> tuple[dict, dict[str, torch.Tensor], tuple[int, ...]]:
    """A Bonsai text encoder for a host that builds its own module (ComfyUI's CLIP): ``(transformers
    config, tensors, hidden-state layers of the prompt embedding)``. ``path``: a Bonsai model folder
    (its ``text_encoder/``) or a text encoder folder. The tensors are the file's, checked (packed
    weights stay ``Q4Tensor`` / ``Q1Tensor``); a tied name gets the tensor it is tied to."""
    from .families.flux2_klein import text_encoder_out_layers

    path = Path(path)
    te_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    model_dir = te_dir.parent if te_dir != path else path
    if not te_dir.is_dir():
        raise BonsaiCheckpointError(f"{path}: not a folder; expected a Bonsai model folder or its text_encoder/ folder")
    config = validate.read_component_config(te_dir)
    files = validate.weight_files(te_dir)
    if not any(checkpoint.sniff_format(p) in ("bonsai", "broken-bonsai") for p in files):
        raise BonsaiCheckpointError(
            f"{te_dir}: no Bonsai text encoder file (a dense one needs no Bonsai loader: use ComfyUI's own); "
            "make one with `bonsai import` (public 4-bit payloads) or `bonsai convert --quantize-text-encoder`")
    cf = checkpoint.read_tensors(checkpoint.find_weights(te_dir))
    tensors = dict(cf.tensors)
    for name, source in cf.meta.get("tied", {}).items():
        tensors[name] = tensors[source]
    layers = text_encoder_out_layers(model_dir if (model_dir / "bonsai.json").is_file() else te_dir)
    return config, tensors, layers
