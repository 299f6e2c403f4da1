"""What an engine is built for: its limits (the shapes it accepts) and the build settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class Limits:
    """The largest shapes an engine accepts. A request beyond them is refused before it runs, never at serve time.

    max_num_tokens is the token budget of one engine step (prompt chunks and decode tokens together): the
    scheduler's batched-token limit on the CPU engine, trtllm-build's --max_num_tokens on TensorRT-LLM.
    """

    max_batch_size: int = 32
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 2048

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CompactLMError(f"{name} must be a positive integer, got {value!r}")
        if self.max_input_len >= self.max_seq_len:
            raise CompactLMError(
                f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}): "
                "a sequence is the prompt plus at least one new token"
            )

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a request that does not fit, with the limit it breaks and how to rebuild."""
        if prompt_len < 1:
            raise CompactLMError("a prompt needs at least one token")
        if max_new_tokens < 1:
            raise CompactLMError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_len > self.max_input_len:
            raise CompactLMError(
                f"prompt of {prompt_len} tokens is longer than the engine's max_input_len {self.max_input_len}; "
                "rebuild the engine with a larger --max-input-len"
            )
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise CompactLMError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} tokens "
                f"exceeds the engine's max_seq_len {self.max_seq_len}; rebuild with a larger --max-seq-len"
            )

    def check_shape(self, input_len: int, output_len: int, batch_size: int) -> None:
        """Refuse a benchmark shape (ISL, OSL, batch) that the engine was not built for."""
        self.check_request(input_len, output_len)
        if batch_size > self.max_batch_size:
            raise CompactLMError(
                f"batch size {batch_size} exceeds the engine's max_batch_size {self.max_batch_size}; "
                "rebuild with a larger --max-batch-size (or --for-sweep with the sweep file)"
            )

    def with_step_budget(self, tokens: int) -> Limits:
        """These limits with another step budget (`max_num_tokens`), as a server may set it at load: a smaller one
        splits prompts that arrive together over more steps (earlier first tokens, smaller steps), a larger one
        prefills them in fewer. It must hold one decode token of every sequence of a full batch."""
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < self.max_batch_size:
            raise CompactLMError(
                f"a step budget must be an integer of at least the engine's max_batch_size ({self.max_batch_size}: "
                f"one decode token per sequence), got {tokens!r}"
            )
        return dataclasses.replace(self, max_num_tokens=tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Limits:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


MAX_DRAFT_TOKENS = 16
DEFAULT_DRAFT_TOKENS = 3
"""Tokens a draft proposes per step unless told: the best of 2/3/4 on SmolLM2's students (bench/perf/spec_decode)."""


def check_draft_tokens(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise CompactLMError(f"draft tokens must be an integer in 1..{MAX_DRAFT_TOKENS}, got {value!r}")


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one engine build. `precision=None` takes the backend's default."""

    backend: str = "cpu"
    precision: str | None = None
    limits: Limits = field(default_factory=Limits)
    tp_size: int = 1
    checkpoint_only: bool = False
    """trtllm-engine (legacy): produce and verify the TensorRT-LLM checkpoint, skip trtllm-build."""
    calib_dataset: str = "python-docs"
    calib_samples: int = 32
    calib_seq_len: int = 256
    """Calibration data for precisions that need activation statistics (FP8 scales)."""
    bench_shapes: tuple[tuple[int, int], ...] = ()
    bench_batches: tuple[int, ...] = ()
    """trtllm: the (ISL, OSL) shapes and batch sizes the engine is sized for (a sweep's, with --for-sweep), for the
    trtllm-bench command lines; empty: one shape that fits the limits, at the largest batch."""
    draft: str | None = None
    """cpu: a checkpoint (path or bundled name) of a smaller model with the same vocabulary, built beside the engine
    as its speculative-decoding draft (OpenVINO GenAI proposes `draft_tokens` tokens with it, the model verifies)."""
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    """Tokens the draft proposes per step (OpenVINO GenAI's num_assistant_tokens)."""
    fuse_qkv: bool | None = None
    """cpu: one q/k/v matmul per layer instead of three (exact). None: where it measured faster (int8/int4
    weights); True/False force it (False keeps the stock export, which benchmarks compare against)."""

    def __post_init__(self):
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise CompactLMError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        for isl, osl in self.bench_shapes:
            self.limits.check_request(isl, osl)
        if any(b < 1 or b > self.limits.max_batch_size for b in self.bench_batches):
            raise CompactLMError(f"bench batch sizes {self.bench_batches} must lie in 1..{self.limits.max_batch_size}")
        check_draft_tokens(self.draft_tokens)
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise CompactLMError("calibration needs at least 1 sample of at least 2 tokens")
