"""The `torch` backend: plain transformers `generate`, the reference and the baseline a user would reach for.

Build copies the checkpoint's weights (in the chosen dtype) into the engine folder. Run: static batching, as
with `generate` in a user's own loop: queued requests are taken together (up to max_batch_size), left-padded,
generated in one call, and the next batch starts when the whole batch is done. A streamer reads each step's
tokens with their time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError
from compactlm.engines.backend import Backend
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Engine, RequestStream

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


class _Streamer:
    """transformers calls put() with the prompt first, then with each step's new tokens ([batch])."""

    def __init__(self, streams: list[RequestStream], eos: set[int]):
        self.streams = streams
        self.eos = eos
        self.prompt_seen = False
        self.open = [True] * len(streams)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for i, token in enumerate(value.reshape(-1).tolist()):
            stream = self.streams[i]
            if not self.open[i]:
                continue
            stream.push([token], now)
            if len(stream.tokens) >= stream.request.max_new_tokens:
                self.open[i] = False
            elif not stream.request.ignore_eos and token in self.eos:
                self.open[i] = False
                stream.finish("stop")

    def end(self) -> None:
        pass


class _Done:
    """Stopping criterion: a row is done when its stream is (max_new_tokens reached, or EOS when not ignored)."""

    def __init__(self, streamer: _Streamer):
        self.streamer = streamer

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([not open_ for open_ in self.streamer.open], device=input_ids.device)


class TorchEngine(Engine):
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
        self.pad_id = self.eos_token_ids[0] if self.eos_token_ids else 0

    def _serve(self) -> None:
        pending: list[RequestStream] = []
        while not self._closed.is_set():
            pending += self._drain(block=not pending)
            if self._closed.is_set():
                break
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

    def _generate(self, batch: list[RequestStream]) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        longest = max(len(s.request.prompt) for s in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, stream in enumerate(batch):
            prompt = stream.request.prompt
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        # ignore_eos: EOS may be generated and generation goes on (as in TensorRT-LLM and OpenVINO); suppressing
        # EOS instead (min_new_tokens) would change the greedy tokens.
        streamer = _Streamer(batch, set(self.eos_token_ids))
        config = GenerationConfig(
            max_new_tokens=max(s.request.max_new_tokens for s in batch), do_sample=False, pad_token_id=self.pad_id
        )
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Done(streamer)]),
            )
        for stream in batch:
            stream.finish("length")  # no-op for those that already stopped at EOS
