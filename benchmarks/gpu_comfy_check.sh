#!/usr/bin/env bash
# The Bonsai native MODEL in ComfyUI on a GPU, in one device call: the step-time table (benchmarks/bench_comfy_native.py)
# and ComfyUI's dynamic VRAM on it (benchmarks/comfy_dynamic_vram_check.py).
# Run from the repository root on the lent GPU machine, which has no ComfyUI and no network. Two git-ignored
# folders must be carried: .whl/ (diffusers, gguf) and .comfy_carry/, made by hand outside the tracked files:
#   .comfy_carry/ComfyUI/  a ComfyUI 0.33 checkout's comfy/ package and top-level modules (no .git, no frontend)
#   .comfy_carry/wheels/   CPython 3.12 wheels the machine lacks: comfy-kitchen 0.2.31, comfy-aimdo, torchsde, trampoline
# This script only installs those wheels and runs the check; it never fetches, builds or copies ComfyUI.
#
#   run(command="bash benchmarks/gpu_comfy_check.sh", carry=[".whl", ".comfy_carry"], timeout_s=590)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -f .comfy_carry/ComfyUI/comfy/model_management.py ] || ! ls .comfy_carry/wheels/*.whl >/dev/null 2>&1; then
  echo "no .comfy_carry/ComfyUI or .comfy_carry/wheels here: carry .comfy_carry (made by hand) with the call" >&2
  exit 2
fi
SITE=/tmp/site
rm -rf "$SITE"  # a warm machine may hold an older install; --target does not replace it
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$SITE" .comfy_carry/wheels/*.whl .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD COMFYUI_PATH=$PWD/.comfy_carry/ComfyUI PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/comfy_dynamic_vram.log"
python3 -c "import torch, importlib.metadata as m; print('torch', torch.__version__, *(f'{p} {m.version(p)}' for p in
  ('comfy-kitchen', 'comfy-aimdo', 'torchsde', 'diffusers', 'transformers')))" 2>&1 | tee -a "$OUT/comfy_dynamic_vram.log"
# the step-time table first (issue 22's numbers: Bonsai MODEL beside ComfyUI's bf16 and fp8_e4m3fn_fast, eager and
# graphed, LoRA cost), then the dynamic VRAM check; each under its own limit so that one call holds both
timeout "${BENCH_SECONDS:-280}" python3 benchmarks/bench_comfy_native.py --profile 5 --json "$OUT/comfy_native.json" 2>&1 \
  | grep -v -e "should be kept in float32" | tee "$OUT/comfy_native.log"
echo "bench_comfy_native exit status ${PIPESTATUS[0]}" | tee -a "$OUT/comfy_native.log"
timeout "${CHECK_SECONDS:-280}" python3 benchmarks/comfy_dynamic_vram_check.py --json "$OUT/comfy_dynamic_vram.json" 2>&1 \
  | tee -a "$OUT/comfy_dynamic_vram.log"
status=${PIPESTATUS[0]}
echo "comfy_dynamic_vram_check exit status $status" | tee -a "$OUT/comfy_dynamic_vram.log"
exit "$status"
