#!/usr/bin/env bash
# The shipped model's GPU runs, one stage a device call (each under 10 minutes); see training/GPU-RUNS.md.
#   bash training/gpu_run.sh teacher|teacher-carried|teacher-resume|teacher-lowres|teacher-more|distill|more|ablate|retrain
# RESOLUTION=N (teacher-resume, teacher-more) trains the UNet on scenes rendered at N (default: the config's, 512);
# teacher-lowres is teacher-resume at LOWRES (256; 32 with SMOKE=1). The packed teacher is a 512² model either way.
# TEACHER_RECIPE adds train_teacher.py unet options, e.g. "--prediction v_prediction --zero-snr".
# Work folder: models/train (git-ignored, so it stays on a warm machine between calls); what must come
# back goes to $OUT (at most 8 files, each under 16 MB).
# SMOKE=1 runs every stage on the CPU with the tiny config and a few steps (checks the script itself).
set -euo pipefail
STAGE=${1:?stage: teacher, teacher-carried, teacher-resume, teacher-lowres, teacher-more, distill, more, ablate or retrain}
W=${BONSAI_TRAIN_DIR:-models/train}
OUT=${OUT:-out}
PY=${PYTHON:-python}
if [ "${SMOKE:-0}" = 1 ]; then
  C="--config tiny --device cpu"; DEV="--device cpu"
  VAE="--steps 2 --batch 2 --max-seconds 60"; UNET="--steps 2 --batch 2 --pool 4 --fresh 2 --max-seconds 60 ${TEACHER_RECIPE:-}"
  UNET_MORE="--steps 3 --batch 2 --pool 4 --fresh 2 --max-seconds 60 ${TEACHER_RECIPE:-}"
  DIST="--steps 2 --batch 2 --pool 2 --refresh 1 --sample-steps 2 --max-seconds 60"
  DIST_MORE="--steps 3 --batch 2 --pool 2 --refresh 1 --sample-steps 2 --max-seconds 60"
  CLF="--steps 2 --batch 4 --pool 8"; EVAL="--prompts 2 --steps 2 --size 64 --batch 2"; SAMPLE="--steps 2 --size 64"
  LOWRES=${LOWRES:-32}  # the tiny config is 64²
else
  C=""; DEV=""
  VAE="--steps 3000 --batch 32 --max-seconds ${VAE_SECONDS:-140}"
  UNET="--steps 6000 --batch 128 --pyramid-noise ${PYRAMID_NOISE:-0.6} --max-seconds ${UNET_SECONDS:-300} ${TEACHER_RECIPE:-}"
  UNET_MORE="--steps 60000 --batch 128 --pyramid-noise ${PYRAMID_NOISE:-0.6} --max-seconds ${UNET_SECONDS:-450} ${TEACHER_RECIPE:-}"
  DIST="--steps 10000 --batch 64 --max-seconds ${DISTILL_SECONDS:-270}"; DIST_MORE="--steps 30000 --batch 64 --max-seconds ${DISTILL_SECONDS:-360}"
  CLF="--steps 1500"; EVAL="--prompts 200"; SAMPLE=""
  LOWRES=${LOWRES:-256}
fi
RES=${RESOLUTION:+--resolution $RESOLUTION}  # empty: the config's resolution
mkdir -p "$W" "$OUT"
exec > >(tee -a "$OUT/$STAGE.log") 2>&1
echo "== $STAGE $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || true)"
nvidia-smi -L 2>/dev/null || true
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
t0=$SECONDS

need_teacher() {
  if [ ! -f "$W/teacher/model_index.json" ]; then
    # a fresh machine: the teacher comes back in with the call (training_carry/, see GPU-RUNS.md)
    $PY training/pack.py unpack-teacher "${TEACHER_CARRY:-training_carry}" "$W/teacher"
  fi
}
classifier() { [ -f "$W/classifier.pt" ] || $PY training/evaluate.py classifier --out "$W/classifier.pt" $CLF $DEV; }
naive() { [ -d "$W/naive" ] || $PY -m bonsai_core convert "$W/teacher" "$W/naive" --overwrite > "$W/naive-convert.txt"; }
score() {  # teacher, distilled student and naive 1-bit on the held-out prompts
  classifier
  naive
  $PY training/evaluate.py score --classifier "$W/classifier.pt" $EVAL $DEV \
      --model teacher="$W/teacher" --model distilled="$W/student" --model naive="$W/naive" \
      --json "$OUT/eval.json" --grid "$OUT/eval_grid.png"
}
new_unet_on_carried_vae() {  # a text encoder + UNet trained anew on the (carried) teacher's VAE
  need_teacher
  rm -rf "$W/vae" "$W/unet.pt" "$W/log.jsonl"; cp -r "$W/teacher/vae" "$W/vae"
  $PY training/train_teacher.py unet --work "$W" $C $UNET
}
resume_carried_teacher() {  # the carried teacher trained on (fresh optimizer) at --resolution $1 (empty: the config's)
  need_teacher
  rm -rf "$W/vae" "$W/unet.pt"; cp -r "$W/teacher/vae" "$W/vae"
  cp "$W/teacher/training_log.jsonl" "$W/log.jsonl" 2>/dev/null || true
  $PY training/train_teacher.py unet --work "$W" $C $UNET_MORE --init-from "$W/teacher" $1
  pack_teacher
}
pack_teacher_parts() {  # the teacher in fp16 parts (under 16 MB each) and its training log
  $PY training/pack.py teacher "$W/teacher" "$OUT"
  cp "$W/log.jsonl" "$OUT/teacher_log.jsonl"
}
pack_teacher() {
  $PY training/evaluate.py sample --model "$W/teacher" --grid "$OUT/teacher_grid.png" $SAMPLE $DEV
  pack_teacher_parts
}
pack_student() {
  $PY training/pack.py model "$W/student" "$OUT/student.tar"
  cp "$W/distill-work/log.jsonl" "$OUT/distill_log.jsonl"
}
distill_from_scratch() {  # naive 1-bit, classifier, a new distillation of the teacher, scores, the student packed
  rm -rf "$W/naive"; naive
  classifier
  $PY -m bonsai_core distill "$W/teacher" "$W/student" --work "$W/distill-work" $DIST $DEV --overwrite
  score
  pack_student
}

case "$STAGE" in
  teacher)       # ~9 min: VAE (2.5 min), text encoder + UNet (5 min), a sample grid, the teacher packed in fp16
    $PY training/train_teacher.py vae --work "$W" $C $VAE
    $PY training/train_teacher.py unet --work "$W" $C $UNET
    pack_teacher
    ;;
  teacher-carried)  # ~9 min: a new text encoder + UNet on the carried teacher's VAE (no VAE stage), packed in fp16
    new_unet_on_carried_vae
    pack_teacher
    ;;
  teacher-resume)  # ~9 min: the carried teacher (gzip parts fit the carry) trained on, fresh optimizer, packed again
    resume_carried_teacher "$RES"
    ;;
  teacher-lowres)  # ~9 min: teacher-resume at LOWRES² (256: about 4x the steps of 512²), packed again as a 512² model
    resume_carried_teacher "--resolution $LOWRES"
    ;;
  teacher-more)  # ~9 min: the UNet stage resumed from its checkpoint (optimizer kept), at RESOLUTION if set, packed again
    $PY training/train_teacher.py unet --work "$W" $C $UNET_MORE $RES
    pack_teacher
    ;;
  retrain)       # ~9.5 min: a new UNet + text encoder on the carried teacher's VAE, then 'distill' in the same call
    new_unet_on_carried_vae
    pack_teacher_parts
    distill_from_scratch
    rm -f "$OUT/eval_grid.txt" "$OUT/distill_log.jsonl"  # 8 files come back at most: both are in retrain.log
    ;;
  distill)       # ~9 min: naive 1-bit (seconds), classifier (1 min), distillation (4.5 min), scores (1.5 min)
    need_teacher
    distill_from_scratch
    ;;
  more)          # ~9 min: the distillation resumed from its checkpoint, scored and packed again
    need_teacher
    $PY -m bonsai_core distill "$W/teacher" "$W/student" --work "$W/distill-work" $DIST_MORE $DEV
    score
    pack_student
    ;;
  ablate)        # ~8 min: output matching only (--feature-weight 0), same budget as 'distill', scored
    need_teacher
    $PY -m bonsai_core distill "$W/teacher" "$W/student-nofeat" --work "$W/distill-nofeat" $DIST $DEV \
        --feature-weight 0 --overwrite
    classifier
    $PY training/evaluate.py score --classifier "$W/classifier.pt" $EVAL $DEV --model teacher="$W/teacher" \
        --model distilled_output_only="$W/student-nofeat" --json "$OUT/eval_ablate.json"
    cp "$W/distill-nofeat/log.jsonl" "$OUT/distill_nofeat_log.jsonl"
    ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
echo "== $STAGE done in $((SECONDS - t0)) s"
ls -la "$OUT"
