"""The load generator's HTTP streaming client: every stream of a target read on one event loop (aiohttp, on uvloop
where installed) in one background thread, with an incremental server-sent-events parser.

One loop instead of a thread per request: on a machine whose cores the server under test needs, the client's own
CPU is taken from the server, so it is kept small. A thread per stream reading lines through http.client cost
~150 us of Python per event (chunked framing, line splitting and the GIL passed between 32 threads); here a
received chunk is split into its events at once and each event costs one JSON parse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator

from compactlm.core.errors import CompactLMError


class SSEParser:
    """Server-sent events from bytes as they arrive: `feed(chunk)` returns the `data` of every event the chunk
    completed (multi-line data joined with newlines, comments and other fields skipped); `end()` the last one."""

    def __init__(self):
        self._rest = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        lines = (self._rest + chunk).splitlines(keepends=True)
        # a line is complete at its LF; one ending in CR may be the first half of a CRLF split across chunks
        if lines and not lines[-1].endswith(b"\n"):
            self._rest = lines.pop()
        else:
            self._rest = b""
        events: list[str] = []
        for raw in lines:
            self._line(raw, events)
        return events

    def end(self) -> list[str]:
        events: list[str] = []
        if self._rest:
            self._line(self._rest, events)
            self._rest = b""
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        line = raw.rstrip(b"\r\n")
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8"))


def iter_sse(lines: Iterable[bytes]) -> Iterator[str]:
    """The `data` of each server-sent event in `lines` (bytes, in any pieces)."""
    parser = SSEParser()
    for piece in lines:
        yield from parser.feed(piece)
    yield from parser.end()


def _aiohttp():
    try:
        import aiohttp
    except ImportError as exc:
        raise CompactLMError(f"benchmarking a server needs aiohttp ({exc}): pip install -e .") from exc
    return aiohttp


class StreamClient:
    """POSTs whose responses stream server-sent events, all on one event loop in a daemon thread.

    `submit(coroutine)` runs a coroutine there and returns a concurrent Future; `post_events` is the coroutine
    that sends one request and calls `on_event(arrival_time, data)` for each event of its response."""

    def __init__(self, base_url: str, timeout: float, name: str = "bench-http"):
        self.aiohttp = _aiohttp()
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self._session = None
        self._closed = False
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        if self._closed:
            coroutine.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def _client_session(self):
        if self._session is None:
            aiohttp = self.aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),  # as many connections as requests in flight
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
                auto_decompress=False,
            )
        return self._session

    async def post_events(self, path: str, body: bytes, on_event: Callable[[float, str], None]) -> None:
        """POST `body` (JSON) to `path`; every event of the answer goes to `on_event` with the time its bytes
        arrived. A status other than 200, a refused or dropped connection: ConnectionError."""
        session = self._client_session()
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    text = (await response.content.read(300)).decode("utf-8", "replace").strip()
                    raise ConnectionError(f"HTTP {response.status} from {url}: {text}")
                parser = SSEParser()
                async for chunk in response.content.iter_any():
                    now = time.perf_counter()
                    for data in parser.feed(chunk):
                        on_event(now, data)
                now = time.perf_counter()
                for data in parser.end():
                    on_event(now, data)
        except self.aiohttp.ClientError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectionError(f"no bytes from {url} within {self.timeout:g} s") from exc

    def close(self, wait_s: float = 5.0) -> None:
        """Cancel what is in flight, close the connections, stop the loop."""
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._session is not None:
                await self._session.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(wait_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            self.loop.close()
