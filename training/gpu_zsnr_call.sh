#!/usr/bin/env bash
# One device call: the position probes on the GPU (tiny pixel-space models, in the background; each
# variant's evals are in its log, its sample grids beside it) while teacher-lowres trains the run-4
# teacher on at 256² with the v-prediction, zero-terminal-SNR recipe (see training/GPU-RUNS.md).
#   run(command="bash training/gpu_zsnr_call.sh", carry=[".whl", "training_carry_run4_gz"], timeout_s=600)
# Returns teacher-lowres's files (log, teacher_log.jsonl, teacher_grid.png/.txt, teacher-fp16.tar.part*)
# and probe.tar (every variant's log, results and grids): 8 files at most. TEACHER=0 runs the probes only.
# PROBE_BATCH (default 128; the CPU probes use 32): four probes side by side of 32 made about 12 steps a
# second each on an H100 (the seventh session), bound by launches rather than by the batch, so four times
# the samples cost little. PROBE_VARIANTS (default "t i r"): the full task on the zero-SNR recipe with half of
# each batch from t >= 900 and the object's pixels weighted 5x, without either, and with half of each
# batch from the position-only scenes (GPU-RUNS.md). Each probe keeps
# its EMA weights (model_V.safetensors, about 6 MB, in probe.tar) for `position_probe.py --first-step`.
set -uo pipefail
OUT=${OUT:-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT/probe"
for v in ${PROBE_VARIANTS:-t i r}; do
  timeout "${PROBE_SECONDS:-520}" python3 training/position_probe.py --device cuda --steps "${PROBE_STEPS:-8000}" \
      --batch "${PROBE_BATCH:-128}" --eval-at 1000 2000 4000 6000 --variants "$v" --save --out "$OUT/probe/$v" \
      > "$OUT/probe/$v.log" 2>&1 &
done
if [ "${TEACHER:-1}" = 1 ]; then  # TEACHER=0: the probes only (a short call)
  PYTHON=python3 UNET_SECONDS=${UNET_SECONDS:-420} TEACHER_CARRY=${TEACHER_CARRY:-training_carry_run4_gz} \
      TEACHER_RECIPE="--prediction v_prediction --zero-snr" bash training/gpu_run.sh teacher-lowres
fi
wait
tar -C "$OUT" -cf "$OUT/probe.tar" probe && rm -rf "$OUT/probe"
ls -la "$OUT"
