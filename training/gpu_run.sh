#!/usr/bin/env bash
# The shipped model's GPU runs, one stage a device call (each under 10 minutes); see training/GPU-RUNS.md.
#   bash training/gpu_run.sh teacher|distill|more|ablate
# Work folder: models/train (git-ignored, so it stays on a warm machine between calls); what must come
# back goes to $OUT (at most 8 files, each under 16 MB).
set -euo pipefail
STAGE=${1:?stage: teacher, distill, more or ablate}
W=${BONSAI_TRAIN_DIR:-models/train}
OUT=${OUT:-out}
PY=${PYTHON:-python}
mkdir -p "$W" "$OUT"
exec > >(tee -a "$OUT/$STAGE.log") 2>&1
echo "== $STAGE $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || true)"
nvidia-smi -L || true
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
t0=$SECONDS

need_teacher() {
  if [ ! -f "$W/teacher/model_index.json" ]; then
    # a fresh machine: the teacher comes back in with the call (carry: training_carry/)
    $PY training/pack.py unpack-teacher training_carry "$W/teacher"
  fi
}

score() {  # score teacher, distilled student and naive 1-bit on 200 held-out prompts
  [ -f "$W/classifier.pt" ] || $PY training/evaluate.py classifier --out "$W/classifier.pt" --steps 1500
  [ -d "$W/naive" ] || $PY -m bonsai_core convert "$W/teacher" "$W/naive" --overwrite > "$W/naive-convert.txt"
  $PY training/evaluate.py score --classifier "$W/classifier.pt" --prompts 200 \
      --model teacher="$W/teacher" --model distilled="$W/student" --model naive="$W/naive" "$@"
}

case "$STAGE" in
  teacher)   # ~9 min: VAE (2.5 min), then text encoder + UNet (6 min), teacher packed in fp16
    $PY training/train_teacher.py vae --work "$W" --steps 3000 --batch 32 --max-seconds 140
    $PY training/train_teacher.py unet --work "$W" --steps 6000 --batch 128 --max-seconds 300
    $PY training/evaluate.py sample --model "$W/teacher" --grid "$OUT/teacher_grid.png"
    $PY training/pack.py teacher "$W/teacher" "$OUT"
    cp "$W/log.jsonl" "$OUT/teacher_log.jsonl"
    ;;
  teacher-more)  # ~9 min: the UNet stage continued (same command resumes), then packed again
    $PY training/train_teacher.py unet --work "$W" --steps 12000 --batch 128 --max-seconds 450
    $PY training/evaluate.py sample --model "$W/teacher" --grid "$OUT/teacher_grid.png"
    $PY training/pack.py teacher "$W/teacher" "$OUT"
    cp "$W/log.jsonl" "$OUT/teacher_log.jsonl"
    ;;
  distill)   # ~9 min: naive 1-bit, classifier (1 min), distillation (5 min), scores (1.5 min)
    need_teacher
    $PY -m bonsai_core convert "$W/teacher" "$W/naive" --overwrite > "$W/naive-convert.txt"
    $PY training/evaluate.py classifier --out "$W/classifier.pt" --steps 1500
    $PY -m bonsai_core distill "$W/teacher" "$W/student" --work "$W/distill-work" --steps 10000 --batch 64 \
        --max-seconds 270 --overwrite
    score --json "$OUT/eval.json" --grid "$OUT/eval_grid.png"
    $PY training/pack.py model "$W/student" "$OUT/student.tar"
    cp "$W/distill-work/log.jsonl" "$OUT/distill_log.jsonl"
    ;;
  more)      # ~9 min: the distillation continued (resumes from its checkpoint), scored and packed again
    need_teacher
    $PY -m bonsai_core distill "$W/teacher" "$W/student" --work "$W/distill-work" --steps 30000 --batch 64 \
        --max-seconds 360
    score --json "$OUT/eval.json" --grid "$OUT/eval_grid.png"
    $PY training/pack.py model "$W/student" "$OUT/student.tar"
    cp "$W/distill-work/log.jsonl" "$OUT/distill_log.jsonl"
    ;;
  ablate)    # ~8 min: output matching only (no feature matching), same budget as 'distill', scored
    need_teacher
    $PY -m bonsai_core distill "$W/teacher" "$W/student-nofeat" --work "$W/distill-nofeat" --steps 10000 \
        --batch 64 --max-seconds 270 --feature-weight 0 --overwrite
    [ -f "$W/classifier.pt" ] || $PY training/evaluate.py classifier --out "$W/classifier.pt" --steps 1500
    $PY training/evaluate.py score --classifier "$W/classifier.pt" --prompts 200 --model teacher="$W/teacher" \
        --model distilled_output_only="$W/student-nofeat" --json "$OUT/eval_ablate.json"
    cp "$W/distill-nofeat/log.jsonl" "$OUT/distill_nofeat_log.jsonl"
    ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
echo "== $STAGE done in $((SECONDS - t0)) s"
