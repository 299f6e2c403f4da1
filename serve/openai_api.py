"""An OpenAI-compatible HTTP front for a served engine: POST /v1/completions (streaming and not), GET /v1/models,
GET /health. The convention most LLM benchmark tools speak; the standard library's threading HTTP server, one
thread per connection (an engine serves tens of streams, not thousands).

Decoding is greedy, the engines' only mode: sampling fields (temperature, top_p, seed...) are accepted and
ignored. What greedy decoding cannot honour is refused with a 400: n or best_of above 1, echo, logprobs, suffix,
stop sequences, and min_tokens between 1 and max_tokens - 1. Extensions (vLLM's): `ignore_eos`, `min_tokens`
equal to max_tokens (the same as ignore_eos), and each choice carries its `token_ids`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from compactlm.serve.requests import BadRequest, GenerationService

FRONT = "openai"
MAX_BODY = 16 << 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIError(Exception):
    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, param)


def _int_field(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {json.dumps(value)}", name)
    return value


def parse_completion(body: dict, model: str) -> dict:
    """The fields of a /v1/completions body that matter here, checked; OpenAIError says what is wrong."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("model") not in (None, model):
        raise OpenAIError(
            HTTPStatus.NOT_FOUND, f"the model {body['model']!r} does not exist; this server serves {model!r}", "model"
        )
    if "prompt" not in body:
        raise _bad("missing 'prompt': a string or a list of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text, ids = prompt, None
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        text, ids = None, prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("one prompt per request: send the prompts of a batch as separate requests", "prompt")
    else:
        raise _bad("'prompt' must be a string or a list of token ids", "prompt")
    max_tokens = _int_field(body, "max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise _bad(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    for name in ("n", "best_of"):
        if _int_field(body, name, 1) != 1:
            raise _bad(f"'{name}' above 1 is not supported: decoding is greedy, every choice would be the same", name)
    if body.get("echo"):
        raise _bad("'echo' is not supported", "echo")
    if body.get("logprobs") is not None:
        raise _bad("'logprobs' is not supported", "logprobs")
    if body.get("suffix"):
        raise _bad("'suffix' is not supported", "suffix")
    if body.get("stop"):
        raise _bad("stop sequences are not supported: the engine stops at max_tokens or end-of-sequence", "stop")
    stream, ignore_eos = body.get("stream", False), body.get("ignore_eos", False)
    for name, value in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(value, bool):
            raise _bad(f"'{name}' must be true or false", name)
    min_tokens = _int_field(body, "min_tokens", 0)
    if min_tokens >= max_tokens:
        ignore_eos = True
    elif min_tokens > 0:
        raise _bad("'min_tokens' is supported as 0 or equal to max_tokens (use ignore_eos)", "min_tokens")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return {
        "text": text,
        "ids": ids,
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": ignore_eos,
        "include_usage": bool(options.get("include_usage")),
    }


class OpenAIRoute:
    """The HTTP front: `start()` serves in a background thread, `stop()` closes it after in-flight requests end."""

    def __init__(self, service: GenerationService, host: str, port: int, model: str):
        self.service, self.model = service, model
        self._inflight = 0
        self._idle = threading.Condition()
        handler = type("Handler", (_Handler,), {"route": self})
        self.httpd = _HTTPServer((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="openai-route", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop accepting, wait up to `drain_s` for the requests in flight, close the socket."""
        if self._thread is not None:  # shutdown() waits for serve_forever: forever if it never ran
            self.httpd.shutdown()
            self._thread = None
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=drain_s)
        self.httpd.server_close()

    def _enter(self) -> None:
        with self._idle:
            self._inflight += 1

    def _leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 resets connections when tens of clients connect at once

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left is no server error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    route: OpenAIRoute
    protocol_version = "HTTP/1.1"
    server_version = "compactlm"

    def setup(self) -> None:
        super().setup()
        # one small write per streamed event: without TCP_NODELAY, Nagle + delayed ACKs hold each for ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request on stderr is noise under load

    # -- dispatch
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            model = {"id": self.route.model, "object": "model", "created": 0, "owned_by": "compactlm"}
            self._json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif path == "/health":
            self._json(HTTPStatus.OK, {"status": "ok"})
        else:
            self._error(OpenAIError(HTTPStatus.NOT_FOUND, f"no route GET {path}"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/completions":
            self._drain_body()
            self._error(OpenAIError(HTTPStatus.NOT_FOUND, f"no route POST {path}; try /v1/completions"))
            return
        self.route._enter()
        try:
            self._completions()
        except OpenAIError as exc:
            if exc.status < HTTPStatus.INTERNAL_SERVER_ERROR:
                self.route.service.refused(FRONT)
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; its request ran to its end in the engine
        finally:
            self.route._leave()

    # -- /v1/completions
    def _completions(self) -> None:
        body = self._read_json()
        fields = parse_completion(body, self.route.model)
        service = self.route.service
        try:
            prompt = service.prompt_ids(text=fields["text"], ids=fields["ids"])
            stream = service.submit(FRONT, prompt, fields["max_tokens"], fields["ignore_eos"])
        except BadRequest as exc:
            raise _bad(str(exc), "prompt") from None
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.route.model}
        if fields["stream"]:
            self._stream(stream, meta, len(prompt), fields["include_usage"])
            return
        done = stream.result()
        error = service.finished(FRONT, stream)
        if error:
            raise OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, error, kind="server_error")
        choice = {
            "index": 0,
            "text": service.decode(done.tokens),
            "token_ids": done.tokens,
            "logprobs": None,
            "finish_reason": done.finish_reason,
        }
        self._json(
            HTTPStatus.OK,
            {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(len(prompt), len(done.tokens))},
        )

    def _stream(self, stream, meta: dict, prompt_len: int, include_usage: bool) -> None:
        service = self.route.service
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        decoder = service.decoder()

        def chunk(text: str, ids: list[int], finish_reason: str | None) -> dict:
            choice = {"index": 0, "text": text, "token_ids": ids, "logprobs": None, "finish_reason": finish_reason}
            return {**meta, "object": "text_completion", "choices": [choice]}

        while (tokens := stream.take()) is not None:  # all tokens since the last event: no backlog under load
            self._event(chunk(decoder.delta(tokens), tokens, None))
        done = stream.result()
        error = service.finished(FRONT, stream)
        if error:
            self._event({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
        else:
            self._event(chunk(decoder.delta([], final=True), [], done.finish_reason))
            if include_usage:
                self._event(
                    {**meta, "object": "text_completion", "choices": [], "usage": _usage(prompt_len, len(done.tokens))}
                )
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")

    # -- helpers
    def _read_json(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise OpenAIError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _bad("invalid Content-Length") from None
        if length > MAX_BODY:
            raise OpenAIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            raise _bad("the request has no body: send a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the body is not valid JSON: {exc}") from None

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: OpenAIError) -> None:
        if exc.status in (HTTPStatus.LENGTH_REQUIRED, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
            self.close_connection = True  # the unread body would be taken for the next request
        self._json(exc.status, exc.body())

    def _event(self, payload: dict) -> None:
        self._send_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
