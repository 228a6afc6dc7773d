"""What every benchmark script shares: the machine record, timing, peak memory, tables, JSON.

Benchmarks are scripts, not tests: run them as ``python benchmarks/<name>.py`` from the repository
root (they put the root on ``sys.path`` themselves, so ``bonsai_core`` and ``tests`` fixtures import
without an install). Every script compares against a baseline measured in the same run, so the
numbers that matter are ratios; bare times are shown too, with the machine they came from.

Timing rule (``time_fn``): warm-up calls first (kernel selection, allocator growth, lazy init stay
out of the numbers), then ``repeats`` timed calls, the median reported; on CUDA every call is
bracketed by ``torch.cuda.synchronize``. Peak memory (``PeakMemory``): on CUDA the allocator's
``max_memory_allocated`` after ``reset_peak_memory_stats``; on Linux CPUs the process's resident
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), which counts the whole process
(Python, libraries, every model held), so read its increment rather than its absolute value.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

GIB = 1024**3
MIB = 1024**2

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional library is just "not installed"
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine (other jobs on the same cores) skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_note(info: dict) -> str | None:
    """A warning line when the machine was already busy when the run started."""
    la = info.get("load_average_at_start")
    if la and info.get("device", "").startswith("cpu") and la[0] > 0.5 * (info.get("cpu_count") or 1):
        return (f"WARNING: load average {la[0]} on {info['cpu_count']} CPUs at start: other processes share "
                "these cores, so CPU times are noisy (ratios too, if the load changed during the run)")
    return None


def machine_info(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Everything needed to tell where a number came from."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "device": str(device),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "gpu": None,
        # BENCH_GIT_COMMIT first: a lent GPU machine's copy of the tree has no .git, or a stale one
        # (runs on 2026-12-07 read 3e421a0-dirty from it while running later commits)
        "git_commit": os.environ.get("BENCH_GIT_COMMIT") or _git_commit(),
        "bonsai_kernel_env": os.environ.get("BONSAI_KERNEL", "auto"),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    elif device.type == "mps":
        info["gpu"] = "Apple MPS"
    return info


def machine_lines(info: dict) -> list[str]:
    where = info["gpu"] or info["cpu"]
    return [
        f"machine : {where}" + (f" (host CPU {info['cpu']})" if info["gpu"] else ""),
        f"software: torch {info['torch']} (cuda {info['torch_cuda']}), diffusers {info['diffusers']}, "
        f"transformers {info['transformers']}, python {info['python']}",
        f"run     : device {info['device']}, dtype {info['dtype']}, torch threads {info['torch_threads']} "
        f"of {info['cpu_count']} CPUs, BONSAI_KERNEL={info['bonsai_kernel_env']}, commit {info['git_commit']}, "
        f"load average {info['load_average_at_start']}",
    ]


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu (the engine's rule); otherwise the named device."""
    if name == "auto":
        from bonsai_core import device as devices

        return devices.resolve_device("auto")[0]
    return torch.device(name)


# ---------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times, "warmup": warmup, "repeats": len(times)}


# ---------------------------------------------------------------------------------------- memory
def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so a CPU's resident size drops after a model is freed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cpu":
        _malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def allocated(device: torch.device) -> int | None:
    """Bytes the device allocator holds for live tensors (CUDA, MPS); resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return _proc_status("VmRSS")


class PeakMemory:
    """Peak memory over a region: ``with PeakMemory(dev) as pm: ...; pm.result``.

    ``peak_bytes`` is the absolute peak (on CUDA: everything allocated, weights included);
    ``start_bytes`` what was held when the region began; ``added_bytes`` their difference (the
    region's own activations and temporaries).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> "PeakMemory":
        d = self.device
        if d.type == "cuda":
            sync(d)
            torch.cuda.reset_peak_memory_stats(d)
            self.kind = "cuda max_memory_allocated"
        elif d.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.kind = "process resident high-water mark (VmHWM)"
            except OSError:
                self.kind = "VmHWM (not resettable here: peak since process start)"
        else:
            self.kind = f"not measurable on {d.type}"
        self.start = allocated(d)
        return self

    def __exit__(self, *exc) -> None:
        d = self.device
        peak = None
        if d.type == "cuda":
            sync(d)
            peak = int(torch.cuda.max_memory_allocated(d))
        elif d.type == "cpu":
            peak = _proc_status("VmHWM")
        self.result = {"peak_bytes": peak, "start_bytes": self.start,
                       "added_bytes": None if peak is None or self.start is None else peak - self.start,
                       "peak_kind": self.kind}


# ---------------------------------------------------------------------------------------- output
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.1f} ms"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain text table; ``align`` is one of '<' or '>' per column (default: first left, rest right)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or ("<" + ">" * (len(headers) - 1))

    def line(values):
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary name, then rename)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"\nJSON result written to {path}")


def header(title: str, info: dict) -> str:
    lines = ["=" * 100, title, "=" * 100, *machine_lines(info), f"command : {command_line()}"]
    note = busy_note(info)
    if note:
        lines.append(note)
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- FLUX.2 klein
# FLUX.2 [klein] 4B (keys as in diffusers' transformer_flux2.py)
KLEIN_4B_CONFIG = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=5, num_single_layers=20,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)


def config_for(name: str) -> dict:
    if name == "klein-4b":
        return dict(KLEIN_4B_CONFIG)
    if name == "tiny":
        from tests.flux2_fixtures import TINY_CONFIG, model_kwargs

        return model_kwargs(TINY_CONFIG)
    raise SystemExit(f"unknown --config {name!r}")


@torch.no_grad()
def build_random_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The transformer with random weights, materialised directly on ``device`` in ``dtype``: built on
    the meta device, cast there, then ``to_empty`` (no fp32 model first, no CPU copy for a GPU run).
    Linear weights ~ N(0, 1/fan_in) (unit-variance outputs), norm weights 1."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    model = model.to(dtype=dtype)          # meta -> meta: free
    model = model.to_empty(device=device)  # the only allocation: the weights, in dtype, on device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    for b in model.buffers():  # none in current diffusers; keep them defined if a version adds some
        b.zero_()
    return model.eval().requires_grad_(False)


def make_inputs(config: dict, size: int, text_tokens: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> dict:
    """Transformer inputs for one ``size`` x ``size`` image, as ``Flux2KleinPipeline`` builds them."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P

    g = torch.Generator("cpu").manual_seed(seed)
    side = size // 16  # VAE /8, then 2x2 patchify: 32 latent channels become in_channels 128
    latents = torch.randn(1, config["in_channels"], side, side, generator=g)
    prompt_embeds = torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g)
    return {
        "noise": P._pack_latents(latents).to(device=device, dtype=torch.float32),  # [1, side^2, C]
        "img_ids": P._prepare_latent_ids(latents).to(device),
        "encoder_hidden_states": prompt_embeds.to(device=device, dtype=dtype),
        "txt_ids": P._prepare_text_ids(prompt_embeds).to(device),
        "image_seq_len": side * side,
    }


