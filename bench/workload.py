"""Benchmark workloads: requests with exact input and output lengths, from random token ids or real text.

Lengths are fixed, or drawn from a normal distribution (trtllm-bench's `prepare_dataset token-norm-dist`) and
clipped to mean +- 4 sd (the headroom `Sweep.limits()` sizes engines for). Every request of a workload has a
prompt of its own, so a prefix cache never turns a benchmark into a cache benchmark.

Saved as JSONL in the shape trtllm-bench reads: one `{"task_id": i, "input_ids": [...], "output_tokens": n}` a line.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compactlm.core.errors import CompactLMError

STDEV_HEADROOM = 4
"""Lengths drawn from N(mean, sd) are clipped to mean +- 4 sd."""
RANDOM = "random"


@dataclass(frozen=True)
class WorkloadItem:
    """One benchmark request: its prompt and how many tokens it must produce (ignore_eos)."""

    task_id: int
    input_ids: tuple[int, ...]
    output_tokens: int

    @property
    def input_len(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class WorkloadSpec:
    """How to make the requests of one shape."""

    input_len: int
    output_len: int
    input_stdev: float = 0.0
    output_stdev: float = 0.0
    source: str = RANDOM
    """`random` token ids, a bundled corpus (python-docs, linux-docs) or a text/JSONL file (needs a tokenizer)."""
    seed: int = 0

    def __post_init__(self):
        if self.input_len < 1 or self.output_len < 1:
            raise CompactLMError(f"input and output lengths must be >= 1, got {self.input_len}/{self.output_len}")
        if self.input_stdev < 0 or self.output_stdev < 0:
            raise CompactLMError("length stdevs must be >= 0")

    def max_lengths(self) -> tuple[int, int]:
        """The longest input and the longest output any request can get (after clipping)."""
        return (
            _clip_bounds(self.input_len, self.input_stdev)[1],
            _clip_bounds(self.output_len, self.output_stdev)[1],
        )


class Workload:
    """An endless, reproducible supply of fresh requests of one spec: `take(n)` continues where the last left off.

    vocab_size: the id range for random prompts; tokenizer: for text sources; exclude: ids never drawn (EOS).
    """

    def __init__(self, spec: WorkloadSpec, vocab_size: int | None = None, tokenizer=None, exclude: Sequence[int] = ()):
        self.spec = spec
        self._rng = np.random.default_rng(spec.seed)
        self._next_id = 0
        if spec.source == RANDOM:
            if not vocab_size or vocab_size < 2:
                raise CompactLMError("random prompts need the vocabulary size (give --vocab-size or --tokenizer)")
            allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(exclude), dtype=np.int64))
            if allowed.size == 0:
                raise CompactLMError("no token id is left to draw random prompts from")
            self._allowed = allowed
            self._text = None
        else:
            if tokenizer is None:
                raise CompactLMError(
                    f"prompts from {spec.source!r} need a tokenizer: the engine ships none, give --tokenizer"
                )
            self._text = _corpus_tokens(spec.source, tokenizer, spec.seed)

    def max_lengths(self) -> tuple[int, int]:
        return self.spec.max_lengths()

    def take(self, n: int) -> list[WorkloadItem]:
        spec = self.spec
        inputs = _lengths(self._rng, spec.input_len, spec.input_stdev, n)
        outputs = _lengths(self._rng, spec.output_len, spec.output_stdev, n)
        items = []
        for isl, osl in zip(inputs, outputs, strict=True):
            if self._text is None:
                ids = self._allowed[self._rng.integers(0, self._allowed.size, isl)].tolist()
            else:
                ids = list(itertools.islice(self._text, isl))
                if len(ids) < isl:
                    raise CompactLMError(f"{spec.source!r} ran out of text after {self._next_id} prompts")
            items.append(WorkloadItem(self._next_id, tuple(ids), int(osl)))
            self._next_id += 1
        return items

    def __iter__(self) -> Iterator[WorkloadItem]:
        while True:
            yield from self.take(64)


def _clip_bounds(mean: int, stdev: float) -> tuple[int, int]:
    spread = int(np.ceil(STDEV_HEADROOM * stdev))
    return max(1, mean - spread), mean + spread


def _lengths(rng: np.random.Generator, mean: int, stdev: float, n: int) -> list[int]:
    if stdev == 0:
        return [mean] * n
    low, high = _clip_bounds(mean, stdev)
    return np.clip(np.rint(rng.normal(mean, stdev, n)), low, high).astype(int).tolist()


def _corpus_tokens(source: str, tokenizer, seed: int) -> Iterator[int]:
    """One long token stream of the source's documents (train split, EOS between them), read lazily."""
    from compactlm.compress.data import iter_token_stream, split_documents

    docs = split_documents(source, "train", seed)
    if not docs:
        raise CompactLMError(f"{source!r} has no documents")
    return itertools.chain.from_iterable(iter_token_stream(docs, tokenizer))


def save_jsonl(items: Sequence[WorkloadItem], path: str | os.PathLike) -> Path:
    """Write a workload in trtllm-bench's dataset shape (one JSON object a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for item in items:
            record = {"task_id": item.task_id, "input_ids": list(item.input_ids), "output_tokens": item.output_tokens}
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def load_jsonl(path: str | os.PathLike, tokenizer=None) -> list[WorkloadItem]:
    """Read a trtllm-bench dataset: `input_ids` (or `prompt` text, with a tokenizer) and `output_tokens` a line.

    tokenizer: a tokenizer, or a function returning one (called only when a line has a text prompt).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CompactLMError(f"dataset {path} does not exist")
    from compactlm.compress.data import check_text

    check_text(path)
    items = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompactLMError(f"{where} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise CompactLMError(f"{where} must be a JSON object")
            ids = record.get("input_ids")
            if ids is None and isinstance(record.get("prompt"), str):
                if tokenizer is None:
                    raise CompactLMError(f"{where} has a text prompt: give a tokenizer to read it")
                if not hasattr(tokenizer, "encode"):  # a function that returns the tokenizer
                    tokenizer = tokenizer()
                    if tokenizer is None:
                        raise CompactLMError(f"{where} has a text prompt: give a tokenizer to read it")
                ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise CompactLMError(f"{where}: field 'input_ids' must be a non-empty list of token ids")
            out = record.get("output_tokens")
            if isinstance(out, bool) or not isinstance(out, int) or out < 1:
                raise CompactLMError(f"{where}: field 'output_tokens' must be a positive integer, got {out!r}")
            items.append(WorkloadItem(int(record.get("task_id", len(items))), tuple(ids), out))
    if not items:
        raise CompactLMError(f"dataset {path} has no requests")
    return items


class DatasetWorkload:
    """A saved dataset as a workload: `take(n)` hands out its requests in order, and refuses to run past the end."""

    def __init__(self, items: Sequence[WorkloadItem], source: str):
        self.items = list(items)
        self._next = 0
        inputs = [i.input_len for i in self.items]
        outputs = [i.output_tokens for i in self.items]
        self.spec = WorkloadSpec(
            round(float(np.mean(inputs))),
            round(float(np.mean(outputs))),
            float(np.std(inputs)),
            float(np.std(outputs)),
            source=source,
        )
        self.max_input = max(inputs)
        self.max_output = max(outputs)

    def take(self, n: int) -> list[WorkloadItem]:
        if self._next + n > len(self.items):
            raise CompactLMError(
                f"dataset {self.spec.source} has {len(self.items)} requests; this run needs more "
                "(lower --requests / --warmup / --repeats, or make a larger dataset)"
            )
        items = self.items[self._next : self._next + n]
        self._next += n
        return items

    def max_lengths(self) -> tuple[int, int]:
        return self.max_input, self.max_output

    def __iter__(self) -> Iterator[WorkloadItem]:
        while self._next < len(self.items):
            yield from self.take(1)
