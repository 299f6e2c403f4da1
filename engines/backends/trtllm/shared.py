"""What both TensorRT-LLM flows share: the model checks run before any work (tensor parallelism, RoPE, sliding
window, FP8 widths), the calibration and verification text, whether TensorRT-LLM and a GPU are here, and the
runtime: TensorRT-LLM's LLM API, each request streamed step by step into its RequestStream from one asyncio loop.

Nothing here imports tensorrt_llm or modelopt at module level.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Engine, RequestStream

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint

VERIFY_MAX_PARAMS = 1_500_000_000
"""The round-trip check holds a second fp32 copy of the model in memory: skipped above this size."""
VERIFY_SEQUENCES, VERIFY_MAX_LEN = 2, 128
MODELOPT_PIN = "nvidia-modelopt==0.47.0"


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_modelopt(what: str) -> None:
    if not importable("modelopt"):
        raise CompactLMError(f"{what} needs nvidia-modelopt, which is not installed: pip install {MODELOPT_PIN}")


def runtime_missing() -> str | None:
    """What stops TensorRT-LLM from running here (None when it can)."""
    if not importable("tensorrt_llm"):
        return "tensorrt_llm is not importable"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def sliding_window(model_config) -> int | None:
    window = getattr(model_config, "sliding_window", None)
    if model_config.model_type in ("qwen2", "qwen3") and not getattr(model_config, "use_sliding_window", False):
        return None
    return int(window) if window else None


PYTORCH_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "gemma3_text", "mixtral", "qwen3_moe")
"""The families compactlm prunes whose HF architecture the current (PyTorch-backend) TensorRT-LLM lists among its
supported models (LlamaForCausalLM, MistralForCausalLM, Qwen2/Qwen3ForCausalLM, GraniteForCausalLM,
Phi3ForCausalLM, Gemma3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM); Gemma 2, OLMo 2 and Qwen2-MoE are
not on that list."""


def check_family(model_config, supported: tuple[str, ...], flow: str) -> None:
    """One line naming the families a TensorRT-LLM flow takes, for a model of another family."""
    from compactlm.compress.arch import family_of

    family = family_of(model_config).model_type
    if family not in supported:
        raise CompactLMError(
            f"the {flow} does not run {family} models; it takes {', '.join(supported)} (serve {family} on the "
            f"cpu or torch backend)"
        )


def check_model(model_config, config: BuildConfig, fp8_precisions=("fp8",)) -> None:
    """Refuse, before any work, a model TensorRT-LLM cannot run at these settings: tensor parallelism that does not
    split the heads or the MLP, an unsupported RoPE, a sliding window shorter than the engine's sequences, FP8
    GEMMs on widths that are not multiples of 16."""
    from compactlm.compress.arch import family_of, shape_of
    from compactlm.engines.backends.trtllm.checkpoint import rope_settings

    family, shape, tp = family_of(model_config), shape_of(model_config), config.tp_size
    if shape.num_attention_heads % tp:
        raise CompactLMError(f"tp_size {tp} does not divide the model's {shape.num_attention_heads} attention heads")
    kv = shape.num_query_groups
    if kv % tp and tp % kv:
        raise CompactLMError(
            f"tp_size {tp} and the model's {kv} KV heads do not fit: one must divide the other "
            "(TensorRT-LLM splits KV heads across ranks, or copies each to tp/kv ranks)"
        )
    if shape.ffn_hidden_size % tp:
        raise CompactLMError(f"tp_size {tp} does not divide the MLP width {shape.ffn_hidden_size}")
    if shape.moe_ffn_hidden_size % tp:
        raise CompactLMError(f"tp_size {tp} does not divide the experts' FFN width {shape.moe_ffn_hidden_size}")
    if family.model_type == "qwen3" and shape.o_bias:
        raise CompactLMError("TensorRT-LLM's Qwen attention has no output-projection bias (Qwen3 attention_bias)")
    rope_settings(model_config)
    window = sliding_window(model_config)
    if window and window < config.limits.max_seq_len:
        raise CompactLMError(
            f"the model attends within a sliding window of {window} tokens, shorter than max_seq_len "
            f"{config.limits.max_seq_len}; the trtllm backends serve full attention only: "
            f"use --max-seq-len {window} or less"
        )
    if config.precision in fp8_precisions:
        widths = {
            "hidden size": shape.hidden_size,
            "MLP width per rank": shape.ffn_hidden_size // tp,
            "expert FFN width per rank": shape.moe_ffn_hidden_size // tp,
        }
        for what, width in widths.items():
            if width % 16:
                raise CompactLMError(f"FP8 GEMMs need multiples of 16; the model's {what} is {width}")


def tokenizer_of(checkpoint: Checkpoint):
    from compactlm.compress.checkpoint import load_tokenizer

    return load_tokenizer(checkpoint)


def calibration_tokens(checkpoint: Checkpoint, model_config, config: BuildConfig):
    """Calibration rows: calib_samples x calib_seq_len tokens of calib_dataset's train split."""
    from compactlm.compress.data import load_sequences

    try:
        tokenizer = tokenizer_of(checkpoint)
    except CompactLMError as exc:
        raise CompactLMError(f"calibration reads text through the checkpoint's tokenizer: {exc}") from exc
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
            tokenizer_of(checkpoint),
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


def tensorrt_llm_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("tensorrt-llm")
    except metadata.PackageNotFoundError:
        return None


class TrtllmEngine(Engine):
    """TensorRT-LLM's LLM API behind the engine interface (in-flight batching in its executor). `open_llm()`
    returns the LLM object: over a built engine (legacy) or over a checkpoint with LLM arguments (current)."""

    def __init__(self, path: Path, manifest: Manifest, open_llm: Callable[[], object]):
        super().__init__(path, manifest)
        self._llm = open_llm()

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
            # one response per engine step; push() stamps each step's tokens with the time they arrived
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
