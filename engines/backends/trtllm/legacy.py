"""The `trtllm-engine` backend: TensorRT-LLM's legacy TensorRT-engine flow, for TensorRT-LLM <= 1.2 containers.

TensorRT-LLM removed this flow (trtllm-build, convert_checkpoint.py, LLM(backend="tensorrt"), Triton's
inflight_batcher_llm backend) from its main branch; current releases load a Hugging Face or ModelOpt unified
checkpoint directly (the `trtllm` backend, engines/backends/trtllm/pytorch.py). Use this one only with an older
container that still builds engines.

Build exports the model to a TensorRT-LLM checkpoint with nvidia-modelopt (runs on CPU; FP8 / INT8 SmoothQuant /
INT4 AWQ calibrated on `calib_samples` x `calib_seq_len` tokens of `calib_dataset`), reads it back and compares its
logits with the source (engines/backends/trtllm/checkpoint.py), then compiles it with `trtllm-build` when
TensorRT-LLM and a CUDA GPU are here. Elsewhere (or with `checkpoint_only`) it stops after the checkpoint and
records the exact `trtllm-build` command to run inside the engine folder in the container; `load` picks up an
engine built that way and runs it through the LLM API (engines/backends/trtllm/shared.py).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core import procs
from compactlm.core.errors import CompactLMError
from compactlm.engines.backend import Backend
from compactlm.engines.backends.trtllm import shared
from compactlm.engines.backends.trtllm.shared import (
    VERIFY_MAX_PARAMS,
    TrtllmEngine,
    calibration_tokens,
    runtime_missing,
    tensorrt_llm_version,
    verification_tokens,
)
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Engine

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint

CHECKPOINT_DIR, ENGINE_DIR, BUILD_LOG = "checkpoint", "engine", "trtllm-build.log"
CONTAINER = "a TensorRT-LLM <= 1.2 container (nvcr.io/nvidia/tensorrt-llm/release:1.2.0 or older) on a GPU host"


class TrtllmEngineBackend(Backend):
    name = "trtllm-engine"
    precisions = ("fp16", "bf16", "fp8", "int8-sq", "int4-awq")
    default_precision = "fp16"
    description = (
        "legacy TensorRT-LLM engine (trtllm-build, TensorRT-LLM <= 1.2): FP16/BF16, FP8, INT8 SmoothQuant, INT4 AWQ; "
        "tensor parallel"
    )

    def check_quantized(self, fmt: str, config: BuildConfig) -> None:
        """A unified quantized checkpoint (compress quantize) holds quantized weights, not the fake-quant model the
        legacy exporter needs: this flow calibrates at build time from the unquantized parent instead."""
        raise CompactLMError(
            f"the checkpoint is a ModelOpt unified {fmt} checkpoint (compress quantize): current TensorRT-LLM loads it "
            f"as it is (--backend trtllm --precision {fmt}); the legacy trtllm-engine flow quantizes at build time: "
            f"build the unquantized parent with --backend trtllm-engine --precision {fmt}"
        )

    def check_available(self, config: BuildConfig) -> None:
        shared.require_modelopt("the trtllm-engine backend's checkpoint export")

    def check_model(self, model_config, config: BuildConfig) -> None:
        from compactlm.engines.backends.trtllm.checkpoint import DECODER_TYPES

        shared.check_family(model_config, tuple(DECODER_TYPES), "legacy TensorRT-LLM checkpoint export")
        shared.check_model(model_config, config)

    def build(self, checkpoint: Checkpoint, out: Path, config: BuildConfig) -> dict:
        from compactlm.compress.arch import count_params, shape_of
        from compactlm.compress.checkpoint import load_model
        from compactlm.engines.backends.trtllm.checkpoint import export_checkpoint

        model = load_model(checkpoint)
        params = count_params(shape_of(model.config))
        verify_tokens, verify_source = None, None
        if params <= VERIFY_MAX_PARAMS:
            verify_tokens, verify_source = verification_tokens(checkpoint, model.config, config)
        from compactlm.compress.quantize import quantized_modules
        from compactlm.engines.backends.trtllm.checkpoint import QUANTIZED

        calibration = None
        if config.precision in QUANTIZED and not quantized_modules(model):
            calibration = list(calibration_tokens(checkpoint, model.config, config).split(8))
        info = export_checkpoint(
            model,
            out / CHECKPOINT_DIR,
            precision=config.precision,
            tp_size=config.tp_size,
            calibration=calibration,
            verify_tokens=verify_tokens,
        )
        del model
        info["checkpoint_dir"] = CHECKPOINT_DIR
        if verify_tokens is None:
            info["verification"] = {"skipped": f"{params:,} parameters > {VERIFY_MAX_PARAMS:,} (memory for a copy)"}
        else:
            info["verification"]["tokens"] = verify_source
        command = trtllm_build_command(config)
        info["trtllm_build_command"] = shlex.join(command)
        missing = runtime_missing()
        if config.checkpoint_only or missing:
            reason = "checkpoint_only was asked" if config.checkpoint_only else missing
            info["engine_built"] = False
            info["engine_missing"] = reason
            info["notice"] = (
                f"TensorRT-LLM checkpoint only ({reason}): build the engine in {CONTAINER} with "
                f"`cd <engine folder> && {info['trtllm_build_command']}`"
            )
            return info
        info |= run_trtllm_build(out, command)
        return info

    def load(self, path: Path, manifest: Manifest) -> Engine:
        info = manifest.backend_info
        if not (path / ENGINE_DIR / "config.json").is_file():
            reason = info.get("engine_missing", "the engine was not built")
            command = info.get("trtllm_build_command", "trtllm-build ...")
            raise CompactLMError(
                f"{path} holds a TensorRT-LLM checkpoint but no engine ({reason}); build it in {CONTAINER}: "
                f"cd {shlex.quote(str(path))} && {command}"
            )
        missing = runtime_missing()
        if missing:
            raise CompactLMError(f"cannot run the TensorRT-LLM engine in {path}: {missing}; run it in {CONTAINER}")
        return TrtllmEngine(path, manifest, lambda: _open_llm(path / ENGINE_DIR, manifest.tp_size))


# -- build helpers


def trtllm_build_command(config: BuildConfig) -> list[str]:
    """trtllm-build's arguments, relative to the engine folder (tensor parallelism comes from the checkpoint's
    ranks; --workers builds them in parallel)."""
    limits = config.limits
    command = [
        "trtllm-build",
        "--checkpoint_dir", CHECKPOINT_DIR,
        "--output_dir", ENGINE_DIR,
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        "--max_num_tokens", str(limits.max_num_tokens),
        "--gemm_plugin", "auto",
    ]  # fmt: skip
    if config.tp_size > 1:
        command += ["--workers", str(config.tp_size)]
    return command


def run_trtllm_build(out: Path, command: list[str]) -> dict:
    """Run trtllm-build inside `out`, its output in trtllm-build.log; a failure quotes the log's tail."""
    exe = shutil.which("trtllm-build")
    argv = ([exe] if exe else [sys.executable, "-m", "tensorrt_llm.commands.build"]) + command[1:]
    log = out / BUILD_LOG
    with log.open("w") as handle:
        code = procs.run(argv, cwd=out, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise CompactLMError(f"trtllm-build failed (exit {code}); the end of {BUILD_LOG}:\n{tail}")
    return {
        "engine_built": True,
        "engine_dir": ENGINE_DIR,
        "build_log": BUILD_LOG,
        "tensorrt_llm": tensorrt_llm_version(),
    }


def _open_llm(engine_dir: Path, tp_size: int):
    try:
        from tensorrt_llm._tensorrt_engine import LLM  # 1.x: the TensorRT-engine LLM class
    except ImportError:
        from tensorrt_llm import LLM  # 0.x: the one LLM class runs TensorRT engines

    return LLM(model=str(engine_dir), skip_tokenizer_init=True, tensor_parallel_size=tp_size)
