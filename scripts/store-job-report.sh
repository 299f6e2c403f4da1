#!/usr/bin/env bash
# Copy a job's report and every small file its links point at (stage records, evaluation rows, checkpoint
# records, engine manifests, sweep results, the draft measurements, how the generated text and the teacher cache were
# made, the resolved recipe) into docs/, keeping the run folder's layout so
# that the report's links still resolve; no weights, engines or caches.
#   scripts/store-job-report.sh runs/smollm2-minitron-small docs/job/smollm2-minitron-small
set -euo pipefail
run=${1:?run folder}; dest=${2:?destination}
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
(cd "$run" && find . -type f \( -path './report/*' -o -path './stages/*' -o -path './eval/*' -o -path './sweep/*' -o -path './draft/*' \
  -o -name recipe.resolved.yaml -o -name run.json -o -name generation.json -o -path './teacher-cache/cache.json' -o -path './models/*/compactlm.json' \
  -o -path './engines/*/engine.json' \) | sort) | while read -r f; do
  mkdir -p "$dest.tmp/$(dirname "$f")" && cp "$run/$f" "$dest.tmp/$f"
done
rm -rf "$dest" && mv "$dest.tmp" "$dest"
