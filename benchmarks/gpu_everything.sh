#!/usr/bin/env bash
# Every pending GPU measurement of issues 23, 22 and 20 in ONE device call, for sessions that get a machine
# once at most (the fifth and sixth sessions of 2026-12-07 got one start in nineteen requests). The parts run
# in order of priority, each under its own limit and never past a deadline (EVERYTHING_SECONDS, default 570 s
# from the start), so a call cut off at its limit still brings back every part that finished:
#   1. issue 23: bench_te4bit.py (whole Bonsai Image 4B images, 4-bit text encoder, each phase's peak)
#   2. issue 22: bench_comfy_native.py --profile 5 (the native MODEL's step table in ComfyUI 0.33, LoRA cost)
#   3. issue 22: comfy_dynamic_vram_check.py (the MODEL under ComfyUI's dynamic VRAM, kitchen form)
#   4. issue 20: bench_gemm.py, mma and mma_wide at M = 1, 16 against cuBLAS bf16 (builds the mma kernel)
#   5. issue 20: bench_gemm.py, fp8blk against torch._scaled_mm, and dequantize + cuBLAS with and without
#      the side-stream overlap (overlap.py), at M = 1536, 4096 (klein-4B)
#   6. the CUDA engine tests of what changed since the last GPU run (klein's encode, lending, placement)
#   7. issue 20: the mma, blockwise-fp8 and overlap tests
# Six files come back (the machine returns at most 8): te4bit.json, comfy_native.json, comfy_dynamic_vram.json,
# gemm_mma.json, gemm_fp8blk.json and everything.log (every part's console, in order, with its exit status).
# Carry the wheels and the hand-made ComfyUI folder (benchmarks/gpu_comfy_check.sh says what is in it):
#
#   run(command="BENCH_GIT_COMMIT=<commit> bash benchmarks/gpu_everything.sh", carry=[".whl", ".comfy_carry"], timeout_s=595)
#
# EVERYTHING_ONLY=REGEX runs only the parts whose name matches (grep -E), e.g. "profile|mma".
# EVERYTHING_DRY=1 prints each part with the limit it would get if every part before it used its whole limit,
# and runs nothing (checked on a CPU).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG=$OUT/everything.log
DEADLINE=$((SECONDS + ${EVERYTHING_SECONDS:-570}))
DRY=${EVERYTHING_DRY:-0}
export BENCH_GIT_COMMIT=${BENCH_GIT_COMMIT:-unknown} PYTHONUNBUFFERED=1

# part NAME CAP MIN command...: runs the command under min(CAP, seconds left before the deadline); skipped when
# fewer than MIN seconds are left. Its console goes to everything.log, filtered of the libraries' chatter.
part() {
  local name=$1 cap=$2 least=$3
  shift 3
  if [ -n "${EVERYTHING_ONLY:-}" ] && ! echo "$name" | grep -qE "$EVERYTHING_ONLY"; then
    echo "=== $name: not asked for (EVERYTHING_ONLY=$EVERYTHING_ONLY)" | tee -a "$LOG"
    return 0
  fi
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$least" ]; then
    echo "=== $name: skipped, $left s left before the deadline (needs $least)" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name: limit $limit s: $*" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then  # as if the part used its whole limit
    SECONDS=$((SECONDS + limit))
    return 0
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e "Loading weights" -e "Writing model shards" -e "should be kept in float32" \
    | tee -a "$LOG"
  echo "=== $name: exit status ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [ "$DRY" != 1 ]; then
  if [ ! -f .comfy_carry/ComfyUI/comfy/model_management.py ] || ! ls .comfy_carry/wheels/*.whl >/dev/null 2>&1 \
      || ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "carry .whl and .comfy_carry with the call (benchmarks/gpu_comfy_check.sh says what they hold)" | tee -a "$LOG" >&2
    exit 2
  fi
  SITE=/tmp/site-everything
  rm -rf "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" .comfy_carry/wheels/*.whl .whl/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
  python3 -c "import torch, importlib.metadata as m; print('torch', torch.__version__, *(f'{p} {m.version(p)}' for p in
    ('diffusers', 'transformers', 'triton', 'comfy-kitchen')))" 2>&1 | tee -a "$LOG"
  command -v nvcc >/dev/null && nvcc --version | tail -1 | tee -a "$LOG"
fi
echo "commit $BENCH_GIT_COMMIT, deadline $((DEADLINE - SECONDS)) s from now" | tee -a "$LOG"
export BONSAI_CACHE_DIR=${BONSAI_CACHE_DIR:-$PWD/models/cache}  # the mma kernel's build

part "issue 23: bench_te4bit" 160 60 \
  python3 benchmarks/bench_te4bit.py --device cuda --repeats 1 --json "$OUT/te4bit.json"
part "issue 22: bench_comfy_native" 180 60 \
  env COMFYUI_PATH="$PWD/.comfy_carry/ComfyUI" python3 benchmarks/bench_comfy_native.py --profile 5 \
  --json "$OUT/comfy_native.json"
part "issue 22: torch profile of the eager steps" 90 40 \
  env COMFYUI_PATH="$PWD/.comfy_carry/ComfyUI" python3 benchmarks/bench_comfy_native.py --sizes 512 --loras 0 \
  --no-graph --torch-profile 5 --json "$OUT/comfy_profile.json"
part "issue 22: comfy_dynamic_vram_check" 100 40 \
  env COMFYUI_PATH="$PWD/.comfy_carry/ComfyUI" python3 benchmarks/comfy_dynamic_vram_check.py \
  --json "$OUT/comfy_dynamic_vram.json"
part "issue 20: GEMM rows of mma at M = 1, 16" 100 30 \
  python3 benchmarks/bench_gemm.py --families klein-4B,SD1.5/SDXL --ms 1,16 --paths dense,mma,mma_wide,mma_nt4,mma_nt4x \
  --json "$OUT/gemm_mma.json"
part "issue 20: GEMM rows of fp8blk and overlap at M = 1536, 4096" 80 25 \
  python3 benchmarks/bench_gemm.py --families klein-4B --ms 1536,4096 \
  --paths dense,dequant,overlap,fp8blk,fp8blk_gemm,scaled_mm \
  --json "$OUT/gemm_fp8blk.json"
part "issues 23, 22: the CUDA engine tests (klein's encode against diffusers', pinning, lending, placement)" 60 20 \
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_engine.py tests/test_q4_affine.py \
  -k "pinning or lend or park or klein or promot"
part "issue 20: mma and blockwise fp8 tests, the overlap path's" 200 30 \
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_w1.py tests/test_fp8_blockwise.py \
  tests/test_triton_kernels.py::test_triton_linear_matches_reference \
  tests/test_triton_kernels.py::test_overlap_path_eager_and_in_a_cuda_graph
echo "done, $((DEADLINE - SECONDS)) s before the deadline" | tee -a "$LOG"
