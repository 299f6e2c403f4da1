# The GPU deployment image: NVIDIA's Triton Inference Server with the TensorRT-LLM backend, plus compactlm.
# Its entry point builds a TensorRT-LLM engine from a checkpoint (once; kept in /models) and serves it:
#
#   docker build -t compactlm-serve .
#   docker run --gpus all --shm-size=2g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -v /path/to/hf-checkpoint:/models/checkpoint:ro -v compactlm-engines:/models/out compactlm-serve
#
# Settings (environment): PRECISION (fp16|bf16|fp8), TP_SIZE, MAX_BATCH_SIZE, MAX_INPUT_LEN, MAX_SEQ_LEN,
# KV_CACHE_FRACTION, DECOUPLED (true|false). Any arguments replace the entry point's serve step: e.g. `bash`.
# Not built in compactlm's CI (no Docker engine there); tests/unit/serve/test_dockerfile.py lints it with hadolint.

# Triton 25.12: Python 3.12, NVIDIA's torch 2.9, TensorRT 10.13, TensorRT-LLM 1.1.0, CUDA 13.0.
FROM nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV COMPACTLM_VENV=/opt/compactlm \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY compactlm ./compactlm
COPY compress ./compress
COPY engines ./engines
COPY serve ./serve
COPY bench ./bench
COPY docker/requirements.txt docker/entrypoint.sh ./docker/

# compactlm gets its own venv that sees the image's packages (--system-site-packages): it uses NVIDIA's torch,
# and its transformers 5 shadows the image's transformers only for compactlm's own process (trtllm-build and
# tritonserver keep the image's). pyproject.toml pins torch==2.13.0 (the CPU wheel of the development machines):
# installing compactlm with its dependencies would replace NVIDIA's CUDA torch, so it goes in with --no-deps, the
# dependencies it needs here come from docker/requirements.txt, and the image's torch is held by a constraint.
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

WORKDIR /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["/src/docker/entrypoint.sh"]
