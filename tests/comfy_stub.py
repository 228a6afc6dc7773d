"""A stand-in for the few ComfyUI modules the nodes touch (folder_paths, comfy.utils,
comfy.model_management), so node tests run without ComfyUI. It records what the nodes asked of
it; its ProgressBar calls a hook the way ComfyUI's server does, which a test can make raise."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


class InterruptProcessingException(BaseException):
    """ComfyUI's interrupt (a BaseException in current ComfyUI)."""


def make_modules(models_dir: pathlib.Path) -> dict[str, types.ModuleType]:
    log = {"progress": [], "free_memory": [], "soft_empty_cache": 0}
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(models_dir)
    folder_paths.folder_names_and_paths = {  # core's own keys the pack reads (ComfyUI registers them at import)
        "loras": ([str(models_dir / "loras")], {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})}
    folder_paths.get_folder_paths = lambda key: list(folder_paths.folder_names_and_paths[key][0])

    def get_filename_list(key):
        paths, exts = folder_paths.folder_names_and_paths[key]
        found = []
        for root in map(pathlib.Path, paths):
            if root.is_dir():
                found += sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                                if p.is_file() and p.suffix.lower() in exts)
        return found

    def get_full_path_or_raise(key, name):
        for root in folder_paths.folder_names_and_paths[key][0]:
            path = pathlib.Path(root) / name
            if path.is_file():
                return str(path)
        raise FileNotFoundError(f"Model in folder '{key}' with filename '{name}' not found.")

    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path_or_raise = get_full_path_or_raise

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.free_memory = lambda n, dev, keep_loaded=(): log["free_memory"].append((n, str(dev)))
    mm.free_bytes = 64 * 2**30  # what get_free_memory answers; a test may lower it
    mm.get_free_memory = lambda dev=None, torch_free_too=False: mm.free_bytes

    def soft_empty_cache(force=False):
        log["soft_empty_cache"] += 1

    mm.soft_empty_cache = soft_empty_cache
    mm.interrupt_after = None  # set to N: the N-th progress update raises, as Cancel does
    mm.interrupt_class = InterruptProcessingException  # what it raises (v0.3.64's derives from Exception)

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            log["progress"].append((self.current, self.total, preview))
            if mm.interrupt_after is not None and len(log["progress"]) >= mm.interrupt_after:
                raise mm.interrupt_class()

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.utils, comfy.model_management = utils, mm
    return {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
            "_log": log}


def stub_missing_torchaudio() -> None:
    """ComfyUI 0.33 imports torchaudio at module level (audio VAEs, Gemma 4); where the environment has
    none (no wheel for its torch), empty stand-ins let ``comfy.sd`` import. Nothing here uses audio."""
    try:
        import torchaudio  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.machinery

    for name in ("torchaudio", "torchaudio.functional", "torchaudio.transforms"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name].__path__ = []
    sys.modules["torchaudio"].functional = sys.modules["torchaudio.functional"]
    sys.modules["torchaudio"].transforms = sys.modules["torchaudio.transforms"]


def run_check(script: str) -> dict:
    """Run ``tests/<script>`` inside the real ComfyUI at ``COMFYUI_PATH`` (its Python: ``COMFYUI_PYTHON``),
    on the CPU, and return the JSON of its last ``RESULTS `` line (the test fails with its output if none)."""
    import json
    import os
    import subprocess

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("BONSAI_KITCHEN", None)  # the scripts choose the weight form themselves
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, str(ROOT / "tests" / script)], env=env, capture_output=True, text=True, timeout=600,
                         cwd=str(ROOT.parent))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


def load_pack(name: str = "ComfyUI_Bonsai_stubbed"):
    """Import the pack folder the way ComfyUI does: a package under its folder's name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
