#!/usr/bin/env bash
# A third-party client's numbers beside compactlm's: GuideLLM (its own venv: it needs numpy 2) and `compactlm bench
# measure` against the same served route (/v1/chat/completions) and workload (96 prompt tokens of text, 128 output
# tokens with EOS ignored, 8 concurrent streams, 32 requests), in alternating rounds. The server is pinned to CPU 0
# and each client to CPU 1, so that a client's own CPU use does not slow the engine it measures (unpinned on 2
# cores, GuideLLM took a whole core and the engine's inter-token latency rose 50%).
#
#   bench/perf/guidellm_check.sh ENGINE_DIR [ROUNDS] [OUT_DIR]
set -euo pipefail
ENGINE=$(realpath "${1:?usage: bench/perf/guidellm_check.sh ENGINE_DIR [ROUNDS] [OUT_DIR]}")
ROUNDS=${2:-2}
OUT=${3:-docs/bench/guidellm_check}
BIN=${BIN:-.venv/bin}
VENV=${GUIDELLM_VENV:-$HOME/.cache/compactlm/venvs/guidellm-0.8.1}
PORT=18555
MODEL=$(basename "$ENGINE")
[ -x "$VENV/bin/guidellm" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q guidellm==0.8.1; }
mkdir -p "$OUT"
cat > "$OUT/scenario.json" <<JSON
{"spec": {
  "backend": {"kind": "openai_http", "target": "http://127.0.0.1:$PORT", "model": "$MODEL",
              "request_format": "/v1/chat/completions"},
  "profile": {"kind": "concurrent", "streams": 8},
  "tokenizer": {"kind": "huggingface_auto", "model": "$ENGINE/tokenizer"},
  "data": [{"kind": "synthetic_text", "prompt_tokens": 96, "output_tokens": 128}],
  "constraints": [{"kind": "max_requests", "count": 32}]
}}
JSON
taskset -c 0 "$BIN/compactlm" serve "$ENGINE" --no-triton --openai-port $PORT > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server || true' EXIT
for _ in $(seq 120); do curl -fs "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
rm -f "$OUT/compactlm.parquet"
for round in $(seq "$ROUNDS"); do
    taskset -c 1 "$VENV/bin/guidellm" run --scenario "$OUT/scenario.json" --disable-console-interactive \
        --output "kind=json,path=$OUT/guidellm-$round.json" > "$OUT/guidellm-$round.txt" 2>&1
    taskset -c 1 "$BIN/compactlm" bench measure "http://127.0.0.1:$PORT/v1/chat/completions" \
        --tokenizer "$ENGINE/tokenizer" --isl 96 --osl 128 --concurrency 8 --requests 32 --warmup 0 \
        --source python-docs --out "$OUT/compactlm.parquet" --name "compactlm-$round" > /dev/null 2>&1
    grep -E "concurrent@8 \| 8 |concurrent@8 \| [0-9.]+ ±" "$OUT/guidellm-$round.txt" || true
done
"$BIN/python" -c "
import pandas as pd
rows = pd.read_parquet('$OUT/compactlm.parquet')
print(rows[['target', 'request_throughput', 'ttft_ms_p50', 'itl_ms_p50', 'errors']].to_string(index=False))"
