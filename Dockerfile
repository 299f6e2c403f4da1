# The GPU deployment image: NVIDIA's TensorRT-LLM release container plus compactlm. Its entry point turns a
# checkpoint into a trtllm engine folder (once; kept in /models/out: the HF or ModelOpt unified FP8 checkpoint that
# TensorRT-LLM loads directly, with its LLM arguments) and serves it with trtllm-serve (OpenAI API, MODE=openai) or,
# on a Triton base image, with Triton's llmapi model (MODE=triton):
#
#   docker build -t compactlm-serve .
#   docker run --gpus all --shm-size=2g -p 8000:8000 \
#     -v /path/to/hf-checkpoint:/models/checkpoint:ro -v compactlm-engines:/models/out compactlm-serve
#   # Triton instead: docker build --build-arg BASE=nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 \
#   #   --build-arg TRTLLM_VERSION=<the TensorRT-LLM version that Triton release holds> -t compactlm-triton .
#   #   docker run ... -e MODE=triton -p 8000:8000 -p 8001:8001 -p 8002:8002 compactlm-triton
#
# Settings (environment): PRECISION (fp16|bf16|fp8|int4-awq), TP_SIZE, MAX_BATCH_SIZE, MAX_INPUT_LEN, MAX_SEQ_LEN,
# MAX_NUM_TOKENS, CALIB_DATA (fp8/int4 calibration text: a file or folder mounted in the container), MODE
# (openai|triton), HOST, PORT. Any arguments replace the serve step: e.g. `bash`.
# Not built in compactlm's CI (no Docker engine there); tests/unit/serve/test_dockerfile.py lints it with hadolint.
#
# TensorRT-LLM 1.2.1 (the release tag is the version it holds): the newest stable release we could confirm from
# here (NGC itself is not reachable from the build machines); it runs the PyTorch backend flow that compactlm's trtllm
# backend targets, and still has the legacy trtllm-build for trtllm-engine folders. Newer releases (1.3, the
# TensorRT engine backend removed) take the same folder: --build-arg TRTLLM_VERSION=1.3.0.
ARG TRTLLM_VERSION=1.2.1
ARG BASE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
FROM ${BASE}
ARG TRTLLM_VERSION

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV COMPACTLM_VENV=/opt/compactlm \
    TRTLLM_LLMAPI_DIR=/opt/tensorrt_llm/triton_backend/all_models/llmapi/tensorrt_llm/1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY compactlm ./compactlm
COPY compress ./compress
COPY engines ./engines
COPY serve ./serve
COPY bench ./bench
COPY docker/requirements.txt docker/entrypoint.sh docker/fetch_llmapi.py docker/healthcheck.py ./docker/

# compactlm gets its own venv that sees the image's packages (--system-site-packages): it uses NVIDIA's torch and
# the image's nvidia-modelopt, and its transformers 5 shadows the image's only inside compactlm's own process
# (trtllm-serve and tritonserver keep the image's). pyproject.toml pins torch==2.13.0 (the CPU wheel of the
# development machines): installing compactlm with its dependencies would replace NVIDIA's CUDA torch, so it goes in
# with --no-deps, the dependencies it needs come from docker/requirements.txt, and the image's torch is held.
# python3-venv: Ubuntu's Python has no ensurepip without it
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv --system-site-packages "${COMPACTLM_VENV}" \
    && python3 -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch-constraint.txt \
    && "${COMPACTLM_VENV}/bin/pip" install -c /tmp/torch-constraint.txt -r docker/requirements.txt \
    && "${COMPACTLM_VENV}/bin/pip" install --no-deps . \
    && ln -s "${COMPACTLM_VENV}/bin/compactlm" /usr/local/bin/compactlm \
    && chmod 0755 docker/entrypoint.sh \
    && compactlm --help > /dev/null

# Triton's llmapi model (model.py, helpers.py) and TensorRT-LLM's Triton launcher, from the release tag of the
# image's TensorRT-LLM: NVIDIA's files, fetched at build time, not shipped in compactlm.
RUN python3 docker/fetch_llmapi.py "v${TRTLLM_VERSION}" /opt/tensorrt_llm

WORKDIR /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
    CMD ["python3", "/src/docker/healthcheck.py"]
ENTRYPOINT ["/src/docker/entrypoint.sh"]
