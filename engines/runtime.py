"""One runtime interface for every engine: what the benchmark and the server both drive.

`engine.submit(Request)` is thread-safe and returns at once with a `RequestStream`; a worker thread owned by
the engine schedules requests (each backend its own way: continuous batching on the CPU engine, static batches
of `generate` on torch) and pushes the new tokens of each request with the time they were read. Iterate a
stream for `(tokens, time)` chunks as they come, or call `.result()` for the whole `Completion`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.engines.manifest import Manifest

_ids = itertools.count()


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool = True
    """Generate exactly max_new_tokens (benchmarks); False stops at the model's end-of-sequence token."""
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))


class TokenTiming:
    """Latencies from `submitted` and `token_times` (perf_counter seconds): engine completions and bench records."""

    submitted: float
    token_times: list[float]

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.submitted if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.submitted if self.token_times else None

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive tokens (0 for tokens that arrived in one chunk)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class Completion(TokenTiming):
    request_id: int
    prompt_len: int
    tokens: list[int]
    token_times: list[float]
    """time.perf_counter() at which each token was read from the engine (tokens of one step share a time)."""
    submitted: float
    finish_reason: str
    """"length", "stop" (end-of-sequence), "cancelled" or "error"."""
    error: str | None = None


_END = object()


class RequestStream:
    """The tokens of one request as the engine produces them. Written by the engine's worker, read by anyone."""

    def __init__(self, request: Request):
        self.request = request
        self.submitted = time.perf_counter()
        self.tokens: list[int] = []
        self.token_times: list[float] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._taken_all = False

    # -- the engine's side
    def push(self, tokens: Sequence[int], at: float | None = None) -> None:
        if not tokens:
            return
        at = time.perf_counter() if at is None else at
        tokens = [int(t) for t in tokens]
        self.tokens.extend(tokens)
        self.token_times.extend([at] * len(tokens))
        self._events.put((tokens, at))

    def finish(self, reason: str, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._events.put(_END)

    # -- the caller's side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[tuple[list[int], float]]:
        while True:
            item = self._events.get()
            if item is _END:
                return
            yield item

    def take(self, block: bool = True) -> list[int] | None:
        """Every token that arrived since the last call (waiting for the first one if `block`, else possibly
        none); None once the stream has ended. A slow reader (a server under load) gets fewer, larger chunks
        instead of a growing backlog. Use either this or iteration on one stream, not both."""
        if self._taken_all:
            return None
        tokens: list[int] = []
        try:
            item = self._events.get(block=block)
        except queue.Empty:
            return tokens
        while True:
            if item is _END:
                self._taken_all = True
                return tokens or None
            tokens.extend(item[0])
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return tokens

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.id} did not finish within {timeout} s")
        return Completion(
            request_id=self.request.id,
            prompt_len=len(self.request.prompt),
            tokens=list(self.tokens),
            token_times=list(self.token_times),
            submitted=self.submitted,
            finish_reason=self.finish_reason or "error",
            error=self.error,
        )


class Engine(ABC):
    """A loaded engine. Subclasses implement `_serve`: the worker loop that takes requests from `self._inbox`."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self.limits = manifest.limits
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._tokenizer = None
        self._failed: str | None = None
        self._inflight: list[RequestStream] = []

    @property
    def name(self) -> str:
        return f"{self.manifest.backend}/{self.manifest.precision}"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest.backend_info.get("eos_token_ids", ()))

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer shipped inside the engine folder."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            folder = self.path / "tokenizer"
            if not folder.is_dir():
                raise CompactLMError(f"{self.path} has no tokenizer: the source checkpoint shipped none")
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
        return self._tokenizer

    def submit(self, request: Request) -> RequestStream:
        """Queue one request; refuse it at once (CompactLMError) if it breaks the engine's limits."""
        if self._closed.is_set():
            raise CompactLMError("the engine is closed")
        if self._failed:
            raise CompactLMError(f"the engine stopped after an error: {self._failed}")
        self.limits.check_request(len(request.prompt), request.max_new_tokens)
        vocab = self.manifest.model.get("vocab_size")
        if vocab and request.prompt and not 0 <= min(request.prompt) <= max(request.prompt) < vocab:
            bad = next(t for t in request.prompt if not 0 <= t < vocab)
            raise CompactLMError(f"token id {bad} is outside the model's vocabulary (0 to {vocab - 1})")
        stream = RequestStream(request)
        self._ensure_worker()
        self._inbox.put(stream)
        return stream

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, ignore_eos: bool = False
    ) -> list[Completion]:
        """Submit all prompts at once and wait for them all (the engine batches up to its limit)."""
        streams = [self.submit(Request(tuple(p), max_new_tokens, ignore_eos)) for p in prompts]
        return [s.result() for s in streams]

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(None)  # wake the worker
        if self._worker is not None:
            self._worker.join(timeout=60)
        self._release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses
    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the worker must never die silently: fail what is queued
            message = f"{type(exc).__name__}: {exc}"
            self._failed = message
            for stream in self._inflight + self._drain(block=False):
                stream.finish("error", message)  # a no-op for those already finished
            raise

    def _drain(self, block: bool, limit: int | None = None) -> list[RequestStream]:
        """Queued requests: wait for the first one if `block`, then take what is there (at most `limit`)."""
        taken: list[RequestStream] = []
        while limit is None or len(taken) < limit:
            try:
                item = self._inbox.get(block=block and not taken and not self._closed.is_set())
            except queue.Empty:
                break
            if item is None:
                if self._closed.is_set():
                    break
                continue
            taken.append(item)
        if taken:
            self._inflight = [s for s in self._inflight if not s.done] + taken
        return taken

    @abstractmethod
    def _serve(self) -> None:
        """Run until `self._closed` is set: take streams from the inbox, generate, push tokens, finish them."""

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Free the backend's resources after the worker stopped."""
