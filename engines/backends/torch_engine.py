"""The `torch` backend: plain transformers `generate`, the reference and the baseline a user would reach for.

Build copies the checkpoint's weights (in the chosen dtype) into the engine folder. Run: static batching, as
with `generate` in a user's own loop: queued requests are taken together (up to max_batch_size), left-padded,
generated in one call, and the next batch starts when the whole batch is done. A streamer reads each step's
tokens with their time.

Everything per request (sampling with its own seeded generator, min_new_tokens, stop ids, penalties,
log-probabilities) is one logits processor, `_RowControl`: it picks each row's token itself and leaves `generate`
only that token to choose, so a request's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError
from compactlm.engines.backend import Backend
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Capabilities, Engine, RequestStream

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchBackend(Backend):
    name = "torch"
    precisions = tuple(DTYPES)
    default_precision = "fp32"
    description = "transformers generate (reference and baseline), static batches"

    def check_model(self, model_config, config: BuildConfig) -> None:
        if config.tp_size != 1:
            raise CompactLMError("the torch backend runs on one device: tp_size must be 1")

    def build(self, checkpoint: Checkpoint, out: Path, config: BuildConfig) -> dict:
        import torch

        from compactlm.compress.checkpoint import load_model

        model = load_model(checkpoint, dtype=getattr(torch, DTYPES[config.precision]))
        model.save_pretrained(out / "model")
        return {"dtype": DTYPES[config.precision]}

    def load(self, path: Path, manifest: Manifest) -> Engine:
        return TorchEngine(path, manifest)


MAX_TOP_LOGPROBS = 20


def top_logprobs(logprobs, k: int) -> list[dict[int, float]]:
    """The k most likely tokens of each row of `logprobs` ([rows, vocab]) as {token id: log-probability}."""
    if k <= 0:
        return [{} for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]


class _RowControl:
    """A logits processor that decides each row's next token: stop ids masked before min_new_tokens, penalties,
    then greedy or seeded sampling; every other token is set to -inf, so generate's greedy pick is ours. It keeps
    the step's log-probabilities (the model's own, before masks and sampling) for the streamer."""

    def __init__(self, streams: list[RequestStream], stop_ids: list[set[int]], device):
        import torch

        self.streams = streams
        self.stop_ids = [sorted(ids) for ids in stop_ids]
        self.generators = []
        for stream in streams:
            sampling = stream.request.sampling
            generator = None
            if sampling is not None and sampling.seed is not None:
                generator = torch.Generator(device=device).manual_seed(sampling.seed)
            self.generators.append(generator)
        self.step: tuple[list[float], list[dict[int, float]] | None] | None = None
        self.wants_logprobs = any(s.request.logprobs is not None for s in streams)
        self.top = max((s.request.logprobs or 0 for s in streams), default=0)
        self.needed = self.wants_logprobs or any(
            s.request.sampling is not None or (ids and s.request.min_new_tokens)
            for s, ids in zip(streams, stop_ids, strict=True)
        )
        """False for a batch of plain greedy requests: generate's own argmax is the same, without a pass per row."""

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        raw = torch.log_softmax(scores, dim=-1) if self.wants_logprobs else None
        chosen = []
        for row, stream in enumerate(self.streams):
            request = stream.request
            logits = scores[row]
            if self.stop_ids[row] and len(stream.tokens) < request.min_new_tokens:
                logits[self.stop_ids[row]] = -float("inf")
            sampling = request.sampling
            if sampling is None:
                chosen.append(int(logits.argmax()))
                continue
            if sampling.presence_penalty or sampling.frequency_penalty:
                counts = torch.bincount(torch.tensor(stream.tokens, dtype=torch.long), minlength=logits.shape[0])
                logits = logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
            chosen.append(_sample(logits, sampling, self.generators[row]))
        forced = torch.full_like(scores, -float("inf"))
        forced[torch.arange(len(chosen)), torch.tensor(chosen)] = 0.0
        if raw is not None:
            picked = raw[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
            self.step = (picked, top_logprobs(raw, self.top) if self.top else None)
        return forced


def _sample(logits, sampling, generator) -> int:
    """One token from softmax(logits / temperature), cut to the top_k most likely and to the top_p mass."""
    import torch

    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    probs, ids = probs.sort(descending=True)
    if sampling.top_k:
        probs, ids = probs[: sampling.top_k], ids[: sampling.top_k]
    if sampling.top_p < 1:
        keep = (probs.cumsum(0) - probs) < sampling.top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True  # the likeliest token always stays (a top_p below float32's smallest number keeps none)
        probs, ids = probs[keep], ids[keep]
    return int(ids[torch.multinomial(probs, 1, generator=generator)])


class _Streamer:
    """transformers calls put() with the prompt first, then with each step's new tokens ([batch])."""

    def __init__(self, streams: list[RequestStream], stop_ids: list[set[int]], control: _RowControl):
        self.streams = streams
        self.stop_ids = stop_ids
        self.control = control
        self.prompt_seen = False
        self.open = [True] * len(streams)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        step = self.control.step
        for i, token in enumerate(value.reshape(-1).tolist()):
            stream = self.streams[i]
            if not self.open[i]:
                continue
            if stream.cancelled:
                self.open[i] = False
                stream.finish("cancelled")
                continue
            request = stream.request
            if request.logprobs is None or step is None:
                stream.push([token], now)
            else:
                top = [step[1][i]] if request.logprobs and step[1] is not None else None
                if top is not None and request.logprobs < self.control.top:
                    top = [dict(list(top[0].items())[: request.logprobs])]
                stream.push([token], now, [step[0][i]], top)
            if len(stream.tokens) >= request.max_new_tokens:
                self.open[i] = False
            elif token in self.stop_ids[i]:
                self.open[i] = False
                stream.finish("stop")

    def end(self) -> None:
        pass


class _Done:
    """Stopping criterion: a row is done when its stream is (max_new_tokens reached, or EOS when not ignored)."""

    def __init__(self, streamer: _Streamer, engine: TorchEngine):
        self.streamer = streamer
        self.engine = engine

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.engine.kv_positions = input_ids.numel()  # the cache holds every row's positions, padding included
        return torch.tensor([not open_ for open_ in self.streamer.open], device=input_ids.device)


class TorchEngine(Engine):
    capabilities = Capabilities(
        sampling=True, penalties=True, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS, prompt_logprobs=True
    )

    def __init__(self, path: Path, manifest: Manifest):
        super().__init__(path, manifest)
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        dtype = getattr(torch, manifest.backend_info.get("dtype", "float32"))
        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(path / "model", dtype=dtype).eval()
        # Stopping is ours (the streamer and _Done): with the model's EOS left in, generate would pad a row after
        # EOS even when the request ignores EOS.
        self.model.generation_config.eos_token_id = None
        # Padding is masked, so any id the embedding has will do: an EOS id the vocabulary lacks (tiny and
        # re-vocabularied checkpoints keep their family's default) would fail the embedding lookup.
        vocab = self.model.get_input_embeddings().num_embeddings
        self.pad_id = next((i for i in self.eos_token_ids if 0 <= i < vocab), 0)
        self.kv_positions = 0
        """Positions the running batch's KV cache holds now (rows x current length, left padding included)."""

    def load(self) -> dict:
        """Requests running and waiting, and KV-cache use: the running batch's cached positions over the most the
        engine's limits allow (max_batch_size x max_seq_len); transformers' dynamic cache grows with the batch, so
        this is the share of the cache the limits would reach, not of a preallocated pool."""
        capacity = self.limits.max_batch_size * self.limits.max_seq_len
        return {**super().load(), "kv_cache_usage": min(1.0, self.kv_positions / capacity)}

    def _serve(self) -> None:
        pending: list[RequestStream] = []
        while not self._closed.is_set():
            pending += self._drain(block=not pending)
            if self._closed.is_set():
                break
            for stream in pending:
                if stream.cancelled:
                    stream.finish("cancelled")
            pending = [s for s in pending if not s.done]
            if not pending:
                continue
            batch, pending = pending[: self.limits.max_batch_size], pending[self.limits.max_batch_size :]
            try:
                self._generate(batch)
            except Exception as exc:  # one failed batch fails its requests, not the engine
                for stream in batch:
                    stream.finish("error", f"{type(exc).__name__}: {exc}")
        for stream in pending:
            stream.finish("cancelled")

    def _score_prompt(self, stream: RequestStream) -> None:
        """The log-probability of each prompt token given the ones before it (the first has none)."""
        import torch

        prompt = torch.tensor([stream.request.prompt])
        with torch.inference_mode():
            logits = self.model(input_ids=prompt).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(1, prompt[0, 1:, None])[:, 0].tolist()
        stream.prompt_logprobs = [None, *picked]
        k = stream.request.prompt_logprobs
        stream.prompt_top_logprobs = [None, *top_logprobs(logprobs, k)] if k else []

    def _generate(self, batch: list[RequestStream]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        for stream in batch:
            if stream.request.prompt_logprobs is not None:
                self._score_prompt(stream)

        longest = max(len(s.request.prompt) for s in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, stream in enumerate(batch):
            prompt = stream.request.prompt
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        # ignore_eos: EOS may be generated and generation goes on (as in TensorRT-LLM and OpenVINO); suppressing
        # EOS instead (min_new_tokens) would change the greedy tokens.
        stop_ids = [self.stop_ids(s.request) for s in batch]
        control = _RowControl(batch, stop_ids, ids.device)
        streamer = _Streamer(batch, stop_ids, control)
        config = GenerationConfig(
            max_new_tokens=max(s.request.max_new_tokens for s in batch), do_sample=False, pad_token_id=self.pad_id
        )
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    streamer=streamer,
                    logits_processor=LogitsProcessorList([control] if control.needed else []),
                    stopping_criteria=StoppingCriteriaList([_Done(streamer, self)]),
                )
        finally:
            self.kv_positions = 0  # the batch's cache is freed with it
        for stream in batch:
            stream.finish("length")  # no-op for those that already stopped at EOS
