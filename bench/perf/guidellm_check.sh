#!/usr/bin/env bash
# A third-party client's numbers beside compactlm's: GuideLLM (bench/guidellm.py; its own venv: it needs numpy 2)
# and `compactlm bench measure` against the same served route (/v1/chat/completions) and workload (96 prompt tokens
# of text, 128 output tokens with EOS ignored, 8 concurrent streams, REQUESTS requests), in alternating rounds after
# one unrecorded warm-up point (so that neither tool meets a cold server). The server is pinned to CPU 0 and each
# client to CPU 1, so that a client's own CPU use does not slow the engine it measures (unpinned on 2 cores,
# GuideLLM took a whole core and the engine's inter-token latency rose 50%). Ends with each round's figures side by
# side (OUT_DIR/summary.json).
#
#   bench/perf/guidellm_check.sh ENGINE_DIR [ROUNDS] [OUT_DIR] [REQUESTS]
set -euo pipefail
ENGINE=$(realpath "${1:?usage: bench/perf/guidellm_check.sh ENGINE_DIR [ROUNDS] [OUT_DIR] [REQUESTS]}")
ROUNDS=${2:-3}
OUT=${3:-docs/bench/guidellm_check}
REQUESTS=${4:-64}
BIN=${BIN:-.venv/bin}
PORT=18555
MODEL=$(basename "$ENGINE")
"$BIN/python" -c "from compactlm.bench.guidellm import ensure_guidellm; ensure_guidellm()"
mkdir -p "$OUT"
rm -rf "$OUT"/compactlm.parquet "$OUT"/round-* "$OUT"/guidellm-* "$OUT"/scenario.json
taskset -c 0 "$BIN/compactlm" serve "$ENGINE" --no-triton --openai-port $PORT > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server || true' EXIT
for _ in $(seq 120); do curl -fs "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
measure() {  # compactlm bench measure, pinned like GuideLLM: measure OUT_FILE NAME COUNT
    taskset -c 1 "$BIN/compactlm" bench measure "http://127.0.0.1:$PORT/v1/chat/completions" \
        --tokenizer "$ENGINE/tokenizer" --isl 96 --osl 128 --concurrency 8 --requests "$3" --warmup 0 \
        --source python-docs --out "$1" --name "$2" > /dev/null 2>&1
}
measure "$OUT/warmup.parquet" warmup 16 && rm -f "$OUT/warmup.parquet"
for round in $(seq "$ROUNDS"); do
    "$BIN/python" -m compactlm.bench.guidellm "http://127.0.0.1:$PORT" --model "$MODEL" --tokenizer "$ENGINE/tokenizer" \
        --streams 8 --requests "$REQUESTS" --prompt-tokens 96 --output-tokens 128 --cpus 1 --out "$OUT/round-$round"
    measure "$OUT/compactlm.parquet" "compactlm-$round" "$REQUESTS"
done
"$BIN/python" - "$OUT" "$ROUNDS" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
ours = pd.read_parquet(out / "compactlm.parquet").set_index("target")
table = []
for r in range(1, rounds + 1):
    theirs, row = json.loads((out / f"round-{r}" / "summary.json").read_text()), ours.loc[f"compactlm-{r}"]
    table.append({
        "round": r,
        "guidellm_req_per_s": theirs["req_per_s"],  # its headline: the mean of its request-rate series
        "guidellm_completed_per_s": theirs["completed_per_s"],  # compactlm's definition: completed / span
        "compactlm_req_per_s": float(row["request_throughput"]),
        "guidellm_ttft_ms_p50": theirs["ttft_ms_p50"],
        "compactlm_ttft_ms_p50": float(row["ttft_ms_p50"]),
        "guidellm_itl_ms_p50": theirs["itl_ms_p50"],
        "compactlm_itl_ms_p50": float(row["itl_ms_p50"]),
        "guidellm_errors": theirs["errored"] + theirs["incomplete"],
        "compactlm_errors": int(row["errors"]),
    })
frame = pd.DataFrame(table)
frame["req_ratio"] = frame["guidellm_req_per_s"] / frame["compactlm_req_per_s"]
frame["completed_ratio"] = frame["guidellm_completed_per_s"] / frame["compactlm_req_per_s"]
frame["ttft_ratio"] = frame["guidellm_ttft_ms_p50"] / frame["compactlm_ttft_ms_p50"]
(out / "summary.json").write_text(json.dumps(frame.round(4).to_dict(orient="records"), indent=1) + "\n")
print(frame.round(3).to_string(index=False))
PY
