"""OpenAI's response bodies: completions and chat completions, whole and as stream chunks, with usage and
logprobs in OpenAI's two shapes (the legacy completions one, and chat's `content` list)."""

from __future__ import annotations

import json
import time
import uuid

from compactlm.serve.openai_api.generation import Choice, Delta
from compactlm.serve.requests import GenerationService


class Meta:
    """The fields every body and chunk of one response shares."""

    def __init__(self, kind: str, model: str):
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.kind = kind
        self.fields = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}

    def body(self, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        out = {**self.fields, "object": kind, "choices": choices}
        if usage is not None or not chunk:
            out["usage"] = usage
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    service: GenerationService,
    tokens: list[int],
    logprobs: list[float | None],
    top: list[dict[int, float] | None] | None,
    offset: int = 0,
) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs (text -> logprob), text_offset."""
    texts = service.token_texts(tokens)
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top_text = None
    if top is not None:
        top_text = [None if t is None else _by_text(service, t) for t in top]
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top_text, "text_offset": offsets}


def chat_logprobs(
    service: GenerationService, tokens: list[int], logprobs: list[float], top: list[dict[int, float]] | None
) -> dict:
    texts = service.token_texts(tokens)
    content = []
    for i, (text, logprob) in enumerate(zip(texts, logprobs, strict=False)):
        alternatives = []
        if top is not None and i < len(top):
            alt_texts = service.token_texts(list(top[i]))
            alternatives = [
                {"token": t, "logprob": lp, "bytes": list(t.encode())}
                for t, lp in zip(alt_texts, top[i].values(), strict=True)
            ]
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": alternatives})
    return {"content": content}


def _by_text(service: GenerationService, top: dict[int, float]) -> dict[str, float]:
    texts = service.token_texts(list(top))
    out: dict[str, float] = {}
    for text, logprob in zip(texts, top.values(), strict=True):
        out.setdefault(text, logprob)  # two ids with one text: the likelier (listed first) stands
    return out


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def choice_usage(choices: list[Choice], n: int) -> dict:
    """Token counts of a request: each prompt once (its n choices share it), every token sent."""
    prompts = {c.index // n: len(c.prompt) for c in choices}
    return usage(sum(prompts.values()), sum(c.sent_tokens for c in choices))


def delta_chunk_choice(kind: str, delta: Delta, service: GenerationService, logprobs: bool, first: bool) -> dict:
    """One choice of a stream chunk."""
    if kind == "chat":
        body: dict = {"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason}
        if first:
            body["delta"]["role"] = "assistant"
        if delta.text or first:
            body["delta"]["content"] = delta.text
        if logprobs and delta.logprobs:
            body["logprobs"] = chat_logprobs(service, delta.tokens, delta.logprobs, delta.top_logprobs)
        return body
    body = {
        "index": delta.index,
        "text": delta.text,
        "token_ids": delta.tokens,
        "logprobs": None,
        "finish_reason": delta.finish_reason,
    }
    if logprobs and delta.logprobs is not None and delta.tokens:
        body["logprobs"] = completion_logprobs(service, delta.tokens, delta.logprobs, delta.top_logprobs)
    return body
