"""The ComfyUI surface the nodes use, in one place: ``folder_paths`` (model and font folders),
``comfy.utils.ProgressBar`` (progress, previews and Cancel), ``comfy.model_management`` (its
device, making room before a load). Only these stable modules; nothing from ``comfy.ldm``.

ComfyUI modules are imported inside the functions, so the pack imports without ComfyUI (tests,
``pip install``) and only a node that runs needs them.
"""

from __future__ import annotations

import os

from ..bonsai_core import overlay
from ..bonsai_core.hub import find_models

MODEL_FOLDER = "bonsai"  # models/bonsai/: model folders, and .gguf/.safetensors payloads to import
MODEL_EXTENSIONS = {".gguf", ".safetensors", ".json"}
FONT_FOLDER = "fonts"
PREVIEW_SIZE = 512


def _register(folder_paths, key: str, extensions: set[str]) -> list[str]:
    """Our folder under ComfyUI's models dir, with explicit extensions; paths a user added for the
    same key (extra_model_paths.yaml) are kept."""
    default = os.path.join(folder_paths.models_dir, key)
    paths, exts = folder_paths.folder_names_and_paths.get(key, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[key] = (paths, set(exts) | extensions)
    return paths


def model_folders() -> list[str]:
    import folder_paths

    return _register(folder_paths, MODEL_FOLDER, MODEL_EXTENSIONS)


def model_names() -> list[str]:
    """What the Loader's list offers: the shipped model first (the list's default), then the models
    found in models/bonsai/."""
    from ..bonsai_core.config import SHIPPED_MODEL

    names = find_models(model_folders())
    return ([SHIPPED_MODEL] if SHIPPED_MODEL and SHIPPED_MODEL not in names else []) + names


def find_in(roots, name: str) -> str | None:
    """The first ``root/name`` that exists, or None."""
    for root in roots:
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    return None


def model_path(name: str) -> str:
    """A listed name -> its folder or file under models/bonsai/ (or the name itself: a Hub id)."""
    return find_in(model_folders(), name) or name


def lora_names() -> list[str]:
    """LoRA files in ComfyUI's own models/loras/ (and its extra paths) that the engine reads: safetensors."""
    import folder_paths

    from ..bonsai_core.lora import LORA_EXTENSIONS

    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(LORA_EXTENSIONS)]


def lora_path(name: str) -> str:
    """A listed LoRA name -> its file (ComfyUI's own lookup; a missing file is its FileNotFoundError)."""
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", name)


def font_folders() -> list[str]:
    import folder_paths

    return _register(folder_paths, FONT_FOLDER, set(overlay.FONT_EXTENSIONS))


def comfy_device() -> str | None:
    """ComfyUI's own device as the engine spells it (cpu, cuda:N, mps); None for devices the
    engine has no path for (they get the engine's own auto choice)."""
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if dev.type == "cuda":
        return f"cuda:{dev.index or 0}"
    return dev.type if dev.type in ("cpu", "mps") else None


def free_memory(nbytes: int, device) -> None:
    """Make room the ComfyUI way: unload what its memory manager holds, then empty the cache."""
    import comfy.model_management as mm

    mm.free_memory(nbytes, device)
    mm.soft_empty_cache()


def available_memory(device) -> int:
    """What ComfyUI's memory manager says the device has free (the memory guardrail's budget)."""
    import comfy.model_management as mm

    return int(mm.get_free_memory(device))


class Progress:
    """ComfyUI's progress bar over a generation: 0 when prompts start encoding, 1 when sampling
    starts, one more per step (with a preview), the end after the VAE decode. Every update passes
    through ComfyUI's hook, which raises its interrupt exception when the user pressed Cancel; we
    let that exception through untouched (it is not an error)."""

    def __init__(self, steps: int, preview=None):
        import comfy.utils

        self.steps = steps
        self.total = steps + 2
        self.bar = comfy.utils.ProgressBar(self.total)
        self.preview = preview  # x0 -> list of PIL images, or None for no previews

    def stage(self, name: str) -> None:
        value = {"encode": 0, "sample": 1, "decode": self.steps + 1, "done": self.total}[name]
        self.bar.update_absolute(value, self.total)

    def step(self, i: int, n: int, x0) -> None:
        shown = None
        if self.preview is not None and x0 is not None:
            shown = ("JPEG", self.preview(x0)[0], PREVIEW_SIZE)
        self.bar.update_absolute(1 + i, self.total, shown)
