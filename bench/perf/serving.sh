#!/usr/bin/env bash
# Served vs in-process, one workload: ISL/OSL 128/128 (random prompts, seed 0, EOS ignored), concurrency 1, 8 and
# 32, 3 measured requests per in-flight request after 2 warm-up ones. At each concurrency the engine is measured
# in-process, then through `compactlm serve` over Triton gRPC streaming, then over the OpenAI route (interleaved,
# so that drift of a shared machine hits all three alike; the server's engine idles while the in-process one runs).
#
#   bench/perf/serving.sh ENGINE_DIR [OUT.parquet] [REPORT_DIR]
set -euo pipefail
ENGINE=${1:?usage: bench/perf/serving.sh ENGINE_DIR [OUT.parquet] [REPORT_DIR]}
OUT=${2:-docs/bench/serving.parquet}
REPORT=${3:-docs/bench/serving}
BIN=${BIN:-.venv/bin}
HTTP=18400 GRPC=18401 METRICS=18402 OPENAI=18480

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
for concurrency in 1 8 32; do
    common=(--isl 128 --osl 128 --concurrency "$concurrency" --requests 3x --warmup 2 --out "$OUT" --name smollm2)
    "$BIN/compactlm" bench measure "$ENGINE" "${common[@]}"
    "$BIN/compactlm" bench measure "triton://127.0.0.1:$GRPC/compactlm" --tokenizer "$ENGINE/tokenizer" "${common[@]}"
    "$BIN/compactlm" bench measure "http://127.0.0.1:$OPENAI" --tokenizer "$ENGINE/tokenizer" "${common[@]}"
done
kill -TERM $server
wait $server || true
trap - EXIT
tail -1 "${OUT%.*}.server.log"
"$BIN/compactlm" bench report "$OUT" --out "$REPORT" --baseline "smollm2 cpu fp32"
