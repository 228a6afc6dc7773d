"""W1A16 on tensor cores in CUDA C++ (``cuda/w1_mma.cu``): the kernel ``mma`` of the contract.

The source is compiled at first use with the CUDA compiler of this machine (``nvcc``: ``BONSAI_NVCC``,
else ``$CUDA_HOME/bin/nvcc``, else the one on ``PATH``) for the card in use, into
``$BONSAI_CACHE_DIR`` (default ``~/.cache/bonsai``) under a name that holds the source's hash and
the card's architecture; later runs load that file. It is a plain shared library called through
ctypes (no PyTorch headers, so it builds in seconds). Nothing prebuilt is downloaded.

Where it cannot be built (no ``nvcc``, a card older than sm80, a failed build) the kernel is
unavailable: the auto choice never depends on it, and naming it (``BONSAI_KERNEL=mma``) says why.
Convolutions and 8-bit activations (``BONSAI_ACT``) go the Triton kernels' way.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .triton_q1 import TritonKernel, device_props

log = logging.getLogger("bonsai")

SOURCE = Path(__file__).with_name("cuda") / "w1_mma.cu"
NVCC_ENV = "BONSAI_NVCC"
CACHE_ENV = "BONSAI_CACHE_DIR"
BUILD_TIMEOUT_S = 600
MIN_CAPABILITY = (8, 0)  # mma.sync with bf16 operands
TARGET_CTAS_PER_SM = 6   # split K until a launch has about this many blocks per multiprocessor
MMA_MAX_M = 64           # above this many tokens the kernel 'mma' hands a layer to dequantize + cuBLAS
WIDE_MAX_M = 32          # lanes that take whole groups (16-byte loads of bits): built up to this many tokens
WIDE = False             # whether linear() uses them by default (an A/B in bench_gemm: paths mma, mma_wide)
MIN_GROUPS_PER_SPLIT = 1
MAX_SPLITS = 16
COUNTERS = 1 << 16       # per-tile arrival counters of the split-K reduction, per device

_LOCK = threading.Lock()
_LIBS: dict[tuple[int, int], ctypes.CDLL | str] = {}  # capability -> library, or why it is unavailable
_STREAM_STATE: dict[tuple, torch.Tensor] = {}         # (device, stream) -> split-K counters
_ZEROED_IN_CAPTURE_ONLY: set[tuple] = set()           # counters made inside a capture, not yet zeroed eagerly


def find_nvcc() -> str | None:
    named = os.environ.get(NVCC_ENV)
    if named:
        return named
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bonsai")


FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo"]


def library_path(capability: tuple[int, int]) -> Path:
    """The cached library's path: the source's and the flags' hash, and the architecture, in its name."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"w1_mma-{digest}-sm{capability[0]}{capability[1]}.so"


def build(capability: tuple[int, int], nvcc: str | None = None) -> Path:
    """Compile the kernel for ``capability`` (if not already in the cache); the library's path.
    The file appears whole or not at all (built under a temporary name, then renamed)."""
    out = library_path(capability)
    if out.is_file():
        return out
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError(f"no CUDA compiler: install the CUDA toolkit (nvcc) or point {NVCC_ENV} at one")
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = f"{capability[0]}{capability[1]}"
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [nvcc, *FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} ran past {BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(capability: tuple[int, int]) -> ctypes.CDLL | str:
    with _LOCK:
        lib = _LIBS.get(capability)
        if lib is not None:
            return lib
        if capability < MIN_CAPABILITY:
            lib = f"the card's compute capability {capability[0]}.{capability[1]} is below 8.0 (no bf16 mma)"
        else:
            try:
                path = build(capability)
                lib = ctypes.CDLL(str(path))
                p, i = ctypes.c_void_p, ctypes.c_int
                lib.bonsai_w1a16.argtypes = [p, p, p, p, p, p, p] + [i] * 12 + [p]
                lib.bonsai_w1a16.restype = i
                lib.bonsai_cuda_error_string.argtypes = [i]
                lib.bonsai_cuda_error_string.restype = ctypes.c_char_p
                log.info("bonsai: CUDA W1A16 kernel loaded from %s", path)
            except (RuntimeError, OSError) as e:
                lib = f"the CUDA W1A16 kernel could not be built: {e}"
                log.warning("bonsai: %s", lib)
        _LIBS[capability] = lib
        return lib


def _counters(device: torch.device, stream: int) -> torch.Tensor:
    """The split-K arrival counters of one (device, stream): zeros that every launch leaves at zero.
    Launches on one stream run one after another; two streams never share counters or partials.

    A stream first met inside a CUDA-graph capture (``torch.cuda.graph`` captures on a stream of its
    own) gets counters whose zeroing is recorded in the graph, so it runs at the start of every
    replay, not now; the first eager call on that stream zeroes them for real."""
    key = (device, stream)
    c = _STREAM_STATE.get(key)
    capturing = torch.cuda.is_current_stream_capturing()
    if c is None:
        c = _STREAM_STATE[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
        if capturing:
            _ZEROED_IN_CAPTURE_ONLY.add(key)
    elif key in _ZEROED_IN_CAPTURE_ONLY:
        c.zero_()  # in a later capture: recorded there too, for a graph replayed before any other
        if not capturing:
            _ZEROED_IN_CAPTURE_ONLY.discard(key)
    return c


def why_not(device: torch.device) -> str | None:
    """None when the kernel runs on ``device``, else why not."""
    lib = _load(device_props(device)[0])
    return lib if isinstance(lib, str) else None


def plan(m: int, n: int, groups: int, sms: int, wide: bool = False, four: bool | None = None,
         partial_ratio: int = 2) -> tuple[int, int, int, int]:
    """``(mt, nt, splits, units per split)``: m16 tiles per warp, n8 tiles per warp (a block is 4
    warps: 32 ``nt`` columns), and how K is split so that a launch has about ``TARGET_CTAS_PER_SM``
    blocks per multiprocessor, while the fp32 partials cost less than ``partial_ratio`` times the
    weight's bits. Narrow layers take narrow blocks (``nt`` 1) before K is split, unless ``four``
    (True: four n8 tiles a warp whatever the width, so that each activation fragment a warp loads
    feeds four mmas instead of one; an A/B in bench_gemm, path mma_nt4). K is split in units: a
    group, or with ``wide`` lanes four groups."""
    mt = 1 if m <= 16 else (2 if m <= 32 else 4)
    m_tiles = -(-m // (16 * mt))
    if four is None:
        four = -(-n // 128) * m_tiles >= sms
    nt = 4 if four else 1
    tiles = -(-n // (32 * nt)) * m_tiles
    units = -(-groups // 4) if wide else groups
    splits = min(MAX_SPLITS, max(1, units // MIN_GROUPS_PER_SPLIT), max(1, -(-TARGET_CTAS_PER_SM * sms // tiles)),
                 max(1, partial_ratio * groups * 64 // (32 * m)))  # partials written and read (8 m bytes a
    #                                                  column a split) stay within partial_ratio x the packed
    #                                                  weight (k / 8 = 16 groups bytes a column)
    if tiles > COUNTERS:
        splits = 1
    per = -(-units // splits)
    return mt, nt, -(-units // per), per


_PLANS: dict[tuple, tuple] = {}


def linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int, bias,
           wide: bool | None = None, four: bool | None = None, partial_ratio: int = 2) -> torch.Tensor:
    """``x @ W.T + bias`` for a Q1_0 weight (``qs`` uint8 [N, NG*16], ``d`` fp16 [N, NG]) and 16-bit ``x``;
    ``wide``: lanes take whole groups (up to ``WIDE_MAX_M`` tokens; default ``WIDE``); ``four`` and
    ``partial_ratio``: ``plan``'s (benchmarks' A/B; the defaults are the engine's)."""
    cap, sms = device_props(x.device)
    lib = _load(cap)
    if isinstance(lib, str):
        from ..errors import BonsaiDeviceError

        raise BonsaiDeviceError(lib)
    n, groups = d.shape
    if qs.dtype != torch.uint8 or d.dtype != torch.float16 or tuple(qs.shape) != (n, groups * 16) or \
            groups * 128 < in_features or in_features % 8:
        raise ValueError(f"the CUDA W1A16 kernel takes uint8 bits [N, NG*16] and fp16 scales [N, NG] of rows of a "
                         f"multiple of 8 weights; got {qs.dtype} {list(qs.shape)}, {d.dtype} {list(d.shape)}, "
                         f"{in_features} inputs")
    shape = x.shape
    m = x.numel() // in_features
    wide = (WIDE if wide is None else wide) and m <= WIDE_MAX_M
    if not qs.is_contiguous() or qs.data_ptr() % (16 if wide else 4):
        qs = qs.clone(memory_format=torch.contiguous_format)
    if not d.is_contiguous():
        d = d.contiguous()
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte loads of whole rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*shape[:-1], n)
    key = (m, n, groups, sms, wide, four, partial_ratio)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = plan(m, n, groups, sms, wide, four, partial_ratio)
    mt, nt, splits, per = p
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):  # the launch goes to the current device: make it x's
        stream = torch._C._cuda_getCurrentRawStream(index)
        counters = _counters(x.device, stream)
        part = _workspace(x.device, stream, splits * m * n) if splits > 1 else counters
        code = lib.bonsai_w1a16(x2.data_ptr(), qs.data_ptr(), d.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                y.data_ptr(), part.data_ptr(), counters.data_ptr(), m, n, in_features, groups,
                                x2.stride(0), n, splits, per, mt, nt, int(wide), int(x.dtype == torch.bfloat16),
                                stream)
    if code:
        raise RuntimeError(f"CUDA W1A16 kernel launch failed: {lib.bonsai_cuda_error_string(code).decode()} "
                           f"(M={m}, N={n}, K={in_features})")
    return y.reshape(*shape[:-1], n)


_WORKSPACE: dict = {}
_RETIRED: list = []


def _workspace(device: torch.device, stream: int, numel: int) -> torch.Tensor:
    """float32 room for ``numel`` split-K partials, one buffer per (device, stream), reused by every
    layer (launches on one stream run one after another, and a launch consumes its partials before
    it ends). It grows outside CUDA-graph capture only (a capture allocates from its own pool), and
    a buffer it outgrew is kept, because a graph captured earlier writes into it on every replay.
    The partials stay within twice the packed weight (``plan``): a few MB for klein-4B's layers."""
    key = (device, stream)
    buf = _WORKSPACE.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    if buf is not None:
        _RETIRED.append(buf)  # a captured graph may still write into it: never freed
    buf = _WORKSPACE[key] = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
    return buf


def linear_hybrid(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, in_features: int, bias) -> torch.Tensor:
    """The kernel ``mma``: this CUDA kernel up to ``MMA_MAX_M`` tokens, dequantize + cuBLAS above."""
    if x.numel() // in_features <= MMA_MAX_M:
        return linear(x, qs, d, in_features, bias)
    from .triton_q1 import linear_auto

    return linear_auto(x, qs, d, in_features, bias)


class CudaW1Kernel(TritonKernel):
    """``mma``: the CUDA C++ W1A16 kernel for linears of up to ``MMA_MAX_M`` tokens, dequantize + cuBLAS
    above; convs and ``BONSAI_ACT`` as the Triton kernel."""

    def __init__(self):
        super().__init__("mma", linear_hybrid, w1a8=True)

    def supports(self, x: torch.Tensor, w) -> bool:
        return super().supports(x, w) and w.cols % 8 == 0 and why_not(x.device) is None

    def why_not(self, x: torch.Tensor, w) -> str | None:
        if x.is_cuda and w.cols % 8:
            return f"kernel 'mma' needs rows of a multiple of 8 weights, this layer has {w.cols}"
        return why_not(x.device) if x.is_cuda else None
