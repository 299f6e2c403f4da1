"""The target interface: `submit(item)` returns at once with a `Pending`; a request never raises, it fails."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from compactlm.bench.metrics import RequestRecord
from compactlm.bench.workload import WorkloadItem

# The Triton protocol (serve/protocol.py, what `compactlm serve` speaks): tensor names, the served model's name.
from compactlm.serve.protocol import (  # noqa: F401 - re-exported for the targets
    TRITON_FINAL,
    TRITON_IGNORE_EOS,
    TRITON_INPUT_IDS,
    TRITON_MAX_TOKENS,
    TRITON_MODEL,
    TRITON_OUTPUT_IDS,
)


class Pending(ABC):
    @abstractmethod
    def result(self, timeout: float | None = None) -> RequestRecord:
        """Wait for the request to end; a request past `timeout` seconds is a failed record."""


class Done(Pending):
    def __init__(self, record: RequestRecord):
        self.record = record

    def result(self, timeout: float | None = None) -> RequestRecord:
        return self.record


def failed(item: WorkloadItem, submitted: float, error: str, times: list[float] | None = None) -> RequestRecord:
    return RequestRecord(
        item.task_id, item.input_len, item.output_tokens, submitted, list(times or []), time.perf_counter(), error
    )


class Target(ABC):
    """Something that generates: `submit` is thread-safe and returns at once."""

    kind: str = "target"

    limits = None
    """compactlm.engines.config.Limits when known (in-process engines): shapes beyond them are refused before a run."""
    vocab_size: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, name: str):
        self.name = name

    @property
    def tokenizer(self):
        """A Hugging Face tokenizer for text workloads, or None."""
        return None

    @abstractmethod
    def submit(self, item: WorkloadItem) -> Pending: ...

    def describe(self) -> dict:
        """Columns for the results table: what was measured (backend, precision, model, source...)."""
        return {"target": self.name, "target_kind": self.kind}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
