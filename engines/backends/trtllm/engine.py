"""The `trtllm` backend: TensorRT-LLM engines in FP16/BF16 or FP8, tensor-parallel over `tp_size` GPUs.

Build exports the model to a TensorRT-LLM checkpoint with nvidia-modelopt (runs on CPU; FP8 is calibrated on
`calib_samples` x `calib_seq_len` tokens of `calib_dataset`), reads it back and compares its logits with the
source (see engines/backends/trtllm/checkpoint.py), then compiles it with `trtllm-build` when TensorRT-LLM and a
CUDA GPU are here. Elsewhere (or with `checkpoint_only`) it stops after the checkpoint and records the exact
`trtllm-build` command to run inside the engine folder in NVIDIA's TensorRT-LLM container; `load` picks up an
engine built that way.

Run: TensorRT-LLM's LLM API over the built engine (in-flight batching in its C++ executor), each request
streamed step by step into its RequestStream from one asyncio loop in the worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core import procs
from compactlm.core.errors import CompactLMError
from compactlm.engines.backend import Backend
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Engine, RequestStream

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint

CHECKPOINT_DIR, ENGINE_DIR, BUILD_LOG = "checkpoint", "engine", "trtllm-build.log"
VERIFY_MAX_PARAMS = 1_500_000_000
"""The round-trip check holds a second fp32 copy of the model in memory: skipped above this size."""
VERIFY_SEQUENCES, VERIFY_MAX_LEN = 2, 128
CONTAINER = "NVIDIA's TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release) on a GPU host"


class TrtllmBackend(Backend):
    name = "trtllm"
    precisions = ("fp16", "bf16", "fp8", "int8-sq", "int4-awq")
    default_precision = "fp16"
    description = (
        "TensorRT-LLM engine (FP16/BF16, FP8, INT8 SmoothQuant, INT4 AWQ; tensor parallel), in-flight batching on "
        "NVIDIA GPUs"
    )

    def check_quantized(self, fmt: str, config: BuildConfig) -> None:
        """A checkpoint from `compress quantize` keeps its calibrated scales: build it at its own format."""
        if config.precision != fmt:
            raise CompactLMError(
                f"the checkpoint is quantized as {fmt} (compress quantize): build it with --precision {fmt}, "
                f"not {config.precision}"
            )

    def check_available(self, config: BuildConfig) -> None:
        if not _importable("modelopt"):
            raise CompactLMError(
                "the trtllm backend exports checkpoints with nvidia-modelopt, which is not installed: "
                "pip install nvidia-modelopt==0.47.0 requests huggingface_hub"
            )

    def check_model(self, model_config, config: BuildConfig) -> None:
        from compactlm.compress.arch import family_of, shape_of
        from compactlm.engines.backends.trtllm.checkpoint import rope_settings

        family, shape, tp = family_of(model_config), shape_of(model_config), config.tp_size
        if shape.num_attention_heads % tp:
            raise CompactLMError(
                f"tp_size {tp} does not divide the model's {shape.num_attention_heads} attention heads"
            )
        kv = shape.num_query_groups
        if kv % tp and tp % kv:
            raise CompactLMError(
                f"tp_size {tp} and the model's {kv} KV heads do not fit: one must divide the other "
                "(TensorRT-LLM splits KV heads across ranks, or copies each to tp/kv ranks)"
            )
        if shape.ffn_hidden_size % tp:
            raise CompactLMError(f"tp_size {tp} does not divide the MLP width {shape.ffn_hidden_size}")
        if family.model_type == "qwen3" and shape.o_bias:
            raise CompactLMError("TensorRT-LLM's Qwen attention has no output-projection bias (Qwen3 attention_bias)")
        rope_settings(model_config)
        window = _sliding_window(model_config)
        if window and window < config.limits.max_seq_len:
            raise CompactLMError(
                f"the model attends within a sliding window of {window} tokens, shorter than max_seq_len "
                f"{config.limits.max_seq_len}; the trtllm backend builds full-attention engines only: "
                f"use --max-seq-len {window} or less"
            )
        if config.precision == "fp8":
            widths = {"hidden size": shape.hidden_size, "MLP width per rank": shape.ffn_hidden_size // tp}
            for what, width in widths.items():
                if width % 16:
                    raise CompactLMError(f"FP8 GEMMs need multiples of 16; the model's {what} is {width}")

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
        return TrtllmEngine(path, manifest)


# -- build helpers


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_missing() -> str | None:
    """What stops TensorRT-LLM from building or running here (None when it can)."""
    if not _importable("tensorrt_llm"):
        return "tensorrt_llm is not importable"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _sliding_window(model_config) -> int | None:
    window = getattr(model_config, "sliding_window", None)
    if model_config.model_type in ("qwen2", "qwen3") and not getattr(model_config, "use_sliding_window", False):
        return None
    return int(window) if window else None


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
    from importlib import metadata

    try:
        version = metadata.version("tensorrt-llm")
    except metadata.PackageNotFoundError:
        version = None
    return {"engine_built": True, "engine_dir": ENGINE_DIR, "build_log": BUILD_LOG, "tensorrt_llm": version}


def _tokenizer(checkpoint: Checkpoint):
    from compactlm.compress.checkpoint import load_tokenizer

    return load_tokenizer(checkpoint)


def calibration_tokens(checkpoint: Checkpoint, model_config, config: BuildConfig):
    """FP8 calibration rows: calib_samples x calib_seq_len tokens of calib_dataset's train split."""
    from compactlm.compress.data import load_sequences

    try:
        tokenizer = _tokenizer(checkpoint)
    except CompactLMError as exc:
        raise CompactLMError(f"FP8 calibration reads text through the checkpoint's tokenizer: {exc}") from exc
    seq_len = min(config.calib_seq_len, int(getattr(model_config, "max_position_embeddings", None) or 1 << 30))
    return load_sequences(
        config.calib_dataset, tokenizer, num_sequences=config.calib_samples, seq_len=seq_len, split="train"
    )


def verification_tokens(checkpoint: Checkpoint, model_config, config: BuildConfig):
    """(tokens, where they came from) for the round-trip check: held-out text of calib_dataset when the
    checkpoint has a tokenizer and the data is there, else seeded random tokens (said so in the manifest)."""
    import torch

    from compactlm.compress.data import load_sequences

    max_pos = int(getattr(model_config, "max_position_embeddings", None) or VERIFY_MAX_LEN)
    length = min(VERIFY_MAX_LEN, config.calib_seq_len, max_pos)
    try:
        tokens = load_sequences(
            config.calib_dataset,
            _tokenizer(checkpoint),
            num_sequences=VERIFY_SEQUENCES,
            seq_len=length,
            split="heldout",
            allow_fewer=True,
        )
        return tokens, f"{config.calib_dataset} (held-out split)"
    except CompactLMError:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model_config.vocab_size, (VERIFY_SEQUENCES, length), generator=generator)
        return tokens, "random tokens (no tokenizer or no held-out text)"


# -- run


def _open_llm(engine_dir: Path, tp_size: int):
    try:
        from tensorrt_llm._tensorrt_engine import LLM  # 1.x: the TensorRT-engine LLM class
    except ImportError:
        from tensorrt_llm import LLM  # 0.x: the one LLM class runs TensorRT engines

    return LLM(model=str(engine_dir), skip_tokenizer_init=True, tensor_parallel_size=tp_size)


class TrtllmEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest):
        super().__init__(path, manifest)
        self._llm = _open_llm(path / ENGINE_DIR, manifest.tp_size)

    def _sampling(self, stream: RequestStream):
        from tensorrt_llm import SamplingParams

        request, eos = stream.request, list(self.eos_token_ids)
        # Greedy. ignore_eos: TensorRT-LLM then runs with end_id -1 and generates exactly max_tokens.
        return SamplingParams(
            max_tokens=request.max_new_tokens,
            end_id=eos[0] if eos else -1,
            pad_id=eos[0] if eos else 0,
            stop_token_ids=None if request.ignore_eos or len(eos) < 2 else eos[1:],
            ignore_eos=request.ignore_eos,
            top_k=1,
            detokenize=False,
        )

    def _serve(self) -> None:
        # The LLM API streams a result through an asyncio queue when it is created inside a running loop: run
        # one loop in a daemon thread, start each request there, and keep this worker on the (blocking) inbox.
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"{self.name}-loop", daemon=True)
        thread.start()
        inflight: list[tuple[concurrent.futures.Future, RequestStream]] = []
        try:
            while not self._closed.is_set():
                for stream in self._drain(block=True):
                    inflight.append((asyncio.run_coroutine_threadsafe(self._generate(stream), loop), stream))
                inflight = [(future, stream) for future, stream in inflight if not stream.done]
        finally:
            for future, _ in inflight:
                future.cancel()  # the request's task aborts it and finishes its stream "cancelled"
            deadline = time.monotonic() + 10
            while any(not stream.done for _, stream in inflight) and time.monotonic() < deadline:
                time.sleep(0.01)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            for _, stream in inflight:
                stream.finish("cancelled")

    async def _generate(self, stream: RequestStream) -> None:
        result = None
        try:
            # one response per engine step
            result = self._llm.generate_async(
                list(stream.request.prompt), sampling_params=self._sampling(stream), streaming=True
            )
            output = None
            async for step in result:
                output = step.outputs[0]
                stream.push(output.token_ids_diff)
            stream.finish("stop" if output is not None and output.finish_reason == "stop" else "length")
        except asyncio.CancelledError:
            if result is not None:
                with contextlib.suppress(Exception):  # the executor may already be shutting down
                    result.abort()
            stream.finish("cancelled")
        except Exception as exc:  # one failed request fails alone
            stream.finish("error", f"{type(exc).__name__}: {exc}")

    def _release(self) -> None:
        self._llm.shutdown()
