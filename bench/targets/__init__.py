"""What a benchmark drives: an in-process engine, an OpenAI-compatible endpoint, or a Triton server.

Every target has one job: `submit(item)` returns at once with a `Pending`, whose `result()` is the request's
`RequestRecord` (its submit time and the arrival time of each output token). A target never raises for one
request: a refused submit, a dead server or a broken stream becomes a record with `error` set, so a run goes on.

Target strings (`open_target`):
  DIR                               an engine folder (engine.json), loaded in-process
  http://HOST:PORT[/v1]             an OpenAI-compatible server: POST /v1/completions, stream=true, prompt as ids
  triton://HOST:PORT/MODEL          Triton over gRPC streaming (triton+grpc:// too; port 8001 by default)
  triton+http://HOST:PORT/MODEL     Triton over HTTP: POST /v2/models/MODEL/generate_stream (SSE)
  null                              the null engine (answers at once): measures the harness itself

The Triton protocol (what `compactlm serve` implements; a decoupled model, `batching=False`: the engine batches
in flight). Inputs: `input_ids` INT32 [prompt length], `max_tokens` INT32 [1], `ignore_eos` BOOL [1]. Each
streamed response carries the new tokens as `output_ids` INT32 [n]; gRPC clients ask for the empty final response
(`enable_empty_final_response=True`: its `triton_final_response` parameter ends a request). Over HTTP the same
inputs go as JSON (`{"input_ids": [...], "max_tokens": n, "ignore_eos": true}`), each SSE event carries
`{"output_ids": [...]}` (or `{"error": "..."}`), and the end of the stream is the end of the request.

For OpenAI-compatible servers the output is counted from each chunk's `token_ids` when the server sends them
(vLLM's `return_token_ids`; our server does), else one token per chunk, and the final `usage.completion_tokens`
wins over the count when given.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from compactlm.bench.targets.base import TRITON_MODEL, Done, Pending, Target, failed
from compactlm.bench.targets.engine import EngineTarget
from compactlm.bench.targets.streaming import OpenAITarget, TritonHttpTarget, iter_sse
from compactlm.bench.targets.triton_grpc import TritonGrpcTarget

__all__ = [
    "Done",
    "EngineTarget",
    "OpenAITarget",
    "Pending",
    "Target",
    "TritonGrpcTarget",
    "TritonHttpTarget",
    "failed",
    "iter_sse",
    "open_target",
]


def open_target(
    spec: str,
    name: str | None = None,
    *,
    model: str | None = None,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Target:
    """A target from its string (see the module docstring); `tokenizer` is a tokenizer folder for remote targets."""
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    if spec == "null":
        from compactlm.bench.fake import NullEngine

        return EngineTarget(NullEngine(), name=name or "null")
    scheme = urlsplit(spec).scheme
    if scheme in ("http", "https"):
        return OpenAITarget(spec, model, vocab_size=vocab_size, tokenizer=tok, name=name)
    if scheme in ("triton", "triton+grpc", "triton+http"):
        parts = urlsplit(spec)
        served = model or parts.path.strip("/") or TRITON_MODEL
        if scheme == "triton+http":
            url = f"http://{parts.hostname}:{parts.port or 8000}"
            return TritonHttpTarget(url, served, vocab_size=vocab_size, tokenizer=tok, name=name)
        url = f"{parts.hostname}:{parts.port or 8001}"
        return TritonGrpcTarget(url, served, vocab_size=vocab_size, tokenizer=tok, name=name)
    from compactlm.engines.registry import load_engine

    return EngineTarget(load_engine(spec), name=name)
