#!/usr/bin/env bash
# Issue 23's memory rows and issue 22's native-MODEL check in one device call, for sessions where a lent
# machine is hard to get and a second start may not come: benchmarks/bench_te4bit.py (one image per row
# after a warm-up), then benchmarks/gpu_comfy_check.sh (the step table with --profile, then the dynamic VRAM
# check). Six files come back: te4bit.{json,log}, comfy_native.{json,log}, comfy_dynamic_vram.{json,log}.
#
#   run(command="BENCH_GIT_COMMIT=<commit> bash benchmarks/gpu_combined.sh", carry=[".whl", ".comfy_carry"], timeout_s=595)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export BENCH_GIT_COMMIT=${BENCH_GIT_COMMIT:-unknown} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --upgrade --target /tmp/site-te .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/te4bit.log"
PYTHONPATH=/tmp/site-te:$PWD timeout "${TE_SECONDS:-200}" python3 benchmarks/bench_te4bit.py --device cuda --repeats 1 \
  --json "$OUT/te4bit.json" 2>&1 | grep -v -e "Loading weights" -e "Writing model shards" | tee -a "$OUT/te4bit.log"
echo "bench_te4bit exit status ${PIPESTATUS[0]}" | tee -a "$OUT/te4bit.log"
BENCH_SECONDS=${BENCH_SECONDS:-200} CHECK_SECONDS=${CHECK_SECONDS:-150} bash benchmarks/gpu_comfy_check.sh
