"""One runtime interface for every engine: what the benchmark and the server both drive.

`engine.submit(Request)` is thread-safe and returns at once with a `RequestStream`; a worker thread owned by
the engine schedules requests (each backend its own way: continuous batching on the CPU engine, static batches
of `generate` on torch) and pushes the new tokens of each request with the time they were read. Iterate a
stream for `(tokens, time)` chunks as they come, or call `.result()` for the whole `Completion`;
`stream.cancel()` asks the engine to stop a request at its next step (a client that left).

A request decodes greedily unless it carries a `Sampling`; it can ask for at least `min_new_tokens` (no
end-of-sequence before), extra stop token ids, and the log-probabilities of its tokens (`logprobs`: 0 for the
chosen token's, k for the k most likely too, where the engine's `Capabilities` allow). An engine refuses at submit
what it cannot do.
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
class Sampling:
    """Random sampling of one request (OpenAI's fields and meanings); without one, decoding is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    seed: int | None = None
    """The same seed, prompt and settings give the same tokens, whatever else is batched with the request."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if not 0 < self.temperature <= 100:
            raise CompactLMError(f"temperature must be in (0, 100] to sample, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CompactLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CompactLMError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise CompactLMError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool = True
    """Generate exactly max_new_tokens (benchmarks); False stops at the model's end-of-sequence token."""
    min_new_tokens: int = 0
    """No end-of-sequence (nor stop token) before this many tokens: the model's EOS is masked until then."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request besides the model's end-of-sequence (unless ignore_eos)."""
    sampling: Sampling | None = None
    logprobs: int | None = None
    """None: none; 0: each generated token's log-probability; k > 0: also the k most likely tokens at each step."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens (the first has none): what scoring a text needs (OpenAI's `echo`)."""
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.min_new_tokens < 0:
            raise CompactLMError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CompactLMError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class Capabilities:
    """What an engine does beyond greedy decoding of token ids; `Engine.submit` refuses the rest."""

    sampling: bool = False
    penalties: bool = False
    """presence_penalty and frequency_penalty."""
    top_logprobs: int = 0
    """The most alternatives `logprobs` may ask for per generated token (0: the chosen token's only)."""
    logprobs: bool = False
    prompt_logprobs: bool = False

    def check(self, request: Request, engine: str) -> None:
        def refuse(what: str) -> None:
            raise CompactLMError(f"the {engine} engine cannot {what}")

        sampling = request.sampling
        if sampling is not None and not self.sampling:
            refuse("sample (temperature > 0): it decodes greedily")
        if sampling is not None and (sampling.presence_penalty or sampling.frequency_penalty) and not self.penalties:
            refuse("apply presence or frequency penalties")
        if request.logprobs is not None:
            if not self.logprobs:
                refuse("return log-probabilities")
            # With greedy decoding the chosen token is the most likely one: one alternative is always known.
            top = self.top_logprobs if sampling is not None else max(self.top_logprobs, 1)
            if request.logprobs > top:
                refuse(f"return {request.logprobs} alternatives per token (at most {top})")
        if request.prompt_logprobs is not None and not self.prompt_logprobs:
            refuse("score the prompt's tokens (prompt log-probabilities, OpenAI's echo with logprobs)")


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
    logprobs: list[float] = field(default_factory=list)
    """Each generated token's log-probability, when the request asked (`Request.logprobs`)."""
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    """The most likely tokens at each step, when the request asked for alternatives."""
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float] | None] = field(default_factory=list)


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
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[float | None] = []
        self.prompt_top_logprobs: list[dict[int, float] | None] = []
        self.cancelled = False
        """Set by `cancel()`; the engine's worker ends the request at its next step."""
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._taken_all = False
        self._listener = None

    # -- the engine's side
    def push(
        self,
        tokens: Sequence[int],
        at: float | None = None,
        logprobs: Sequence[float] | None = None,
        top_logprobs: Sequence[dict[int, float]] | None = None,
    ) -> None:
        if not tokens:
            return
        at = time.perf_counter() if at is None else at
        tokens = [int(t) for t in tokens]
        self.tokens.extend(tokens)
        self.token_times.extend([at] * len(tokens))
        if logprobs is not None:
            self.logprobs.extend(float(p) for p in logprobs)
        if top_logprobs is not None:
            self.top_logprobs.extend(top_logprobs)
        self._events.put((tokens, at))
        self._notify()

    def finish(self, reason: str, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._events.put(_END)
        self._notify()

    def _notify(self) -> None:
        listener = self._listener
        if listener is not None:
            listener()

    # -- the caller's side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (it ends as "cancelled")."""
        self.cancelled = True

    def listen(self, callback) -> None:
        """Call `callback()` (from the engine's thread) after each push and at the end: an event loop's wake-up
        (`loop.call_soon_threadsafe(event.set)`). It is also called once now, for what arrived before."""
        self._listener = callback
        callback()

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
            logprobs=list(self.logprobs),
            top_logprobs=list(self.top_logprobs),
            prompt_logprobs=list(self.prompt_logprobs),
            prompt_top_logprobs=list(self.prompt_top_logprobs),
        )


class Engine(ABC):
    """A loaded engine. Subclasses implement `_serve`: the worker loop that takes requests from `self._inbox`."""

    capabilities = Capabilities()

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
        if vocab and not all(0 <= t < vocab for t in request.stop_token_ids):
            raise CompactLMError(f"a stop token id is outside the model's vocabulary (0 to {vocab - 1})")
        self.capabilities.check(request, self.manifest.backend)
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

    def load(self) -> dict:
        """How busy the engine is now: `running` and `waiting` requests, and `kv_cache_usage` (0-1) where the
        backend reports it. This default counts requests submitted and not finished."""
        outstanding = sum(1 for s in self._inflight if not s.done) + self._inbox.qsize()
        running = min(outstanding, self.limits.max_batch_size)
        return {"running": running, "waiting": outstanding - running}

    recycles = 0
    """How many times the engine replaced the process that runs its model (the cpu backend's recycled worker)."""

    def memory(self) -> int:
        """Resident bytes the engine holds: this process's, plus any worker process of its own."""
        from compactlm.core.host import rss_bytes

        return rss_bytes()

    def stop_ids(self, request: Request) -> set[int]:
        """The token ids that end `request` (none when it ignores EOS)."""
        return set() if request.ignore_eos else set(self.eos_token_ids) | set(request.stop_token_ids)

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
