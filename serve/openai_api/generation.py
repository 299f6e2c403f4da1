"""The engine requests behind one OpenAI request (each prompt x n choices), read together on the event loop.

The engine's worker thread wakes the loop through `RequestStream.listen` (one `call_soon_threadsafe` per engine
step and request): no thread waits on a stream, so a thousand idle connections cost no threads. Text is decoded
as tokens arrive, stop sequences are matched on it (the engine request is cancelled at a match), and a client
that leaves cancels its requests, which frees their engine slots at the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from compactlm.engines.runtime import RequestStream, Sampling
from compactlm.serve.metrics import ServeMetrics
from compactlm.serve.requests import BadRequest, GenerationService, StopMatcher, TextDecoder

FRONT = "openai"


@dataclass(frozen=True)
class Plan:
    """How to generate every choice of one request: the engine's part and the text's part."""

    max_tokens: int
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    sampling: Sampling | None = None
    logprobs: int | None = None
    """None: none; 0: the chosen tokens'; k: also the k most likely."""
    prompt_logprobs: int | None = None
    stops: tuple[str, ...] = ()
    include_stop: bool = False
    generate: bool = True
    """False: score the prompt only (echo with max_tokens 0): one token is generated and not returned."""


@dataclass
class Delta:
    """What one choice gained since the last read."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    prompt: tuple[int, ...]
    stream: RequestStream
    decoder: TextDecoder
    matcher: StopMatcher
    sent_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    text: list[str] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.finish_reason is None


class Admission:
    """Engine requests in flight from this front, against a limit: beyond it a request is refused (429)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.inflight = 0

    def admit(self, n: int) -> bool:
        if self.inflight + n > self.limit:
            return False
        self.inflight += n
        return True

    def release(self, n: int = 1) -> None:
        self.inflight -= n


class Generation:
    """The choices of one request; submit with `start`, then `deltas()` (streaming) or `complete()`."""

    def __init__(self, service: GenerationService, metrics: ServeMetrics, admission: Admission, plan: Plan):
        self.service, self.metrics, self.admission, self.plan = service, metrics, admission, plan
        self.choices: list[Choice] = []
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

    def start(self, prompts: list[tuple[int, ...]], n: int) -> None:
        """Submit every prompt n times (choice index = prompt * n + j); BadRequest for the first refused one, and
        none of them runs then."""
        plan = self.plan
        count = len(prompts) * n
        if not self.admission.admit(count):
            raise QueueFull(self.admission.limit)
        try:
            for p, prompt in enumerate(prompts):
                for j in range(n):
                    sampling = plan.sampling
                    if sampling is not None and sampling.seed is not None and n > 1:
                        sampling = Sampling(**{**sampling.__dict__, "seed": sampling.seed + j})
                    stream = self.service.submit(
                        FRONT,
                        prompt,
                        plan.max_tokens if plan.generate else 1,
                        plan.ignore_eos,
                        min_tokens=plan.min_tokens,
                        stop_token_ids=plan.stop_token_ids,
                        sampling=sampling,
                        logprobs=plan.logprobs,
                        prompt_logprobs=plan.prompt_logprobs,
                    )
                    matcher = StopMatcher(plan.stops, plan.include_stop)
                    choice = Choice(p * n + j, prompt, stream, self.service.decoder(), matcher)
                    self.choices.append(choice)
                    stream.listen(self._listener(choice))
        except BadRequest:
            self.cancel()
            self.admission.release(count - len(self.choices))
            raise

    def _listener(self, choice: Choice):
        """Runs on the engine's thread at every push and at the end."""
        recorded: list[bool] = []
        lock = threading.Lock()  # listen() calls it once from the loop's thread too

        def on_event() -> None:
            with lock:
                first_end = choice.stream.done and not recorded
                if first_end:
                    recorded.append(True)
            if first_end:
                done = choice.stream.result()
                self.metrics.completed(done, "stop" if choice.matcher.stopped else None)
                if choice.matcher.stopped:  # cancelled by us at a stop sequence: a finished request, not a failure
                    self.service.stats.add(FRONT, tokens=len(done.tokens))
                else:
                    self.service.finished(FRONT, choice.stream)
                self._call(self.admission.release)
            self._call(self._wake.set)

        return on_event

    def _call(self, callback) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is gone (the server stopped): nobody is waiting
            pass

    def cancel(self) -> None:
        for choice in self.choices:
            if not choice.stream.done:
                choice.stream.cancel()

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """The choices' deltas, as engine steps bring them; the last delta of each carries its finish reason."""
        try:
            while any(c.open for c in self.choices):
                await self._wake.wait()
                self._wake.clear()
                batch = [d for c in self.choices if c.open and (d := self._read(c)) is not None]
                if any(c.open and c.stream.done for c in self.choices):
                    self._wake.set()  # its end came with its last tokens: read it without waiting for a wake-up
                if batch:
                    yield batch
        finally:
            self.cancel()  # a client that left (or a stop sequence): the engine drops the rest at its next step

    async def complete(self) -> list[Choice]:
        async for _ in self.deltas():
            pass
        return self.choices

    def _read(self, choice: Choice) -> Delta | None:
        tokens = choice.stream.take(block=False)
        if tokens is None:  # the engine finished this request
            done = choice.stream.result()
            text = choice.matcher.feed(choice.decoder.delta([], final=True), final=True)
            if done.error or done.finish_reason in ("error", "cancelled"):
                choice.error = done.error or f"the engine {done.finish_reason} the request"
                choice.finish_reason = "error"
            else:
                choice.finish_reason = "stop" if choice.matcher.stopped else done.finish_reason
            return self._delta(choice, [], text if self.plan.generate else "")
        if not tokens:
            return None
        text = choice.matcher.feed(choice.decoder.delta(tokens))
        if choice.matcher.stopped:
            choice.stream.cancel()
            choice.finish_reason = "stop"
        if not self.plan.generate:
            tokens, text = [], ""
        return self._delta(choice, tokens, text)

    def _delta(self, choice: Choice, tokens: list[int], text: str) -> Delta:
        stream = choice.stream
        start, choice.sent_tokens = choice.sent_tokens, choice.sent_tokens + len(tokens)
        logprobs = top = None
        if self.plan.logprobs is not None:
            logprobs = stream.logprobs[start : choice.sent_tokens]
            if self.plan.logprobs:
                top = stream.top_logprobs[start : choice.sent_tokens]
        choice.text.append(text)
        return Delta(choice.index, text, tokens, logprobs, top, choice.finish_reason)


class QueueFull(Exception):
    """More engine requests in flight than the front admits (HTTP 429)."""

    def __init__(self, limit: int):
        super().__init__(
            f"the server has {limit} requests in flight, its limit (--max-queue): retry shortly or with fewer choices"
        )
