"""The OpenAI-compatible API as a FastAPI application: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus), GET /openapi.json.

    app = make_app(service, model="smol", limits=FrontLimits())   # any ASGI server runs it; route.py uses uvicorn

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx for anything the
client sent wrong: validation (strict pydantic models, unknown fields refused), limits (prompt + max_tokens vs
the engine's max_seq_len, body size, the queue), and what this engine cannot do. Bodies are read before the
application sees them, bounded in size and time (a body announced and never sent is answered 408, and it holds
no thread meanwhile). Tokenization runs in a thread, behind a character cap, so the event loop never waits on a
long prompt.

Decoding is greedy unless a request asks for sampling (temperature > 0, or top_p / top_k with no temperature),
as in trtllm-serve; `seed` makes sampling repeatable.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from compactlm.engines.runtime import Sampling
from compactlm.serve.metrics import ServeMetrics
from compactlm.serve.openai_api.generation import Admission, Generation, Plan, QueueFull
from compactlm.serve.openai_api.responses import (
    DONE,
    Meta,
    chat_logprobs,
    choice_usage,
    completion_logprobs,
    delta_chunk_choice,
    sse,
)
from compactlm.serve.openai_api.schema import ChatRequest, CompletionRequest, check_unsupported
from compactlm.serve.requests import BadRequest, GenerationService

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontLimits:
    max_body_bytes: int = 8 << 20
    body_timeout_s: float = 30.0
    """A request body not complete this long after its headers is answered 408."""
    max_queue: int | None = None
    """Engine requests in flight beyond which a request is answered 429; default 16x the engine's max_batch_size,
    at least 256: the engine queues what it cannot batch yet, the limit only bounds what a flood can pile up."""


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def make_app(service: GenerationService, model: str, limits: FrontLimits | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or FrontLimits()
    engine = service.engine
    metrics = ServeMetrics(engine, model)
    admission = Admission(limits.max_queue or max(256, 16 * engine.limits.max_batch_size))
    app = FastAPI(
        title="compactlm OpenAI-compatible API",
        version="1",
        description=f"Serves {model} ({engine.manifest.describe()}).",
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics, app.state.admission = metrics, admission

    def reply(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
        code = {404: "model_not_found" if param == "model" else "not_found", 429: "rate_limit_exceeded"}.get(status)
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        if exc.status < 500:
            service.refused("openai")
        return reply(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(BadRequest)
    async def _bad_request(request, exc: BadRequest):
        service.refused("openai")
        return reply(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        service.refused("openai")
        return reply(429, str(exc), "rate_limit_exceeded", None, {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        service.refused("openai")
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        union = any(_is_type_tag(p) for p in loc)
        param = ".".join(p for p in loc if not _is_type_tag(p)) or None
        message = first.get("msg", "invalid request")
        if union:
            message = f"{message} (or another of the forms it takes)"
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})", None
        elif first.get("type") == "model_attributes_type" and not param:
            message = "the request body must be a JSON object"
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field '{param}'"
        elif first.get("type") == "missing":
            message = f"missing field '{param}'" if param else "the request has no body: send a JSON object"
        else:
            message = f"'{param}': {message}" if param else message
        return reply(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return reply(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        LOG.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return reply(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        failed = getattr(engine, "_failed", None)
        if failed:
            return JSONResponse({"status": "error", "error": failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "compactlm",
            "max_model_len": engine.limits.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    def check_body(body) -> None:
        if body.model not in (None, model):
            raise OpenAIError(404, f"the model '{body.model}' does not exist; this server serves '{model}'", "model")
        unsupported = check_unsupported(body)
        if unsupported:
            raise OpenAIError(400, unsupported[1], unsupported[0])

    async def in_thread(function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, lambda: function(*args, **kwargs))

    async def run(plan: Plan, prompts: list, body, meta: Meta):
        """Submit the request's choices: (a streaming response, None) if it streams, else (None, finished choices)."""
        generation = Generation(service, metrics, admission, plan)
        generation.start(prompts, body.n)
        if body.stream:
            return StreamingResponse(_stream(generation, meta, body, service), media_type="text/event-stream"), None
        choices = await generation.complete()
        _raise_engine_error(choices)
        return None, choices

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_body(body)
        raw = body.prompt
        if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
            raw = [raw]
        if not raw:
            raise BadRequest("the prompt is empty", "prompt")
        prompts = [
            await in_thread(service.prompt_ids, text=p) if isinstance(p, str) else service.prompt_ids(ids=p)
            for p in raw
        ]
        echo_scores = body.echo and body.logprobs is not None
        if echo_scores and not engine.capabilities.prompt_logprobs:
            raise BadRequest(
                f"echo with logprobs needs the prompt's log-probabilities, which the {engine.manifest.backend} "
                "engine cannot compute: serve a torch engine for scoring",
                "echo",
            )
        plan = _plan(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs)
        if echo_scores:
            plan = Plan(**{**plan.__dict__, "prompt_logprobs": body.logprobs, "generate": body.max_tokens != 0})
        meta = Meta("completion", model)
        generation, choices = await run(plan, prompts, body, meta)
        if choices is None:
            return generation
        out = []
        for choice in choices:
            text = "".join(choice.text)
            logprobs = None
            done = choice.stream
            if body.logprobs is not None:
                tokens = done.tokens[: choice.sent_tokens]
                top = done.top_logprobs[: choice.sent_tokens] if body.logprobs else None
                lps = list(done.logprobs[: choice.sent_tokens])
                if body.echo:
                    tokens = list(choice.prompt) + tokens
                    lps = list(done.prompt_logprobs) + lps
                    if top is not None:
                        top = list(done.prompt_top_logprobs) + top
                logprobs = completion_logprobs(service, tokens, lps, top)
            if body.echo:
                text = service.decode(choice.prompt) + text
            out.append(
                {
                    "index": choice.index,
                    "text": text,
                    "token_ids": done.tokens[: choice.sent_tokens],
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
        return meta.body(out, choice_usage(choices, body.n))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_body(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await in_thread(
            service.chat_prompt,
            messages,
            body.add_generation_prompt,
            body.continue_final_message,
            **(body.chat_template_kwargs or {}),
        )
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = engine.limits.max_seq_len - len(prompt)
            if max_tokens < 1:
                service.check_lengths(len(prompt), 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        meta = Meta("chat", model)
        generation, choices = await run(_plan(body, max_tokens, logprobs), [prompt], body, meta)
        if choices is None:
            return generation
        out = []
        for choice in choices:
            done = choice.stream
            lp = None
            if logprobs is not None:
                top = done.top_logprobs[: choice.sent_tokens] if logprobs else None
                lp = chat_logprobs(service, done.tokens[: choice.sent_tokens], done.logprobs, top)
            message = {"role": "assistant", "content": "".join(choice.text)}
            out.append(
                {"index": choice.index, "message": message, "logprobs": lp, "finish_reason": choice.finish_reason}
            )
        return meta.body(out, choice_usage(choices, body.n))

    return BodyLimits(app, limits, metrics)


SAMPLING_EPS = 1e-5
"""A temperature below this decodes greedily (vLLM's rule): dividing logits by it would overflow to NaN."""


def _is_type_tag(part: str) -> bool:
    """pydantic's name of a union member in an error's location ('str', 'list[int]', 'function-after[...]')."""
    return "[" in part or part in ("str", "int", "float", "bool", "none", "dict", "list")


def _plan(body, max_tokens: int, logprobs: int | None) -> Plan:
    temperature = body.temperature
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    sampling = None
    wants = temperature is not None and temperature >= SAMPLING_EPS
    if temperature is None and (top_k or (body.top_p is not None and body.top_p < 1)):
        wants, temperature = True, 1.0
    if wants:
        sampling = Sampling(
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
            top_k=top_k,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )
    elif body.presence_penalty or body.frequency_penalty:
        raise OpenAIError(
            400, "presence and frequency penalties apply to sampling: set a temperature > 0", "temperature"
        )
    return Plan(
        max_tokens=max_tokens,
        ignore_eos=body.ignore_eos,
        min_tokens=min(body.min_tokens, max_tokens),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        sampling=sampling,
        logprobs=logprobs,
        stops=tuple(body.stops()),
        include_stop=body.include_stop_str_in_output,
    )


def _raise_engine_error(choices) -> None:
    for choice in choices:
        if choice.error:
            raise OpenAIError(500, choice.error, kind="server_error")


async def _stream(generation: Generation, meta: Meta, body, service: GenerationService):
    """The SSE events of a streamed response; the client leaving ends the generator (and cancels the requests)."""
    kind = meta.kind
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    wants_logprobs = (body.logprobs is not None) if kind != "chat" else bool(body.logprobs)
    first = {c.index for c in generation.choices}
    echo = kind != "chat" and getattr(body, "echo", False)
    try:
        async for deltas in generation.deltas():
            choices = []
            for delta in deltas:
                if delta.finish_reason == "error":
                    error = next(c.error for c in generation.choices if c.index == delta.index)
                    yield sse(error_body(error or "the engine failed the request", "server_error"))
                    continue
                echoed = echo and delta.index in first
                if echoed:
                    choice = next(c for c in generation.choices if c.index == delta.index)
                    delta.text = service.decode(choice.prompt) + delta.text
                body_choice = delta_chunk_choice(kind, delta, service, wants_logprobs, delta.index in first)
                if echoed and wants_logprobs:  # the first chunk scores the prompt, as the unstreamed response does
                    body_choice["logprobs"] = _echo_logprobs(
                        service, choice.prompt, choice.stream, delta, body.logprobs
                    )
                choices.append(body_choice)
                first.discard(delta.index)
            if choices:
                running = choice_usage(generation.choices, body.n) if continuous else None
                yield sse(meta.body(choices, running, chunk=True))
        if include_usage:
            yield sse(meta.body([], choice_usage(generation.choices, body.n), chunk=True))
        yield DONE
    except asyncio.CancelledError:
        generation.cancel()
        raise


def _echo_logprobs(service: GenerationService, prompt, done, delta, top_k: int) -> dict:
    """The logprobs of an echoed stream's first chunk: the prompt's tokens, then the delta's own."""
    tokens = list(prompt) + list(delta.tokens)
    lps = list(done.prompt_logprobs) + list(delta.logprobs or [])
    top = list(done.prompt_top_logprobs) + list(delta.top_logprobs or []) if top_k else None
    return completion_logprobs(service, tokens, lps, top)


class BodyLimits:
    """ASGI middleware: reads each request body before the app does, at most `max_body_bytes` (413) and within
    `body_timeout_s` (408), and counts responses by route and status for /metrics."""

    def __init__(self, app, limits: FrontLimits, metrics: ServeMetrics):
        self.app, self.limits, self.metrics = app, limits, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        route = route if route in _ROUTES else "other"
        status_seen: list[int] = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                scope = _as_json(scope)
                declared = dict(scope.get("headers") or []).get(b"content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
                    return await _respond(counted_send, 413, self._too_large())
                try:
                    body = await asyncio.wait_for(self._read(receive), self.limits.body_timeout_s)
                except TimeoutError:
                    message = f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
                    return await _respond(counted_send, 408, error_body(message, "invalid_request_error"))
                except _TooLarge:
                    return await _respond(counted_send, 413, self._too_large())
                except _Gone:
                    return None
                receive = _replay(body, receive)
            await self.app(scope, receive, counted_send)
        finally:
            if status_seen:
                self.metrics.request(route, status_seen[0])

    def _too_large(self) -> dict:
        return error_body(
            f"the request body is larger than {self.limits.max_body_bytes} bytes", "invalid_request_error"
        )

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json"}


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


def _as_json(scope: dict) -> dict:
    """Every body here is JSON: one sent without a Content-Type (or as curl -d's form type) is read as JSON."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _replay(body: bytes, receive):
    sent = []

    async def replayed():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect a streaming response listens for

    return replayed


async def _respond(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


__all__ = ["FrontLimits", "OpenAIError", "make_app"]
