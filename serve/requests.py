"""One served request, from text or token ids to streamed tokens and text: what every front of `compactlm serve`
shares (the Triton models and the OpenAI route). Checks a request before it reaches the engine, turns the
engine's refusals into `BadRequest`, decodes text as tokens arrive, and counts what was served."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from compactlm.core.errors import CompactLMError
from compactlm.engines.runtime import Engine, Request, RequestStream


class ServeError(CompactLMError):
    """A request that failed in the server: its message is all the client gets."""

    # PyTriton sends a failed request's formatted exception, traceback included, to the client. A traceback
    # that reads None keeps that to one line: "compactlm.BadRequest: <message>".
    __module__ = "compactlm"
    __traceback__ = property(lambda self: None, lambda self, value: None)


class BadRequest(ServeError):
    """A request the server refuses before it runs (HTTP 400): a missing input, an empty prompt, a limit."""

    __module__ = "compactlm"


@dataclass
class ServeStats:
    """What the server did, per front (`triton`, `triton_full`, `openai`); thread-safe."""

    started: float = field(default_factory=time.perf_counter)
    requests: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, front: str, *, requests: int = 0, refused: int = 0, failed: int = 0, tokens: int = 0) -> None:
        with self._lock:
            self.requests[front] += requests
            self.refused[front] += refused
            self.failed[front] += failed
            self.tokens[front] += tokens

    def summary(self) -> str:
        with self._lock:
            fronts = sorted(set(self.requests) | set(self.refused))
            parts = [
                f"{f}: {self.requests[f]} requests, {self.tokens[f]} tokens, {self.refused[f]} refused, "
                f"{self.failed[f]} failed"
                for f in fronts
            ]
        uptime = time.perf_counter() - self.started
        return f"served for {uptime:.0f} s; " + ("; ".join(parts) if parts else "no requests")


class TextDecoder:
    """The text of a growing token list, handed out as deltas. A trailing incomplete UTF-8 character (decoded as
    U+FFFD) is held back until the tokens that complete it arrive."""

    def __init__(self, service: GenerationService):
        self.service = service
        self.tokens: list[int] = []
        self.sent = ""

    def delta(self, tokens: Sequence[int], final: bool = False) -> str:
        self.tokens.extend(tokens)
        text = self.service.decode(self.tokens)
        if text.endswith("\ufffd") and not final:
            text = text[:-1]
        if len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def longest_token(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for (its longest vocabulary entry; byte-level entries are
    one character per byte, so no token decodes to more): a text of N characters holds at least N / this tokens."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


class GenerationService:
    """An engine as the server sees it: validated prompts, submitted requests, text, counters."""

    def __init__(self, engine: Engine, name: str):
        self.engine = engine
        self.name = name
        self.stats = ServeStats()
        self.vocab_size = engine.manifest.model.get("vocab_size")
        self._tokenizer_lock = threading.Lock()
        try:
            self._tokenizer = engine.tokenizer
        except CompactLMError:
            self._tokenizer = None
        self.max_prompt_chars = None
        """Text longer than this holds more tokens than the engine takes, whatever it says: refused untokenized, so
        that a huge prompt never holds the tokenizer (and the requests behind it) for seconds."""
        if self._tokenizer is not None:
            self.max_prompt_chars = engine.limits.max_input_len * longest_token(self._tokenizer)

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def prompt_ids(self, text: str | None = None, ids: Sequence[int] | None = None) -> tuple[int, ...]:
        """The prompt's token ids from exactly one of `text` and `ids`; refuses empty and out-of-vocabulary ones."""
        if (text is None) == (ids is None):
            raise BadRequest("give the prompt as text or as token ids (exactly one of them)")
        if text is not None:
            if not text:
                raise BadRequest("the prompt is empty")
            if self._tokenizer is None:
                raise BadRequest("this engine has no tokenizer: send the prompt as token ids")
            if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
                tokens = self.engine.limits.max_input_len
                raise BadRequest(
                    f"the prompt is {len(text):,} characters: more than the {tokens} input tokens this engine takes "
                    f"can hold (a token here stands for at most {self.max_prompt_chars // tokens} characters)"
                )
            with self._tokenizer_lock:
                ids = self._tokenizer(text)["input_ids"]
            if not ids:
                raise BadRequest("the prompt is empty after tokenization")
            return tuple(int(i) for i in ids)
        ids = tuple(int(i) for i in ids)
        if not ids:
            raise BadRequest("the prompt is empty")
        if self.vocab_size and not all(0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise BadRequest(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def submit(self, front: str, prompt: tuple[int, ...], max_tokens: int, ignore_eos: bool) -> RequestStream:
        """Queue one request on the engine; a request beyond its limits is a BadRequest naming the limit."""
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
        try:
            stream = self.engine.submit(Request(prompt, max_tokens, ignore_eos))
        except CompactLMError as exc:
            raise BadRequest(str(exc)) from None
        self.stats.add(front, requests=1)
        return stream

    def refused(self, front: str) -> None:
        """Count a request refused before it reached the engine (the fronts call it: they see every refusal)."""
        self.stats.add(front, refused=1)

    def finished(self, front: str, stream: RequestStream) -> str | None:
        """Count a finished request; its error, if the engine failed it."""
        done = stream.result()
        error = done.error
        if error is None and done.finish_reason in ("error", "cancelled"):
            error = f"the engine {done.finish_reason} the request"
        self.stats.add(front, tokens=len(done.tokens), failed=int(error is not None))
        return error

    def decode(self, tokens: Sequence[int]) -> str:
        if self._tokenizer is None:
            return ""
        with self._tokenizer_lock:
            return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def decoder(self) -> TextDecoder:
        return TextDecoder(self)
