"""The Triton models that serve an engine through PyTriton (the protocol is in serve/protocol.py).

`compactlm` streams: a decoupled model whose infer function is an async generator, one request per call, each
engine step awaited in a thread of our own pool, so that one slow stream never holds the others (PyTriton runs
every infer function in one event loop). `compactlm_full` answers once per request, with Triton's dynamic
batcher in front; the requests of a batch go to the engine together and it batches them in flight.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from compactlm.serve.protocol import (
    TRITON_ERROR,
    TRITON_FINISH_REASON,
    TRITON_FULL_MODEL,
    TRITON_IGNORE_EOS,
    TRITON_INPUT_IDS,
    TRITON_MAX_TOKENS,
    TRITON_MODEL,
    TRITON_OUTPUT_IDS,
    TRITON_TEXT_INPUT,
    TRITON_TEXT_OUTPUT,
)
from compactlm.serve.requests import BadRequest, GenerationService, ServeError

STREAM_FRONT, FULL_FRONT = "triton", "triton_full"


def _text(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=object)


class TritonModels:
    """Binds a GenerationService to a PyTriton server as the two models of the protocol."""

    def __init__(
        self,
        service: GenerationService,
        max_batch_size: int,
        max_queue_delay_us: int,
        stream_instances: int = 1,
        threads: int = 256,
    ):
        self.service = service
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.stream_instances = stream_instances
        # One thread waits on each stream's next engine step; asyncio's default pool has min(32, cores + 4).
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="serve-wait")

    def bind(self, triton) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        inputs = [
            Tensor(name=TRITON_INPUT_IDS, dtype=np.int32, shape=(-1,), optional=True),
            Tensor(name=TRITON_TEXT_INPUT, dtype=bytes, shape=(1,), optional=True),
            Tensor(name=TRITON_MAX_TOKENS, dtype=np.int32, shape=(1,)),
            Tensor(name=TRITON_IGNORE_EOS, dtype=np.bool_, shape=(1,), optional=True),
        ]
        outputs = [
            Tensor(name=TRITON_OUTPUT_IDS, dtype=np.int32, shape=(-1,)),
            Tensor(name=TRITON_TEXT_OUTPUT, dtype=bytes, shape=(1,)),
        ]
        # One Python-backend stub carries the responses of its streams one after another; several instances
        # (each a stub process) carry them side by side (measured: 1 instance delivered 16 streams' tokens
        # ~3x slower than the engine made them, 4 kept up).
        streams = [self.stream] * self.stream_instances
        triton.bind(TRITON_MODEL, streams, inputs, outputs, config=ModelConfig(batching=False, decoupled=True))
        full_outputs = outputs + [
            Tensor(name=TRITON_FINISH_REASON, dtype=bytes, shape=(1,)),
            Tensor(name=TRITON_ERROR, dtype=bytes, shape=(1,)),
        ]
        batcher = DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us)
        triton.bind(
            TRITON_FULL_MODEL,
            self.full,
            inputs,
            full_outputs,
            config=ModelConfig(max_batch_size=self.max_batch_size, batcher=batcher),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests
    def parse(self, data: dict, batched: bool) -> tuple[tuple[int, ...], int, bool]:
        """(prompt ids, max_tokens, ignore_eos) of one request's tensors; BadRequest says what is wrong."""

        def get(name: str) -> np.ndarray | None:
            value = data.get(name)
            if value is None:
                return None
            return value[0] if batched and value.ndim > 0 else value

        ids, text, max_tokens, ignore_eos = (
            get(n) for n in (TRITON_INPUT_IDS, TRITON_TEXT_INPUT, TRITON_MAX_TOKENS, TRITON_IGNORE_EOS)
        )
        if max_tokens is None:
            raise BadRequest(f"missing input '{TRITON_MAX_TOKENS}' (INT32 [1]): how many tokens to generate")
        if max_tokens.size != 1:
            raise BadRequest(f"'{TRITON_MAX_TOKENS}' takes one value, got {max_tokens.size}")
        if ids is not None and text is not None:
            raise BadRequest(f"give '{TRITON_INPUT_IDS}' or '{TRITON_TEXT_INPUT}', not both")
        if ids is None and text is None:
            raise BadRequest(f"missing input: the prompt, as '{TRITON_INPUT_IDS}' (INT32) or '{TRITON_TEXT_INPUT}'")
        if text is not None:
            if text.size != 1:
                raise BadRequest(f"'{TRITON_TEXT_INPUT}' takes one string, got {text.size}")
            raw = text.reshape(-1)[0]
            try:
                prompt_text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError as exc:
                raise BadRequest(f"'{TRITON_TEXT_INPUT}' is not UTF-8 text: {exc}") from None
            prompt = self.service.prompt_ids(text=prompt_text)
        else:
            prompt = self.service.prompt_ids(ids=ids.reshape(-1).tolist())
        eos = bool(ignore_eos.reshape(-1)[0]) if ignore_eos is not None and ignore_eos.size else False
        return prompt, int(max_tokens.reshape(-1)[0]), eos

    def _start(self, front: str, data: dict, batched: bool):
        try:
            prompt, max_tokens, ignore_eos = self.parse(data, batched)
            return self.service.submit(front, prompt, max_tokens, ignore_eos)
        except BadRequest:
            self.service.refused(front)
            raise

    async def stream(self, requests):
        """The decoupled model: one response per engine step, then Triton's final response."""
        (request,) = requests  # batching=False: Triton hands one request per call
        stream = self._start(STREAM_FRONT, request.data, batched=False)
        wanted = request.requested_output_names
        decoder = (
            self.service.decoder()
            if self.service.has_tokenizer and (not wanted or TRITON_TEXT_OUTPUT in wanted)
            else None
        )
        loop = asyncio.get_running_loop()
        # every token that arrived since the last response goes in the next one: a backlog shrinks, not grows
        while (tokens := await loop.run_in_executor(self._pool, stream.take)) is not None:
            response = {TRITON_OUTPUT_IDS: np.asarray(tokens, dtype=np.int32)}
            if decoder is not None:
                response[TRITON_TEXT_OUTPUT] = _text(decoder.delta(tokens))
            yield [response]
        error = self.service.finished(STREAM_FRONT, stream)
        if error:
            raise ServeError(error)

    async def full(self, requests):
        """The batched model: every request of the batch on the engine at once, one response each.

        PyTriton 0.7 can fail only a whole batch: a refused request batched with good ones gets its message in
        the `error` output; a batch of refused requests fails as a Triton error."""
        loop = asyncio.get_running_loop()
        started: list = []
        for request in requests:
            try:
                started.append(self._start(FULL_FRONT, request.data, batched=True))
            except BadRequest as exc:
                started.append(exc)
        if all(isinstance(s, BadRequest) for s in started):
            raise BadRequest("; ".join(dict.fromkeys(str(s) for s in started)))
        responses = []
        for item in started:
            if isinstance(item, BadRequest):
                responses.append(self._full_response([], "", "", str(item)))
                continue
            done = await loop.run_in_executor(self._pool, item.result)
            error = self.service.finished(FULL_FRONT, item) or ""
            responses.append(
                self._full_response(done.tokens, self.service.decode(done.tokens), done.finish_reason, error)
            )
        if all(r[TRITON_ERROR][0, 0] for r in responses):
            raise ServeError(responses[0][TRITON_ERROR][0, 0].decode())
        return responses

    @staticmethod
    def _full_response(tokens: list[int], text: str, finish_reason: str, error: str) -> dict:
        return {
            TRITON_OUTPUT_IDS: np.asarray(tokens, dtype=np.int32)[None, :],
            TRITON_TEXT_OUTPUT: _text(text)[None, :],
            TRITON_FINISH_REASON: _text(finish_reason)[None, :],
            TRITON_ERROR: _text(error)[None, :],
        }
