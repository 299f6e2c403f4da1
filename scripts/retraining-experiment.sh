#!/usr/bin/env bash
# The retraining experiment of the README: the width and depth students of `make demo`, each retrained with the
# same token budget by (b) CE on labels, (c) logit distillation, (d) logit+hidden distillation, plus (e) the width
# architecture trained from random init with CE; then held-out perplexity of all of them side by side.
# Usage: scripts/retraining-experiment.sh [TOKENS]   (default 40960 = 40 steps of 4 x 256 tokens)
# Re-running skips runs whose output exists.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-40960}
OUT=${OUT:-runs/retraining-$TOKENS}
C=${COMPACTLM:-.venv/bin/compactlm}
mkdir -p "$OUT"
[ -d runs/demo/width ] && [ -d runs/demo/depth ] || $C demo

common=(--teacher smollm2-135m --data python-docs --tokens "$TOKENS" --seq-len 256 --batch-size 4 --eval-samples 0)
run() {  # run NAME ARGS...: one retraining, skipped when done
  local name=$1; shift
  [ -d "$OUT/$name" ] && { echo "skip $name"; return; }
  $C compress distill "${common[@]}" --out "$OUT/$name" "$@"
}
for student in width depth; do
  run "$student-ce" --student "runs/demo/$student" --loss ce
  run "$student-logit" --student "runs/demo/$student" --loss logit
  run "$student-logit+hidden" --student "runs/demo/$student" --loss logit+hidden
done
run width-scratch-ce --student runs/demo/width --loss ce --from-scratch

$C compress eval smollm2-135m runs/demo/width runs/demo/depth \
  "$OUT"/width-ce "$OUT"/width-logit "$OUT"/width-logit+hidden "$OUT"/width-scratch-ce \
  "$OUT"/depth-ce "$OUT"/depth-logit "$OUT"/depth-logit+hidden \
  --data python-docs --samples 32 --seq-len 512 --out "$OUT/eval.csv"
