#!/usr/bin/env bash
# The measurements of docs/compress/README.md, in the order they were run (each step is skipped when its output is
# there; the search and the chains resume by themselves). Needs the demo students (`compactlm demo`: runs/demo/) and
# the corrected teacher (scripts/teacher-correction-experiment.sh: runs/retraining-40960/).
#   docs/compress/experiments.sh [search|full|chains|quantize|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
C=${COMPACTLM:-.venv/bin/compactlm}
TEACHER=runs/retraining-40960/teacher-corrected
EVAL=(--data python-docs --samples 32 --seq-len 512 --tasks general_knowledge,social_iqa --task-limit 100)
FULL=(--loss logit --data python-docs --tokens 40960 --seq-len 256 --batch-size 4 --eval-samples 0)
what=${1:-all}

if [[ $what == search || $what == all ]]; then
  # 1. architecture search at 50% +-5%: 6 candidates x 16,384 distillation tokens, ranked by loss and cpu-engine speed
  $C compress search smollm2-135m --out runs/search-50 --params 50% --tolerance 5% --candidates 6 \
    --retrain-tokens 16384 --rank-by loss+throughput --teacher "$TEACHER"
  cp runs/search-50/leaderboard.csv docs/compress/search-leaderboard.csv
  cp runs/search-50/candidates.csv docs/compress/search-candidates.csv
  cp runs/search-50/search.png docs/compress/search.png
fi

if [[ $what == full || $what == all ]]; then
  # 2. the winner after the same full distillation as the hand-picked students (40,960 tokens, logit KD from the
  #    corrected teacher; the width student's run is scripts/teacher-correction-experiment.sh's)
  mkdir -p runs/search-50-full
  [ -d runs/search-50-full/winner ] || $C compress distill --teacher "$TEACHER" --student runs/search-50/winner \
    --out runs/search-50-full/winner "${FULL[@]}"
  [ -d runs/search-50-full/depth ] || $C compress distill --teacher "$TEACHER" --student runs/demo/depth \
    --out runs/search-50-full/depth "${FULL[@]}"
  $C compress eval smollm2-135m "$TEACHER" runs/retraining-40960/width-logit-corrected runs/search-50-full/depth \
    runs/search-50-full/winner "${EVAL[@]}" --out docs/compress/search-vs-handpicked.csv
fi

if [[ $what == chains || $what == all ]]; then
  # 3. one-shot 135M -> 61M vs the two-step chain 135M -> 86M -> 61M, 40,960 distillation tokens each in all
  $C compress chain docs/compress/chain-one-shot.yaml
  $C compress chain docs/compress/chain-two-step.yaml
  cp runs/chain-one-shot/family.csv docs/compress/family-one-shot.csv
  cp runs/chain-two-step/family.csv docs/compress/family-two-step.csv
fi

if [[ $what == quantize || $what == all ]]; then
  # 4. each format on the bundled model and its best student; accuracy cost measured by compress eval
  STUDENT=${STUDENT:-runs/retraining-40960/width-logit-corrected}
  mkdir -p runs/quant
  for fmt in fp8 int8-sq int4-awq; do
    [ -d "runs/quant/teacher-$fmt" ] || $C compress quantize smollm2-135m "runs/quant/teacher-$fmt" --format "$fmt"
    [ -d "runs/quant/student-$fmt" ] || $C compress quantize "$STUDENT" "runs/quant/student-$fmt" --format "$fmt"
  done
  [ -f runs/quant/teacher.csv ] || $C compress eval smollm2-135m runs/quant/teacher-{fp8,int8-sq,int4-awq} \
    "${EVAL[@]}" --out runs/quant/teacher.csv
  [ -f runs/quant/student.csv ] || $C compress eval "$STUDENT" runs/quant/student-{fp8,int8-sq,int4-awq} \
    "${EVAL[@]}" --out runs/quant/student.csv
  .venv/bin/python docs/compress/quant_table.py "SmolLM2-135M=runs/quant/teacher.csv" \
    "width student (distilled)=runs/quant/student.csv" \
    > docs/compress/quantization.md
  # the unified checkpoints are what current TensorRT-LLM loads: the trtllm backend copies them into engine folders
  for fmt in fp8 int4-awq; do
    [ -d "runs/quant/trtllm-$fmt" ] || $C engines build "runs/quant/teacher-$fmt" "runs/quant/trtllm-$fmt" \
      --backend trtllm --precision "$fmt" --max-batch-size 8 --max-input-len 512 --max-seq-len 1024
  done
fi
