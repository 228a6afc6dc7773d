"""Bonsai Loader: a model from models/bonsai/ (or a path / Hub id) -> BONSAI_PIPE."""

from __future__ import annotations

from dataclasses import dataclass

from ..bonsai_core.device import DTYPE_CHOICES
from ..bonsai_core.engine import BonsaiImageEngine, load_engine
from ..bonsai_core.errors import BonsaiRequestError
from . import host

DEVICES = ("auto", "cuda", "mps", "cpu")
PATH_CHOICE = "(use the path input)"


def model_input(tooltip: str) -> tuple:
    """The ``model`` list input of the loaders: the models ComfyUI can see, the shipped one first (the
    default), then the choice that hands over to the ``path`` input."""
    names = host.model_names()
    return (names + [PATH_CHOICE], {"default": names[0] if names else PATH_CHOICE, "tooltip": tooltip})


def model_source(model: str, path: str, what: str) -> str:
    """The folder (or Hub id) a loader reads: ``path`` when given, else the listed model's folder."""
    source = path.strip() or (None if model == PATH_CHOICE else host.model_path(model))
    if not source:
        raise BonsaiRequestError(f"no model chosen: put a Bonsai model folder in {host.model_folders()[0]} and "
                                 f"pick it, or give {what} in path")
    return source


@dataclass(frozen=True)
class BonsaiPipe:
    """What flows along a BONSAI_PIPE wire: how to get the loaded engine. The engine keeps one model
    loaded at a time; a pipe whose model was switched out by another Loader loads it again."""

    source: str
    device: str | None
    dtype: str | None
    #: (LoRA file, strength) pairs this pipe samples with (Bonsai LoRA nodes add to a copy): applied to
    #: the engine each time the pipe is used, so two LoRA nodes branching off one loader never see
    #: each other's adapters and ComfyUI's cached loader output is never changed
    loras: tuple = ()

    def engine(self) -> BonsaiImageEngine:
        engine = load_engine(self.source, device=self.device, dtype=self.dtype, free_memory=host.free_memory,
                             available_memory=host.available_memory)
        engine.use_loras(self.loras)
        return engine


class BonsaiLoader:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Loads a 1-bit Bonsai model (or a full-precision diffusers model, for comparison) for the Bonsai "
                   "Sampler. Models are folders in models/bonsai/; a .gguf or public payload there must be imported "
                   "once with `bonsai import`. Frees ComfyUI's memory first, and the previous Bonsai model when "
                   "you switch.")
    RETURN_TYPES = ("BONSAI_PIPE",)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The loaded model, for Bonsai Sampler and Bonsai Guardrail.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input("A model folder in models/bonsai/, or the last entry to use the path input."),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "auto: the device ComfyUI runs on. cuda, mps or cpu to choose; a device this "
                               "machine lacks is an error, never a silent fallback."}),
                "dtype": (list(DTYPE_CHOICES), {
                    "default": "auto",
                    "tooltip": "auto: what suits the device, decided when the workflow runs (fp16/bf16 on GPUs, "
                               "fp32 on the CPU)."}),
            },
            "optional": {
                "path": ("STRING", {
                    "default": "",
                    "tooltip": "A model folder anywhere, or a Hugging Face repo id (owner/name). Used when model is "
                               f"{PATH_CHOICE!r}, or when not empty."}),
            },
        }

    def load(self, model, device, dtype, path=""):
        source = model_source(model, path, "a folder or Hub repo id")
        dev = host.comfy_device() if device == "auto" else device
        pipe = BonsaiPipe(source, dev, None if dtype == "auto" else dtype)
        pipe.engine()  # load now: errors and load time belong to this node
        return (pipe,)
