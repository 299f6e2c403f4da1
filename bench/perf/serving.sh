#!/usr/bin/env bash
# Served vs in-process, one workload: ISL/OSL 128/128 (random prompts, seed 0, EOS ignored), concurrency 1, 8 and
# 32, 3 measured requests per in-flight request after 2 warm-up ones; against the engine in this process, then
# through `compactlm serve`: Triton gRPC streaming and the OpenAI route. Rows go to OUT; then the report.
#
#   bench/perf/serving.sh ENGINE_DIR [OUT.parquet] [REPORT_DIR]
set -euo pipefail
ENGINE=${1:?usage: bench/perf/serving.sh ENGINE_DIR [OUT.parquet] [REPORT_DIR]}
OUT=${2:-docs/bench/serving.parquet}
REPORT=${3:-docs/bench/serving}
BIN=${BIN:-.venv/bin}
HTTP=18400 GRPC=18401 METRICS=18402 OPENAI=18480
COMMON=(--isl 128 --osl 128 --concurrency 1,8,32 --requests 3x --warmup 2 --out "$OUT")

"$BIN/compactlm" bench run "$ENGINE" --name smollm2 "${COMMON[@]}"

"$BIN/compactlm" serve "$ENGINE" --http-port $HTTP --grpc-port $GRPC --metrics-port $METRICS \
    --openai-port $OPENAI > "${OUT%.*}.server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server || true' EXIT
for _ in $(seq 300); do
    if curl -fs "http://127.0.0.1:$HTTP/v2/models/compactlm/ready" > /dev/null \
        && curl -fs "http://127.0.0.1:$OPENAI/health" > /dev/null; then
        break
    fi
    sleep 1
done
"$BIN/compactlm" bench run "triton://127.0.0.1:$GRPC/compactlm" --name smollm2 --tokenizer "$ENGINE/tokenizer" \
    "${COMMON[@]}"
"$BIN/compactlm" bench run "http://127.0.0.1:$OPENAI" --name smollm2 --tokenizer "$ENGINE/tokenizer" "${COMMON[@]}"
kill -TERM $server
wait $server || true
trap - EXIT
tail -1 "${OUT%.*}.server.log"
"$BIN/compactlm" bench report "$OUT" --out "$REPORT" --baseline "smollm2 cpu fp32"
