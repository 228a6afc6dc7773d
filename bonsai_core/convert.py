"""Turn a full-precision diffusers pipeline folder into a Bonsai folder, and load components back.

``convert_pipeline(src, dst)``: the denoiser (``unet`` or ``transformer``) is quantized with the
family's precision policy, the text encoder only when asked, the VAE stays fp16; tokenizer and
scheduler files are copied. Everything is written into a hidden temporary folder beside ``dst``
and renamed onto ``dst`` only when complete, so a failure never leaves a half-written model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .errors import BonsaiCheckpointError
from .quant.layers import QuantReport, quantize_model
from .quant.policy import PrecisionPolicy, default_policy

# model_index.json `_class_name` -> (family, denoiser component)
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": ("sd_unet", "unet"),
    "StableDiffusionXLPipeline": ("sd_unet", "unet"),
    "Flux2KleinPipeline": ("flux2_klein", "transformer"),
}
DENOISER_CLASSES = {"UNet2DConditionModel": "sd_unet", "Flux2Transformer2DModel": "flux2_klein"}

# Text encoders: embeddings, norms and the output projection stay 16-bit.
TEXT_ENCODER_KEEP = ("*embed*", "*norm*", "text_projection", "lm_head")

BONSAI_INDEX_KEY = "_bonsai"


@dataclass
class ConvertResult:
    dst: Path
    family: str
    reports: dict[str, QuantReport] = field(default_factory=dict)
    bytes_before: int = 0   # every model component, at fp16
    bytes_after: int = 0

    def table(self, all_rows: bool = False) -> str:
        parts = []
        for comp, rep in self.reports.items():
            parts.append(f"== {comp} (policy {rep.policy.name}) ==")
            parts.append(rep.table(max_rows=None if all_rows else 40))
        parts.append("")
        parts.append(f"whole model: {self.bytes_before / 2**20:.1f} MB at fp16 -> {self.bytes_after / 2**20:.1f} MB "
                     f"(ratio 1/{self.bytes_before / max(self.bytes_after, 1):.2f})")
        return "\n".join(parts)


def read_model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    if not path.is_file():
        raise BonsaiCheckpointError(
            f"{folder}: no model_index.json; expected a diffusers pipeline folder (unet/ or transformer/, "
            "vae/, text_encoder/, tokenizer/, scheduler/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BonsaiCheckpointError(f"{path}: not valid JSON ({exc})") from exc


def family_of(index: dict, folder: Path) -> tuple[str, str]:
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


def _component_class(library: str, class_name: str):
    import importlib

    if library not in ("diffusers", "transformers"):
        raise BonsaiCheckpointError(f"component library {library!r} is not supported (diffusers or transformers)")
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BonsaiCheckpointError(
            f"{library} {getattr(module, '__version__', '?')} has no class {class_name!r}; upgrade {library}")
    return cls


def build_skeleton(component_dir: Path, library: str, class_name: str) -> nn.Module:
    """The component's module tree with parameters on the meta device (no memory for weights)."""
    from accelerate import init_empty_weights

    cls = _component_class(library, class_name)
    with init_empty_weights():
        if library == "diffusers":
            model = cls.from_config(cls.load_config(component_dir))
        else:
            from transformers import AutoConfig

            model = cls._from_config(AutoConfig.from_pretrained(component_dir))
    return model


def is_bonsai_component(component_dir: Path) -> bool:
    return any(checkpoint.is_bonsai_file(p) for p in Path(component_dir).glob("*.safetensors"))


def load_component(folder: Path, name: str, entry: list, dtype: torch.dtype | None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Load one pipeline component: a Bonsai file through the skeleton, anything else through
    its library's ``from_pretrained`` (safetensors only)."""
    library, class_name = entry
    comp_dir = Path(folder) / name
    if not comp_dir.is_dir():
        raise BonsaiCheckpointError(f"{folder}: model_index.json names component {name!r} but {comp_dir} is missing")
    if is_bonsai_component(comp_dir):
        cf = checkpoint.read_tensors(checkpoint.find_weights(comp_dir))
        model = build_skeleton(comp_dir, library, class_name)
        return checkpoint.load_into(model, cf, dtype=dtype, device=device)
    cls = _component_class(library, class_name)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(comp_dir, use_safetensors=True, **kwargs)
    except (OSError, EnvironmentError, ValueError) as exc:
        raise BonsaiCheckpointError(f"{comp_dir}: cannot load {class_name} ({exc})") from exc
    return model.to(device).eval().requires_grad_(False)


def _quantize_and_save(model: nn.Module, out_dir: Path, src_dir: Path, *, family: str, component: str,
                       policy: PrecisionPolicy, weights_name: str) -> QuantReport:
    report = quantize_model(model, policy, reference_dtype=torch.float16)
    model.to(torch.float16)  # kept layers, norms and biases in fp16; Q1_0 scales stay as they are
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise BonsaiCheckpointError(f"{src_dir}: a kept tensor of {component} is not finite in fp16; "
                                        "the source holds NaN/inf or values beyond fp16 range")
    tensors, reasons = checkpoint.model_tensors(model)
    checkpoint.save_tensors(out_dir / weights_name, tensors, family=family, component=component,
                            policy=policy.to_dict(), reasons=reasons, tied=checkpoint.tied_names(model))
    for f in src_dir.glob("*.json"):
        shutil.copy2(f, out_dir / f.name)
    return report


def _check_finite(model: nn.Module, where: Path) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise BonsaiCheckpointError(f"{where}: weight {name!r} holds NaN or inf; the source model is broken")


def convert_pipeline(src: str | Path, dst: str | Path, *, quantize_text_encoder: bool = False,
                     policy: PrecisionPolicy | None = None, overwrite: bool = False,
                     log=print) -> ConvertResult:
    """Convert a full-precision diffusers pipeline folder ``src`` into a Bonsai folder ``dst``."""
    src, dst = Path(src), Path(dst)
    index = read_model_index(src)
    family, denoiser = family_of(index, src)
    if dst.exists() and not overwrite:
        raise BonsaiCheckpointError(f"{dst} already exists; pick another destination or pass --overwrite")
    policy = policy or default_policy(family)
    result = ConvertResult(dst=dst, family=family)
    with checkpoint.staged_dir(dst) as tmp:
        new_index = dict(index)
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
                continue
            if entry[0] is None:
                continue
            comp_src = src / name
            comp_dst = tmp / name
            if name in ("safety_checker", "feature_extractor"):
                new_index[name] = [None, None]  # not carried: guardrails live in bonsai_core
                continue
            if entry[0] not in ("diffusers", "transformers") or "Scheduler" in entry[1] or "Tokenizer" in entry[1]:
                shutil.copytree(comp_src, comp_dst)
                continue
            log(f"loading {name} ({entry[1]}) from {comp_src}")
            cls = _component_class(*entry)
            try:
                model = cls.from_pretrained(comp_src, torch_dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise BonsaiCheckpointError(f"{comp_src}: cannot load {entry[1]} ({exc})") from exc
            _check_finite(model, comp_src)
            before = sum(p.numel() * 2 for p in model.parameters())
            comp_dst.mkdir(parents=True)
            if name == denoiser or (name == "text_encoder" and quantize_text_encoder):
                pol = policy if name == denoiser else PrecisionPolicy(name="text_encoder_default", keep=TEXT_ENCODER_KEEP)
                weights = checkpoint.WEIGHTS_NAME if entry[0] == "diffusers" else checkpoint.TE_WEIGHTS_NAME
                log(f"quantizing {name} with policy {pol.name}")
                report = _quantize_and_save(model, comp_dst, comp_src, family=family, component=name,
                                            policy=pol, weights_name=weights)
                result.reports[name] = report
                after = report.bytes_after
            else:
                model.to(torch.float16).save_pretrained(comp_dst, safe_serialization=True)
                after = before
            result.bytes_before += before
            result.bytes_after += after
            del model
        for extra in src.iterdir():  # top-level files beside the components (bonsai.json, chat templates, licences)
            if extra.is_file() and extra.name != "model_index.json":
                shutil.copy2(extra, tmp / extra.name)
        new_index[BONSAI_INDEX_KEY] = {"format_version": checkpoint.FORMAT_VERSION, "family": family,
                                       "quantized": sorted(result.reports)}
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2))
    return result
