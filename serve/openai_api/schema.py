"""The request bodies of the OpenAI front, as pydantic models: FastAPI validates every request against them and
publishes them in the OpenAPI document (GET /openapi.json).

Strict types (a string is not an integer), unknown fields refused (OpenAI does the same; a typo never passes
silently). The fields are OpenAI's, plus the extensions that benchmark and eval clients send to vLLM and
trtllm-serve: `ignore_eos`, `min_tokens`, `top_k`, `stop_token_ids`, `include_stop_str_in_output`,
`skip_special_tokens`, `stream_options.continuous_usage_stats`, chat's `add_generation_prompt` and
`continue_final_message`. Fields accepted only at their neutral value (`logit_bias`, `suffix`, tools...) are
checked in `check_unsupported`, which names what the server cannot do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20

TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    """A last chunk with the request's token counts (and no choices)."""
    continuous_usage_stats: bool = False
    """Token counts in every chunk (vLLM's extension)."""


class _Sampling(_Strict):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2, description="0 (or absent with no top_p/top_k): greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: no top-k cut (vLLM's extension)")
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} sequences that end the text")
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="no end-of-sequence before this many tokens")
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, token ids, or a batch of either (each gets n choices)"
    )
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; fields beyond these (tool calls and the like) are refused by the strict model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: what the engine's max_seq_len leaves")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def check_unsupported(body: _Sampling) -> tuple[str, str] | None:
    """(field, why) for the first field this server cannot honour at the value sent, else None."""
    stops = body.stops()
    if len(stops) > MAX_STOPS:
        return "stop", f"at most {MAX_STOPS} stop sequences"
    if any(not s for s in stops):
        return "stop", "a stop sequence is empty"
    if body.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if body.n > 1 and body.stream and isinstance(body, ChatRequest) and body.logprobs:
        return "n", "streaming several choices with logprobs is not supported"
    if isinstance(body, CompletionRequest):
        if body.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if body.best_of is not None and body.best_of != body.n:
            return "best_of", "best_of is supported only equal to n (no ranking of choices)"
        if body.max_tokens == 0 and not body.echo:
            return "max_tokens", "max_tokens 0 generates nothing: use it with echo to score the prompt"
    if isinstance(body, ChatRequest):
        if body.response_format and body.response_format.get("type", "text") != "text":
            return "response_format", "only the text response format is supported (no JSON mode)"
        if body.tools and body.tool_choice != "none":
            return "tools", "tool calls are not supported"
        if body.top_logprobs and not body.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if body.continue_final_message and body.messages[-1].role != "assistant":
            return "continue_final_message", "continue_final_message needs the last message to be the assistant's"
    return None
