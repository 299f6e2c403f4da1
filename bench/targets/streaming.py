"""Servers that stream over HTTP: OpenAI-compatible `/v1/completions` and Triton's `generate_stream` (SSE)."""

from __future__ import annotations

import http.client
import json
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
from compactlm.bench.workload import WorkloadItem
from compactlm.core.errors import CompactLMError


class _FuturePending(Pending):
    def __init__(self, future: Future, item: WorkloadItem, submitted: float, times: list[float]):
        self.future, self.item, self.submitted, self.times = future, item, submitted, times

    def result(self, timeout: float | None = None) -> RequestRecord:
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            return failed(self.item, self.submitted, f"no end within {timeout} s", self.times)


class _RemoteTarget(Target):
    """A server reached over the network: each request runs in a client thread that reads its stream."""

    def __init__(self, name: str, url: str, vocab_size: int | None, tokenizer, timeout: float, workers: int):
        super().__init__(name)
        self.url = url
        self.vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        self._tokenizer = tokenizer
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids = (int(tokenizer.eos_token_id),)
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"bench-{self.kind}")

    @property
    def tokenizer(self):
        return self._tokenizer

    def submit(self, item: WorkloadItem) -> Pending:
        submitted = time.perf_counter()
        times: list[float] = []
        try:
            future = self._pool.submit(self._guarded, item, submitted, times)
        except RuntimeError as exc:  # the pool was shut down
            return Done(failed(item, submitted, str(exc)))
        return _FuturePending(future, item, submitted, times)

    def _guarded(self, item: WorkloadItem, submitted: float, times: list[float]) -> RequestRecord:
        try:
            finish_reason = self._stream(item, times)
        except Exception as exc:  # a dead server or a broken stream: a failed request, never a failed run
            return failed(item, submitted, f"{type(exc).__name__}: {exc}", times)
        return RequestRecord(
            item.task_id, item.input_len, item.output_tokens, submitted, times, finish_reason=finish_reason
        )

    @abstractmethod
    def _stream(self, item: WorkloadItem, times: list[float]) -> str | None:
        """Send one request, append each output token's arrival time to `times`; return the finish reason."""

    def _post(self, path: str, body: dict) -> http.client.HTTPResponse:
        parts = urlsplit(self.url)
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_type(parts.hostname, parts.port, timeout=self.timeout)
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json", "Accept": "text/event-stream"}
        )
        response = conn.getresponse()
        if response.status != 200:
            text = response.read(300).decode("utf-8", "replace").strip()
            conn.close()
            raise ConnectionError(f"HTTP {response.status} from {self.url}{path}: {text}")
        return response

    def describe(self) -> dict:
        return {**super().describe(), "model": self.name, "backend": self.kind, "url": self.url}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def iter_sse(lines: Iterable[bytes]) -> Iterator[str]:
    """The `data` of each server-sent event (multi-line data joined with newlines; comments skipped)."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _read_events(response: http.client.HTTPResponse) -> Iterator[str]:
    try:
        yield from iter_sse(iter(response.readline, b""))
    finally:
        response.close()


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
        workers: int = 512,
        name: str | None = None,
    ):
        url = url.rstrip("/")
        path = urlsplit(url).path
        self.route = "chat" if path.endswith("/chat/completions") else "completions"
        path = path.removesuffix("/chat/completions").removesuffix("/completions")
        self._base = path.removesuffix("/v1")
        if self.route == "chat" and tokenizer is None:
            raise CompactLMError("the chat route takes text: give --tokenizer (the served model's tokenizer folder)")
        super().__init__(name or model or "openai", url, vocab_size, tokenizer, timeout, workers)
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

    def _stream(self, item: WorkloadItem, times: list[float]) -> str | None:
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
        finish_reason, usage, done = None, None, False
        path = "/v1/chat/completions" if self.route == "chat" else "/v1/completions"
        for data in _read_events(self._post(f"{self._base}{path}", body)):
            now = time.perf_counter()
            if data.strip() == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                if isinstance(ids, list):
                    times.extend([now] * len(ids))
                elif "delta" not in choice or (choice["delta"] or {}).get("content"):
                    times.append(now)  # a chunk of text: one token until usage says otherwise
                finish_reason = choice.get("finish_reason") or finish_reason
        if not done:
            raise ConnectionError("the stream ended without [DONE]")
        count = (usage or {}).get("completion_tokens")
        if isinstance(count, int) and times and count != len(times):  # chunks that held several tokens, or none
            del times[count:]
            times.extend([times[-1]] * (count - len(times)))
        return finish_reason


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
        workers: int = 512,
        name: str | None = None,
    ):
        super().__init__(name or model, url.rstrip("/"), vocab_size, tokenizer, timeout, workers)
        self.model = model

    def _stream(self, item: WorkloadItem, times: list[float]) -> str | None:
        body = {TRITON_INPUT_IDS: list(item.input_ids), TRITON_MAX_TOKENS: item.output_tokens, TRITON_IGNORE_EOS: True}
        for data in _read_events(self._post(f"/v2/models/{self.model}/generate_stream", body)):
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            ids = event.get(TRITON_OUTPUT_IDS, [])
            times.extend([now] * (len(ids) if isinstance(ids, list) else 1))
        return None
