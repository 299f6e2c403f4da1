#!/usr/bin/env bash
# The deployment image's entry point: turn /models/checkpoint into a trtllm engine folder (skipped when
# /models/out/engine already holds one; compactlm verifies the checkpoint it writes against the source), then serve
# it: MODE=openai runs trtllm-serve with the folder's LLM arguments, MODE=triton writes Triton's llmapi repository
# and runs tritonserver (a Triton base image). Arguments, when given, run instead of the server (e.g. `bash`).
set -euo pipefail

CHECKPOINT=${CHECKPOINT:-/models/checkpoint}
OUT=${OUT:-/models/out}
ENGINE=${OUT}/engine
REPO=${OUT}/triton-repo
PRECISION=${PRECISION:-fp16}
TP_SIZE=${TP_SIZE:-1}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-64}
MAX_INPUT_LEN=${MAX_INPUT_LEN:-2048}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-4096}
MAX_NUM_TOKENS=${MAX_NUM_TOKENS:-8192}
CALIB_DATA=${CALIB_DATA:-python-docs}
MODE=${MODE:-openai}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}

if [[ ! -f "${ENGINE}/engine.json" ]]; then
    if [[ ! -e "${CHECKPOINT}" ]]; then
        echo "no checkpoint at ${CHECKPOINT}: mount a Hugging Face checkpoint there (-v DIR:${CHECKPOINT}:ro)" >&2
        exit 2
    fi
    echo "writing a ${PRECISION} TensorRT-LLM engine folder (tp ${TP_SIZE}) from ${CHECKPOINT} into ${ENGINE}"
    compactlm engines build "${CHECKPOINT}" "${ENGINE}" --backend trtllm --precision "${PRECISION}" \
        --tp-size "${TP_SIZE}" --max-batch-size "${MAX_BATCH_SIZE}" --max-input-len "${MAX_INPUT_LEN}" \
        --max-seq-len "${MAX_SEQ_LEN}" --max-num-tokens "${MAX_NUM_TOKENS}" --calib-data "${CALIB_DATA}" --overwrite
fi

if [[ $# -gt 0 ]]; then
    exec "$@"
fi
case "${MODE}" in
    openai)
        # the command engine.json records, listening on HOST:PORT (inside a container: all interfaces)
        cd "${ENGINE}"
        exec trtllm-serve checkpoint --host "${HOST}" --port "${PORT}" --backend pytorch --config llm_args.yaml
        ;;
    triton)
        compactlm serve triton-repo "${ENGINE}" "${REPO}" --overwrite --http-port "${PORT}"
        exec "${REPO}/serve.sh"
        ;;
    *)
        echo "MODE must be openai or triton, not ${MODE}" >&2
        exit 2
        ;;
esac
