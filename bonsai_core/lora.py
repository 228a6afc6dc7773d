"""LoRA files on a Bonsai model: read, map to layers, attach as side branches, detach.

A LoRA file (safetensors only; nothing is unpickled) holds low-rank pairs ``down [r, in]`` /
``up [out, r]`` per layer. Every pair becomes a side branch of its layer (``quant/layers.py``:
the 1-bit layers' own slot, or the same slot given to a dense layer the precision policy kept in
16-bit, or a text encoder's), so the output is ``base(x) + strength * scale * up(down(x))`` and
the packed bits are never rewritten; unloading detaches the branches and the model is exactly
what it was. Several adapters sit side by side, each with its own strength.

Key layouts are read by diffusers' own loaders, not by a key map of ours: the ``lora_state_dict``
class methods of ``StableDiffusionLoraLoaderMixin`` / ``StableDiffusionXLLoraLoaderMixin`` (kohya
``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, sgm block names via the UNet
config) and ``Flux2LoraLoaderMixin`` (kohya and ai-toolkit FLUX.2 files, PEFT ``base_model.model``),
then ``diffusers.utils.state_dict_utils`` to PEFT names (``<module>.lora_A.weight`` /
``lora_B.weight``), as diffusers' ``load_lora_adapter`` / ``_load_lora_into_text_encoder`` do.
Those class methods only rename tensors in a dict; PEFT is not needed.

Scale: a kohya file's per-layer ``alpha`` gives ``alpha / rank`` for that layer (folded into ``up``
before diffusers renames the keys: diffusers' own alpha bookkeeping keeps one alpha per file
plus patterns, and exact per-layer scales are simpler to get right here); a diffusers/PEFT file
written by diffusers carries ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``,
``use_rslora``), else the scale is 1 (PEFT's convention without alphas). FLUX.2 kohya files come
with their alphas already folded in by diffusers' converter.

What is attached where: SD-family models, the UNet and the text encoder(s) (text-encoder keys
clear the prompt cache, since the embeddings change); FLUX.2 [klein], the transformer only (as
diffusers' ``Flux2LoraLoaderMixin``), so text-encoder keys there count as unmatched.

Unmatched keys: every key of the file must land on a layer of this model with a fitting shape.
By default (``strict``) a file with any key that does not is refused, naming the keys: a LoRA
made for another model often matches a part by name, and a half-applied style is a wrong image
that looks plausible. ``strict=False`` attaches what fits and warns with the full list of what
did not (still an error when nothing fits).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BonsaiCheckpointError, BonsaiRequestError
from .quant import layers

LORA_EXTENSIONS = (".safetensors", ".sft")  # .sft: ComfyUI's short name for safetensors
MAX_LISTED = 12  # unmatched keys named in one message (the count says how many more)


@dataclass
class Branch:
    component: str
    module: str
    down: torch.Tensor
    up: torch.Tensor  # the file's scale folded in


@dataclass
class LoRAFile:
    """One file, read and mapped onto one model's layers (nothing attached yet)."""

    path: Path
    branches: list[Branch]
    unmatched: list[str] = field(default_factory=list)  # "key: why"

    @property
    def components(self) -> set[str]:
        return {b.component for b in self.branches}


@dataclass
class Adapter:
    """An attached adapter: its file, strength, and the layers it is attached to."""

    name: str
    path: Path
    signature: tuple
    strength: float
    modules: list[tuple[str, nn.Module]]  # (component.module, layer)
    components: set[str]


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:STRENGTH`` (the CLI's ``--lora``); a Windows drive colon stays in the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def file_signature(path: Path) -> tuple:
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def read_lora_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors (fp32 on the CPU) and its safetensors metadata."""
    from safetensors import SafetensorError, safe_open

    from .validate import check_regular_file

    path = Path(path)
    if path.suffix.lower() not in LORA_EXTENSIONS:
        raise BonsaiCheckpointError(
            f"{path}: LoRA files are read as .safetensors only (a {path.suffix or 'file without extension'} may "
            "hold pickled code, which is never loaded); convert it to safetensors first")
    check_regular_file(path, "LoRA file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BonsaiCheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not tensors:
        raise BonsaiCheckpointError(f"{path}: the file holds no tensors")
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise BonsaiCheckpointError(f"{path}: a LoRA holds float tensors; {bad[:3]} are {tensors[bad[0]].dtype}")
    return {k: t.float() for k, t in tensors.items()}, meta


def components_of(family) -> dict[str, nn.Module]:
    """The modules a LoRA of this family may target, by the name diffusers gives them."""
    mods = family.modules()
    if family.name == "flux2_klein":
        return {"transformer": mods["transformer"]}
    return {k: v for k, v in mods.items() if k != "vae" and isinstance(v, nn.Module)}


def _refuse_other_kinds(path: Path, sd: dict) -> None:
    kinds = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".lokr_": "LoKr", ".hada_": "LoHa",
             "lycoris_": "LyCORIS"}
    for marker, kind in kinds.items():
        hit = next((k for k in sd if marker in k), None)
        if hit:
            raise BonsaiCheckpointError(f"{path}: a {kind} adapter ({hit}); only plain LoRA (low-rank down/up pairs) "
                                        "can be attached as side branches")


def _fold_kohya_alphas(sd: dict) -> dict:
    """kohya's ``<name>.alpha`` -> ``<name>.lora_up.weight * alpha / rank``, per layer."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".alpha")]:
        name = key[: -len(".alpha")]
        down, up = out.get(name + ".lora_down.weight"), out.get(name + ".lora_up.weight")
        if down is None or up is None:
            continue  # left for the unmatched list
        out[name + ".lora_up.weight"] = up * (float(out.pop(key)) / down.shape[0])
    return out


def _diffusers_names(family, sd: dict, path: Path) -> dict[str, torch.Tensor]:
    """``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` (and whatever did not convert)."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    try:
        if family.name == "flux2_klein":
            from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

            # diffusers' ai-toolkit converter reads every key as "diffusion_model.<BFL name>": keys of other
            # parts (a text encoder's) go around it, to be named as unmatched below
            aside = {}
            if any(k.startswith("diffusion_model.") for k in sd):
                aside = {k: v for k, v in sd.items() if not k.startswith("diffusion_model.")}
                sd = {k: v for k, v in sd.items() if k.startswith("diffusion_model.")}
            sd = {**Flux2LoraLoaderMixin.lora_state_dict(dict(sd)), **aside}
            denoiser = "transformer"
        else:
            from diffusers.loaders.lora_pipeline import (StableDiffusionLoraLoaderMixin,
                                                         StableDiffusionXLLoraLoaderMixin)

            sd = _fold_kohya_alphas(sd)
            if getattr(family, "xl", False):
                sd, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(sd), unet_config=family.unet.config)
            else:
                sd, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(sd))
            denoiser = "unet"
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise BonsaiCheckpointError(f"{path}: diffusers cannot read this LoRA's keys for a {family.name} model "
                                    f"({str(exc)[:400]})") from exc
    names = set(components_of(family))
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    if not any(k.split(".", 1)[0] in names for k in sd):  # bare module names: the denoiser's (diffusers' own rule)
        sd = {f"{denoiser}.{k}": v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    for comp in {k.split(".", 1)[0] for k in sd}:
        part = {k[len(comp) + 1:]: v for k, v in sd.items() if k.startswith(comp + ".")}
        if comp.startswith("text_encoder"):
            # old diffusers / diffusers text-encoder names -> PEFT with diffusers' own maps (its automatic
            # detection looks for to_out_lora only, so a file without that layer would keep to_q_lora)
            if any(re.search(r"\.to_(q|k|v|out)_lora\.", k) for k in part):
                part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
            if any(".lora_linear_layer." in k for k in part):
                part = convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS)
            module = components_of(family).get(comp)
            if module is not None and not hasattr(module, "text_model"):  # transformers 5 flattened CLIPTextModel
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        elif comp == "unet":
            part = convert_unet_state_dict_to_peft(part)
        out.update({f"{comp}.{k}": v for k, v in part.items()})
    return out


def _peft_scales(meta: dict) -> dict[str, dict]:
    """Per component: ``lora_alpha``, ``alpha_pattern``, ``use_rslora`` from diffusers' metadata."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for key, value in packed.items():
        comp, _, name = key.partition(".")
        out.setdefault(comp, {})[name] = value
    return out


def _scale(cfg: dict, module: str, rank: int) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), alpha from the pattern that matches the module."""
    if not cfg:
        return 1.0
    alpha = cfg.get("lora_alpha", rank)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) / (rank ** 0.5 if cfg.get("use_rslora") else rank)


def _fit(down: torch.Tensor, up: torch.Tensor, fan_in: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 conv's pair stored as a linear's, or a linear's stored as a 1x1 conv's."""
    r = down.shape[0]
    if down.dim() == 2 and len(fan_in) == 3 and fan_in[1:] == (1, 1):
        down = down.reshape(r, -1, 1, 1)
    elif down.dim() == 4 and len(fan_in) == 1 and down.shape[2:] == (1, 1):
        down = down.reshape(r, -1)
    if up.dim() == 4 and up.shape[2:] == (1, 1):
        up = up.reshape(up.shape[0], -1)
    return down, up


def read_lora(path: str | Path, family) -> LoRAFile:
    """Read ``path`` and map every pair onto a layer of ``family``'s modules (shapes checked)."""
    path = Path(path)
    sd, meta = read_lora_tensors(path)
    _refuse_other_kinds(path, sd)
    renamed = _diffusers_names(family, sd, path)
    scales = _peft_scales(meta)
    comps = components_of(family)
    unmatched: list[str] = []
    pairs: dict[str, dict] = {}
    for key, t in renamed.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                pairs.setdefault(key[: -len(f".{part}.weight")], {})[part] = t
                break
        else:
            unmatched.append(f"{key}: not a LoRA down/up weight")
    branches = []
    for target, pair in sorted(pairs.items()):
        comp, _, module_name = target.partition(".")
        if set(pair) != {"lora_A", "lora_B"}:
            unmatched.append(f"{target}: has {', '.join(sorted(pair))} without its pair")
            continue
        root = comps.get(comp)
        if root is None:
            unmatched.append(f"{target}: this {family.name} model has no LoRA-capable {comp!r} "
                             f"(it has {', '.join(comps)})")
            continue
        try:
            module = root.get_submodule(module_name)
        except AttributeError:
            unmatched.append(f"{target}: no such layer in the {comp}")
            continue
        fan_in = layers.lora_fan_in(module)
        if fan_in is None:
            unmatched.append(f"{target}: a {type(module).__name__}, which takes no LoRA branch")
            continue
        down, up = _fit(pair["lora_A"], pair["lora_B"], fan_in)
        out = module.weight.shape[0]
        r = down.shape[0]
        if tuple(down.shape[1:]) != fan_in or tuple(up.shape) != (out, r):
            unmatched.append(f"{target}: down {list(pair['lora_A'].shape)} / up {list(pair['lora_B'].shape)} do not "
                             f"fit the layer's weight {[out, *fan_in]}")
            continue
        branches.append(Branch(comp, module_name, down, up * _scale(scales.get(comp, {}), module_name, r)))
    return LoRAFile(path, branches, unmatched)


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


class LoRASet:
    """The adapters attached to one loaded model (``BonsaiImageEngine.loras``)."""

    def __init__(self, family):
        self.family = family
        self.adapters: dict[str, Adapter] = {}

    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, path: str | Path, strength: float = 1.0, name: str | None = None, strict: bool = True) -> Adapter:
        """Attach the file as adapter ``name`` (default: the file's stem; one of that name is
        replaced, its branches detached first, so memory holds one copy)."""
        path = Path(path)
        strength = _check_strength(strength)
        name = name or path.stem
        signature = file_signature(path) if path.exists() else None
        if name in self.adapters:
            self.unload(name)
        lora = read_lora(path, self.family)
        if not lora.branches:
            raise BonsaiCheckpointError(f"{path}: no key of this LoRA fits the {self.family.name} model "
                                        f"(is it for another model?):{_listing(lora.unmatched)}")
        if lora.unmatched and strict:
            raise BonsaiCheckpointError(
                f"{path}: {len(lora.unmatched)} of the LoRA's layers match nothing in this {self.family.name} model "
                f"(is it for another model?); nothing was attached:{_listing(lora.unmatched)}")
        if lora.unmatched:
            warnings.warn(f"LoRA {name!r} ({path.name}): {len(lora.unmatched)} key(s) left out, they match nothing "
                          f"in this model:{_listing(lora.unmatched)}", stacklevel=2)
        comps = components_of(self.family)
        attached = []
        try:
            for b in lora.branches:
                module = comps[b.component].get_submodule(b.module)
                layers.attach_lora(module, name, b.down, b.up, strength)
                attached.append((f"{b.component}.{b.module}", module))
        except BaseException:
            for _n, module in attached:
                layers.detach_lora(module, name)
            raise
        adapter = Adapter(name, path, signature, strength, attached, lora.components)
        self.adapters[name] = adapter
        self._changed(adapter)
        return adapter

    def unload(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise BonsaiRequestError(f"no LoRA {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        for _n, module in adapter.modules:
            layers.detach_lora(module, name)
        adapter.modules.clear()
        self._changed(adapter)

    def set_strength(self, name: str, strength: float) -> None:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise BonsaiRequestError(f"no LoRA {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        adapter.strength = _check_strength(strength)
        for _n, module in adapter.modules:
            layers.reweight_lora(module, name, adapter.strength)
        self._changed(adapter)

    def use(self, wanted: list[tuple[str, float]] | tuple = ()) -> None:
        """Make the attached set exactly ``wanted`` (``(file, strength)`` pairs, in order; one file
        listed twice adds its strengths). Attached adapters that start the list in the same order,
        unchanged on disk, stay (their strength is set); all others are detached first, so at most
        the wanted adapters are ever in memory, and the branches always sum in the list's order
        (the same pipe gives the same pixels whatever ran before)."""
        want: dict[str, float] = {}
        for path, strength in wanted:
            key = str(Path(path))
            want[key] = want.get(key, 0.0) + _check_strength(strength)
        keep = 0
        for (name, adapter), key in zip(self.adapters.items(), want):
            current = file_signature(Path(key)) if Path(key).exists() else None
            if name != key or adapter.signature != current:
                break
            keep += 1
        for name in list(self.adapters)[keep:]:
            self.unload(name)
        for i, (key, strength) in enumerate(want.items()):
            if i < keep:
                if self.adapters[key].strength != strength:
                    self.set_strength(key, strength)
            else:
                self.load(key, strength, name=key)

    def _changed(self, adapter: Adapter) -> None:
        if any(c.startswith("text_encoder") for c in adapter.components):
            self.family._prompt_cache.clear()  # cached embeddings came from the old text encoder


def _check_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise BonsaiRequestError(f"LoRA strength {strength!r} is not a number") from None
    if value != value or abs(value) > 100:
        raise BonsaiRequestError(f"LoRA strength {strength!r} is out of range (-100..100; 1 is the file's own)")
    return value
