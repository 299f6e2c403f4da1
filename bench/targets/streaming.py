"""Servers that stream over HTTP: OpenAI-compatible `/v1/completions` and Triton's `generate_stream` (SSE)."""

from __future__ import annotations

import http.client
import json
import time
from abc import abstractmethod
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit

from compactlm.bench.metrics import RequestRecord
from compactlm.bench.targets.base import (
    TRITON_IGNORE_EOS,
    TRITON_INPUT_IDS,
    TRITON_MAX_TOKENS,
    TRITON_MODEL,
    TRITON_OUTPUT_IDS,
    Done,
    Pending,
    Target,
    failed,
)
from compactlm.bench.targets.sse_client import StreamClient, iter_sse
from compactlm.bench.workload import WorkloadItem
from compactlm.core.errors import CompactLMError

__all__ = ["OpenAITarget", "TritonHttpTarget", "iter_sse"]


class _FuturePending(Pending):
    def __init__(self, future: Future, item: WorkloadItem, submitted: float, times: list[float]):
        self.future, self.item, self.submitted, self.times = future, item, submitted, times

    def result(self, timeout: float | None = None) -> RequestRecord:
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            self.future.cancel()  # the stream is closed, its server slot freed
            return failed(self.item, self.submitted, f"no end within {timeout} s", self.times)


class _RemoteTarget(Target):
    """A server reached over the network: every request's stream is read on the client's one event loop."""

    def __init__(self, name: str, url: str, vocab_size: int | None, tokenizer, timeout: float):
        super().__init__(name)
        self.url = url
        self.vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        self._tokenizer = tokenizer
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids = (int(tokenizer.eos_token_id),)
        self.timeout = timeout
        parts = urlsplit(url)
        self._client = StreamClient(f"{parts.scheme}://{parts.netloc}", timeout, name=f"bench-{self.kind}")

    @property
    def tokenizer(self):
        return self._tokenizer

    def submit(self, item: WorkloadItem) -> Pending:
        submitted = time.perf_counter()
        times: list[float] = []
        try:
            future = self._client.submit(self._guarded(item, submitted, times))
        except RuntimeError as exc:  # the target was closed
            return Done(failed(item, submitted, str(exc)))
        return _FuturePending(future, item, submitted, times)

    async def _guarded(self, item: WorkloadItem, submitted: float, times: list[float]) -> RequestRecord:
        try:
            finish_reason, prompt_tokens = await self._stream(item, times)
        except Exception as exc:  # a dead server or a broken stream: a failed request, never a failed run
            return failed(item, submitted, f"{type(exc).__name__}: {exc}", times)
        input_tokens = prompt_tokens if prompt_tokens is not None else item.input_len
        return RequestRecord(
            item.task_id, input_tokens, item.output_tokens, submitted, times, finish_reason=finish_reason
        )

    @abstractmethod
    async def _stream(self, item: WorkloadItem, times: list[float]) -> tuple[str | None, int | None]:
        """Send one request, append each output token's arrival time to `times`; return the finish reason and the
        prompt's length as the server counted it (None where it does not say: the workload's length stands)."""

    def describe(self) -> dict:
        return {**super().describe(), "model": self.name, "backend": self.kind, "url": self.url}

    def close(self) -> None:
        self._client.close()


class OpenAITarget(_RemoteTarget):
    """An OpenAI-compatible server's streaming `/v1/completions` (the prompt as token ids), or its
    `/v1/chat/completions` (a URL ending in it; the prompt's text as one user message, which needs a tokenizer)."""

    kind = "openai"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        vocab_size: int | None = None,
        tokenizer=None,
        timeout: float = 600.0,
        name: str | None = None,
    ):
        url = url.rstrip("/")
        path = urlsplit(url).path
        self.route = "chat" if path.endswith("/chat/completions") else "completions"
        path = path.removesuffix("/chat/completions").removesuffix("/completions")
        self._base = path.removesuffix("/v1")
        if self.route == "chat" and tokenizer is None:
            raise CompactLMError("the chat route takes text: give --tokenizer (the served model's tokenizer folder)")
        super().__init__(name or model or "openai", url, vocab_size, tokenizer, timeout)
        self.model = model or self._served_model()
        if name is None:
            self.name = self.model

    def _served_model(self) -> str:
        parts = urlsplit(self.url)
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_type(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", f"{self._base}/v1/models")
            data = json.loads(conn.getresponse().read())
            return data["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise CompactLMError(f"cannot list the models of {self.url} ({exc}); give the model name") from exc
        finally:
            conn.close()

    def describe(self) -> dict:
        return {**super().describe(), "route": self.route}

    async def _stream(self, item: WorkloadItem, times: list[float]) -> str | None:
        body = {
            "model": self.model,
            "max_tokens": item.output_tokens,
            "min_tokens": item.output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.route == "chat":
            text = self._tokenizer.decode(list(item.input_ids), skip_special_tokens=True)
            body["messages"] = [{"role": "user", "content": text}]
            body["max_completion_tokens"] = body.pop("max_tokens")
        else:
            body["prompt"] = list(item.input_ids)
        state = {"finish_reason": None, "usage": None, "done": False}

        def on_event(now: float, data: str) -> None:
            if state["done"]:
                return
            if data.strip() == "[DONE]":
                state["done"] = True
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            state["usage"] = chunk.get("usage") or state["usage"]
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                if isinstance(ids, list):
                    times.extend([now] * len(ids))
                elif "delta" not in choice or (choice["delta"] or {}).get("content"):
                    times.append(now)  # a chunk of text: one token until usage says otherwise
                state["finish_reason"] = choice.get("finish_reason") or state["finish_reason"]

        path = "/v1/chat/completions" if self.route == "chat" else "/v1/completions"
        await self._client.post_events(f"{self._base}{path}", json.dumps(body).encode(), on_event)
        finish_reason, usage, done = state["finish_reason"], state["usage"], state["done"]
        if not done:
            raise ConnectionError("the stream ended without [DONE]")
        count = (usage or {}).get("completion_tokens")
        if isinstance(count, int) and times and count != len(times):  # chunks that held several tokens, or none
            del times[count:]
            times.extend([times[-1]] * (count - len(times)))
        # the prompt the server ran: on the chat route the template's tokens too, counted as GuideLLM counts them
        prompt_tokens = (usage or {}).get("prompt_tokens")
        return finish_reason, prompt_tokens if isinstance(prompt_tokens, int) and prompt_tokens > 0 else None


class TritonHttpTarget(_RemoteTarget):
    """Triton's HTTP `generate_stream` (SSE) on a decoupled model speaking the protocol above."""

    kind = "triton-http"

    def __init__(
        self,
        url: str,
        model: str = TRITON_MODEL,
        *,
        vocab_size: int | None = None,
        tokenizer=None,
        timeout: float = 600.0,
        name: str | None = None,
    ):
        super().__init__(name or model, url.rstrip("/"), vocab_size, tokenizer, timeout)
        self.model = model

    async def _stream(self, item: WorkloadItem, times: list[float]) -> str | None:
        body = {TRITON_INPUT_IDS: list(item.input_ids), TRITON_MAX_TOKENS: item.output_tokens, TRITON_IGNORE_EOS: True}

        def on_event(now: float, data: str) -> None:
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            ids = event.get(TRITON_OUTPUT_IDS, [])
            times.extend([now] * (len(ids) if isinstance(ids, list) else 1))

        path = f"/v2/models/{self.model}/generate_stream"
        await self._client.post_events(path, json.dumps(body).encode(), on_event)
        return None, None
