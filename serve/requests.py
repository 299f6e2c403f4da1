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
from compactlm.engines.runtime import Engine, Request, RequestStream, Sampling


class ServeError(CompactLMError):
    """A request that failed in the server: its message is all the client gets."""

    # PyTriton sends a failed request's formatted exception, traceback included, to the client. A traceback
    # that reads None keeps that to one line: "compactlm.BadRequest: <message>".
    __module__ = "compactlm"
    __traceback__ = property(lambda self: None, lambda self, value: None)


class BadRequest(ServeError):
    """A request the server refuses before it runs (HTTP 400): a missing input, an empty prompt, a limit.
    `param` names the request field at fault, where one is (OpenAI's error shape carries it)."""

    __module__ = "compactlm"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StopMatcher:
    """Stop sequences over a growing text, fed in deltas: `feed` returns the text that is safe to send (a tail that
    could still begin a stop sequence is held back) and whether a stop sequence was reached; the text after it
    is never sent. `include_stop` sends the stop sequence itself too."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.include_stop = include_stop
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        if not self.stops:
            self.pending = ""
            return text
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, stop = min(hits)
            self.stopped, self.pending = True, ""
            return text[: at + (len(stop) if self.include_stop else 0)]
        keep = 0 if final else min(self.hold, len(text))
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


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
    """The text of a growing token list, handed out as deltas, decoding only a short window at each step (the
    incremental detokenization vLLM and TGI use): the last few tokens already sent give the context that the new
    ones' text depends on (leading spaces, merged bytes). A trailing incomplete UTF-8 character (decoded as U+FFFD)
    is held back until the tokens that complete it arrive."""

    CONTEXT = 5
    """Tokens of context before the new ones: enough for byte-level merges and SentencePiece's spaces."""

    def __init__(self, service: GenerationService):
        self.service = service
        self.tokens: list[int] = []
        self.prefix = 0
        """Where the context window starts."""
        self.read = 0
        """Tokens before this have been handed out as text."""

    def delta(self, tokens: Sequence[int], final: bool = False) -> str:
        self.tokens.extend(tokens)
        if self.read == len(self.tokens):
            return ""
        window = self.tokens[self.prefix :]
        before = self.service.decode(self.tokens[self.prefix : self.read])
        text = self.service.decode(window)
        if text.endswith("\ufffd") and not final:
            return ""  # an incomplete character: wait for the token that completes it
        if len(text) <= len(before) and not final:
            return ""
        new = text[len(before) :]
        self.read = len(self.tokens)
        self.prefix = max(0, self.read - self.CONTEXT)
        return new


def check_text(text: str, param: str) -> None:
    """Refuse a string that is no text: JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer
    takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"the {param} holds a lone UTF-16 surrogate at character {exc.start}: not text", param
        ) from None


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
                raise BadRequest("the prompt is empty", "prompt")
            if self._tokenizer is None:
                raise BadRequest("this engine has no tokenizer: send the prompt as token ids", "prompt")
            if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
                tokens = self.engine.limits.max_input_len
                raise BadRequest(
                    f"the prompt is {len(text):,} characters: more than the {tokens} input tokens this engine takes "
                    f"can hold (a token here stands for at most {self.max_prompt_chars // tokens} characters)",
                    "prompt",
                )
            check_text(text, "prompt")
            with self._tokenizer_lock:
                ids = self._tokenizer(text)["input_ids"]
            if not ids:
                raise BadRequest("the prompt is empty after tokenization", "prompt")
            return tuple(int(i) for i in ids)
        ids = tuple(int(i) for i in ids)
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if self.vocab_size and not all(0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise BadRequest(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        return ids

    def check_lengths(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a prompt or a max_tokens beyond the engine's limits, naming the field at fault."""
        limits = self.engine.limits
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if prompt_len > limits.max_input_len:
            raise BadRequest(
                f"the prompt is {prompt_len} tokens, longer than the engine's max_input_len {limits.max_input_len}",
                "prompt",
            )
        if prompt_len + max_tokens > limits.max_seq_len:
            raise BadRequest(
                f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} tokens "
                f"exceeds the engine's max_seq_len {limits.max_seq_len}",
                "max_tokens",
            )

    def submit(
        self,
        front: str,
        prompt: tuple[int, ...],
        max_tokens: int,
        ignore_eos: bool = False,
        *,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
        sampling: Sampling | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> RequestStream:
        """Queue one request on the engine; a request beyond its limits or its abilities is a BadRequest."""
        self.check_lengths(len(prompt), max_tokens)
        try:
            request = Request(
                prompt,
                max_tokens,
                ignore_eos,
                min_new_tokens=min_tokens,
                stop_token_ids=tuple(stop_token_ids),
                sampling=sampling,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
            stream = self.engine.submit(request)
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

    def token_texts(self, tokens: Sequence[int]) -> list[str]:
        """Each token's own text (what OpenAI's logprobs list): the token decoded alone."""
        if self._tokenizer is None:
            return [str(t) for t in tokens]
        with self._tokenizer_lock:
            return [self._tokenizer.decode([int(t)]) for t in tokens]

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False, **kw):
        """The token ids of `messages` rendered by the tokenizer's chat template."""
        if self._tokenizer is None:
            raise BadRequest("this engine has no tokenizer: chat needs one (use /v1/completions with token ids)")
        if not getattr(self._tokenizer, "chat_template", None):
            raise BadRequest("this engine's tokenizer has no chat template: use /v1/completions", "messages")
        for message in messages:
            check_text(message.get("content") or "", "messages")
        chars = sum(len(m.get("content") or "") for m in messages)
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise BadRequest(
                f"the messages hold {chars:,} characters: more than the {self.engine.limits.max_input_len} input "
                "tokens this engine takes can hold",
                "messages",
            )
        try:
            with self._tokenizer_lock:
                ids = self._tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=add_generation_prompt and not continue_final,
                    continue_final_message=continue_final,
                    tokenize=True,
                    return_dict=False,
                    **kw,
                )
        except Exception as exc:  # a template that raises on these messages (roles it does not know, say)
            raise BadRequest(f"the chat template refused the messages: {exc}", "messages") from None
        if hasattr(ids, "get") and "input_ids" in ids:
            ids = ids["input_ids"]
        ids = tuple(int(i) for i in ids)
        if not ids:
            raise BadRequest("the messages render to an empty prompt", "messages")
        return ids
