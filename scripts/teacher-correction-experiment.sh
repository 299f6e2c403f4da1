#!/usr/bin/env bash
# Does teacher correction help? Correct SmolLM2-135M on the distillation data (CE, TOKENS tokens), then distill the
# demo's width student from the corrected teacher with the same budget as scripts/retraining-experiment.sh, and
# compare held-out perplexity with the runs there (logit KD from the uncorrected teacher, CE on labels).
# Usage: scripts/teacher-correction-experiment.sh [TOKENS]   (default 40960)
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-40960}
OUT=${OUT:-runs/retraining-$TOKENS}
C=${COMPACTLM:-.venv/bin/compactlm}
common=(--data python-docs --tokens "$TOKENS" --seq-len 256 --batch-size 4 --eval-samples 0)
[ -d runs/demo/width ] || $C demo
[ -d "$OUT/teacher-corrected" ] || $C compress correct-teacher smollm2-135m --out "$OUT/teacher-corrected" "${common[@]}"
[ -d "$OUT/width-logit-corrected" ] || $C compress distill --teacher "$OUT/teacher-corrected" \
  --student runs/demo/width --out "$OUT/width-logit-corrected" --loss logit "${common[@]}"
$C compress eval smollm2-135m "$OUT/teacher-corrected" "$OUT/width-ce" "$OUT/width-logit" "$OUT/width-logit-corrected" \
  --data python-docs --samples 32 --seq-len 512 --out "$OUT/eval-correction.csv"
