"""The training options and the distillation objective: the one source of both. The retraining commands' flags,
a chain file's `distill:` and the job recipe's `correction:` and `distill:` sections are these fields, with these
defaults (tests/unit/compress/test_train_options.py). Free of torch, so that the CLI can build its options from
them without importing it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from compactlm.core.config import option
from compactlm.core.errors import CompactLMError

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
LOSSES = ("auto", "logit", "logit+hidden", "logit+hidden+embedding", "ce")
DEEP_CUT = 0.75
"""`auto` adds hidden and embedding losses when the student keeps at most this fraction of the layers."""
CACHE_FIELDS = ("tokens", "steps", "seq_len", "batch_size", "grad_accum", "seed")
"""The TrainConfig fields that decide which rows a run reads: all a teacher cache must share with its distillation."""


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train."""

    tokens: int | None = option(
        None, "Token budget; steps = tokens / (global batch x seq_len), rounded up (or --steps).", exclusive="length"
    )
    steps: int | None = option(None, "Optimizer steps (or --tokens).", exclusive="length")
    seq_len: int = option(256, "Tokens per training sequence.")
    batch_size: int = option(4, "Sequences per micro-batch, per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step, per process.")
    lr: float = option(1e-4, "Peak learning rate (the paper's).")
    min_lr: float = option(1e-5, "Learning rate at the end of the cosine decay (the paper's).")
    warmup_steps: int | None = option(None, "Linear warm-up steps (default: the paper's 40, or 10% of a shorter run).")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm (0 disables).")
    precision: str = option(
        "auto", "auto | fp32 | bf16 (autocast); auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32."
    )
    save_every: int = option(50, "Checkpoint every N optimizer steps (0: only on interrupt).")
    seed: int = option(0, "Seed of the data order and of every random draw.")
    parallel: str = option("ddp", "Under torchrun: ddp, or fsdp (CUDA only).")

    def __post_init__(self):
        if self.steps is not None and self.tokens is not None:
            raise CompactLMError("give one of --steps and --tokens, not both", key="steps")
        for name in ("steps", "tokens", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompactLMError(f"--{name.replace('_', '-')} must be at least 1, not {value}", key=name)
        if self.seq_len < 2:
            raise CompactLMError(f"--seq-len must be at least 2, not {self.seq_len}", key="seq_len")
        if not 0 < self.min_lr <= self.lr:
            raise CompactLMError(f"need 0 < --min-lr ({self.min_lr}) <= --lr ({self.lr})", key="min_lr")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise CompactLMError("--warmup-steps must be >= 0", key="warmup_steps")
        if self.precision not in PRECISIONS:
            raise CompactLMError(f"--precision must be one of {', '.join(PRECISIONS)}", key="precision")
        if self.parallel not in PARALLEL:
            raise CompactLMError(f"--parallel must be one of {', '.join(PARALLEL)}", key="parallel")
        if self.save_every < 0:
            raise CompactLMError("--save-every must be >= 0", key="save_every")

    @classmethod
    def of(cls, settings) -> TrainConfig:
        """The training options of any config that carries them (a recipe section, a chain stage)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def require_length(self) -> TrainConfig:
        if self.steps is None and self.tokens is None:
            raise CompactLMError("give a training length: --tokens N or --steps N (tokens: or steps: in a file)")
        return self

    def planned_tokens(self, world_size: int = 1) -> int:
        """The tokens a run of this config trains on (its token budget rounded up to whole steps)."""
        return self.total_steps(world_size=world_size) * self.global_batch(world_size) * self.seq_len

    def total_steps(self, seq_len: int | None = None, world_size: int = 1) -> int:
        self.require_length()
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.global_batch(world_size) * (seq_len or self.seq_len))))

    def global_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size

    def warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(40, max(1, total // 10))


@dataclass(frozen=True)
class DistillConfig:
    """What the student learns from (the objective; how long and how to train is TrainConfig). The default loss,
    logit, is the same everywhere: a teacher cache can serve it, and at CPU budgets the hidden-state loss measured
    no better (README, retraining)."""

    loss: str = option(
        "logit",
        "logit | logit+hidden | logit+hidden+embedding | ce | auto (the paper: logit only, plus hidden and embedding "
        "losses when depth was cut a lot).",
    )
    temperature: float = option(1.0, "Softmax temperature of the logit loss.")
    logit_weight: float = option(1.0, "Weight of the logit loss.")
    hidden_weight: float = option(1.0, "Weight of the hidden-state loss.")
    embedding_weight: float = option(1.0, "Weight of the embedding-output loss.")
    hidden_loss: str = option("cosine", "cosine | mse (normalized by the teacher's energy).")

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise CompactLMError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}", key="loss")
        if self.temperature <= 0:
            raise CompactLMError("--temperature must be positive", key="temperature")
        if self.hidden_loss not in ("cosine", "mse"):
            raise CompactLMError("--hidden-loss must be cosine or mse", key="hidden_loss")
        for name in ("logit_weight", "hidden_weight", "embedding_weight"):
            if getattr(self, name) < 0:
                raise CompactLMError("loss weights must be >= 0", key=name)

    @classmethod
    def of(cls, settings) -> DistillConfig:
        """The objective of any config that carries its fields (a recipe section, a chain stage)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def resolved_loss(self, student_layers: int, teacher_layers: int) -> str:
        if self.loss != "auto":
            return self.loss
        return "logit+hidden+embedding" if student_layers <= DEEP_CUT * teacher_layers else "logit"


@dataclass(frozen=True)
class DistillRun(TrainConfig, DistillConfig):
    """A distillation run's settings as files write them, flat: the training options (TrainConfig) and the
    objective (DistillConfig), every field with its one default."""

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        DistillConfig.__post_init__(self)

    @property
    def train(self) -> TrainConfig:
        return TrainConfig.of(self)

    @property
    def objective(self) -> DistillConfig:
        return DistillConfig.of(self)
