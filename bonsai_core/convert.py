"""Turn a full-precision diffusers pipeline folder into a Bonsai folder (loading is ``loader.py``).

``convert_pipeline(src, dst)``: the denoiser (``unet`` or ``transformer``) is quantized with the
family's precision policy, the text encoder only when asked (4-bit Q4_AFFINE by default, round to
nearest per group of 64, its prompt embeddings compared with the dense encoder's: cosine per
token), the VAE stays fp16; tokenizer and
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
from .loader import check_component, component_class, family_of, read_model_index
from .quant.tensor import Q1Tensor, Q4Tensor
from .quant.layers import QuantReport, quantize_model
from .quant.policy import TEXT_ENCODER_KEEP, PrecisionPolicy, default_policy, text_encoder_policy

BONSAI_INDEX_KEY = "_bonsai"


@dataclass
class ConvertResult:
    dst: Path
    family: str
    reports: dict[str, QuantReport] = field(default_factory=dict)
    bytes_before: int = 0   # every model component, at fp16
    bytes_after: int = 0
    embedding_error: dict[str, dict] = field(default_factory=dict)  # component -> embedding_error()

    def table(self, all_rows: bool = False) -> str:
        parts = []
        for comp, rep in self.reports.items():
            parts.append(f"== {comp} (policy {rep.policy.name}) ==")
            parts.append(rep.table(max_rows=None if all_rows else 40))
            err = self.embedding_error.get(comp)
            if err:
                parts.append(f"prompt embeddings vs the dense {comp}: cosine per token min {err['cos_min']:.5f} "
                             f"mean {err['cos_mean']:.5f} ({err['tokens']} tokens of {err['prompts']} probe prompts; "
                             f"{err['output']})")
        parts.append("")
        parts.append(f"whole model: {self.bytes_before / 2**20:.1f} MiB at fp16 -> {self.bytes_after / 2**20:.1f} MiB "
                     f"(ratio 1/{self.bytes_before / max(self.bytes_after, 1):.2f})")
        return "\n".join(parts)


def _quantize_and_save(model: nn.Module, out_dir: Path, src_dir: Path, *, family: str, component: str,
                       policy: PrecisionPolicy, weights_name: str) -> QuantReport:
    report = quantize_model(model, policy, reference_dtype=torch.float16)
    _check_scales(model, src_dir, component)
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


def _check_scales(model: nn.Module, src_dir: Path, component: str) -> None:
    """Refuse (rather than saturate) a group whose scale, mean |w|, is beyond fp16 (65504): its file
    would hold an infinite scale, which the loader refuses. Saturating would silently change the
    layer's output; the source model is what needs fixing."""
    for name, t in model.state_dict().items():
        bad = t.first_nonfinite() if isinstance(t, (Q1Tensor, Q4Tensor)) else None
        if bad is not None:
            _part, row, group = bad
            raise BonsaiCheckpointError(
                f"{src_dir}: {component} weight {name!r}, row {row}, group {group}: the group's scale (Q1_0: its "
                "mean |w|; Q4_AFFINE: its range / 15, or its minimum) is beyond fp16's range (65504), so its "
                f"{t.qtype} scale would be infinite; nothing was written. "
                "Rescale the layer (or keep it in 16-bit with a policy pattern) and convert again")


def _check_finite(model: nn.Module, where: Path) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise BonsaiCheckpointError(f"{where}: weight {name!r} holds NaN or inf; the source model is broken")


PROBE_PROMPTS = ("a bonsai tree on a wooden table, morning light", "a red fox in the snow",
                 "an astronaut riding a horse, oil painting", "close-up portrait of an old fisherman, 35mm photo")


def _probe_ids(src: Path, model: nn.Module) -> torch.Tensor:
    """Token ids of the probe prompts, from the pipeline's own tokenizer where it loads (random ids,
    seeded, where it does not), padded to one length."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src / "tokenizer")
        rows = [[i for i in tok(p).input_ids if i < vocab][:77] for p in PROBE_PROMPTS]
        if all(rows):
            n = min(len(r) for r in rows)
            return torch.tensor([r[:n] for r in rows])
    except Exception:  # noqa: BLE001 - no usable tokenizer: the probe falls back to seeded ids
        pass
    return torch.randint(0, vocab, (len(PROBE_PROMPTS), 16), generator=torch.Generator().manual_seed(0))


def _embeddings(model: nn.Module, ids: torch.Tensor, layers: tuple[int, ...] | None) -> tuple[torch.Tensor, str]:
    """What a pipeline takes from a text encoder: CLIP's last hidden state, or (a decoder such as Qwen3)
    the hidden states ``layers`` side by side (FLUX.2 [klein] reads 9, 18, 27)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    if getattr(out, "last_hidden_state", None) is not None and layers is None:
        return out.last_hidden_state.float(), "last hidden state"
    layers = tuple(v for v in (layers or (len(hs) - 1,)) if abs(v) < len(hs)) or (len(hs) - 1,)
    return torch.cat([hs[v].float() for v in layers], dim=-1), f"hidden states {list(layers)}"


def embedding_error(dense: torch.Tensor, quant: torch.Tensor) -> dict:
    """Cosine similarity per token of two embeddings ``[B, T, D]``: min and mean over every token."""
    cos = torch.nn.functional.cosine_similarity(dense.double(), quant.double(), dim=-1).flatten()
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "tokens": int(cos.numel())}


def _klein_layers(src: Path, family: str) -> tuple[int, ...] | None:
    if family != "flux2_klein":
        return None
    from .families.flux2_klein import text_encoder_out_layers

    return text_encoder_out_layers(src)


def convert_pipeline(src: str | Path, dst: str | Path, *, quantize_text_encoder: bool = False,
                     policy: PrecisionPolicy | None = None, overwrite: bool = False,
                     log=print, text_encoder_qtype: str = "Q4_AFFINE") -> ConvertResult:
    """Convert a full-precision diffusers pipeline folder ``src`` into a Bonsai folder ``dst``."""
    src, dst = Path(src), Path(dst)
    index = read_model_index(src)
    family, denoiser = family_of(index, src)
    for line in checkpoint.clean_stale(dst):  # what a killed run left (a model it had moved aside comes back)
        log(line)
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
            check_component(src, name, entry)  # config in range, weights cover the model: never random values
            cls = component_class(*entry)
            try:
                model = cls.from_pretrained(comp_src, torch_dtype=torch.float32)
            except (OSError, ValueError, RuntimeError) as exc:
                raise BonsaiCheckpointError(f"{comp_src}: cannot load {entry[1]} ({exc})") from exc
            _check_finite(model, comp_src)
            before = sum(p.numel() * 2 for p in model.parameters())
            comp_dst.mkdir(parents=True)
            if name == denoiser or (name == "text_encoder" and quantize_text_encoder):
                if name == denoiser:
                    pol = policy
                elif text_encoder_qtype == "Q4_AFFINE":
                    pol = text_encoder_policy()
                else:
                    pol = PrecisionPolicy(name="text_encoder_default", keep=TEXT_ENCODER_KEEP)
                weights = checkpoint.WEIGHTS_NAME if entry[0] == "diffusers" else checkpoint.TE_WEIGHTS_NAME
                probe = None
                if name != denoiser:  # the dense encoder's embeddings, before its weights are replaced
                    ids, layers = _probe_ids(src, model), _klein_layers(src, family)
                    probe = (ids, layers, *_embeddings(model, ids, layers))
                log(f"quantizing {name} with policy {pol.name}")
                report = _quantize_and_save(model, comp_dst, comp_src, family=family, component=name,
                                            policy=pol, weights_name=weights)
                result.reports[name] = report
                if probe is not None:  # as the file holds it: kept tensors in fp16, computed in fp32
                    ids, layers, want, what = probe
                    got, _ = _embeddings(model.float(), ids, layers)
                    err = embedding_error(want, got)
                    result.embedding_error[name] = {**err, "prompts": int(ids.shape[0]), "output": what}
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
