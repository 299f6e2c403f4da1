#!/usr/bin/env bash
# The deployment image's entry point: build a TensorRT-LLM engine from /models/checkpoint (skipped when
# /models/out/engine already holds one), write its Triton model repository, and run tritonserver on it.
# Arguments, when given, run instead of tritonserver once the repository is written (e.g. `bash`).
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
KV_CACHE_FRACTION=${KV_CACHE_FRACTION:-0.9}
DECOUPLED=${DECOUPLED:-true}

if [[ ! -f "${ENGINE}/engine/config.json" ]]; then
    if [[ ! -e "${CHECKPOINT}" ]]; then
        echo "no checkpoint at ${CHECKPOINT}: mount a Hugging Face checkpoint there (-v DIR:${CHECKPOINT}:ro)" >&2
        exit 2
    fi
    echo "building a ${PRECISION} TensorRT-LLM engine (tp ${TP_SIZE}) from ${CHECKPOINT} into ${ENGINE}"
    # compactlm exports and verifies the TensorRT-LLM checkpoint; trtllm-build then runs with the image's own
    # Python, exactly as recorded in engine.json.
    compactlm engines build "${CHECKPOINT}" "${ENGINE}" --backend trtllm --precision "${PRECISION}" \
        --tp-size "${TP_SIZE}" --max-batch-size "${MAX_BATCH_SIZE}" --max-input-len "${MAX_INPUT_LEN}" \
        --max-seq-len "${MAX_SEQ_LEN}" --checkpoint-only --overwrite
    build_command=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["backend_info"]["trtllm_build_command"])' \
        "${ENGINE}/engine.json")
    (cd "${ENGINE}" && eval "${build_command}")
fi

decoupled_flag=--decoupled
[[ "${DECOUPLED}" == "true" ]] || decoupled_flag=--no-decoupled
compactlm serve triton-repo "${ENGINE}" "${REPO}" --overwrite --kv-cache-fraction "${KV_CACHE_FRACTION}" \
    "${decoupled_flag}" --bls

if [[ $# -gt 0 ]]; then
    exec "$@"
fi
exec "${REPO}/serve.sh"
