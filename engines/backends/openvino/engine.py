"""The `cpu` backend, the embedded default: OpenVINO GenAI's continuous-batching pipeline.

Build: optimum-intel exports the checkpoint to OpenVINO IR (stateful KV cache; int8/int4 weights compressed by
NNCF) in its own venv (engines/backends/openvino/export.py). Run: `ContinuousBatchingPipeline` with paged attention; our
worker adds requests between steps (continuous batching: a new request joins the running batch at the next step)
and reads each request's new tokens after every step, which gives per-token timestamps.

Precisions (weights / compute / KV cache):
  fp32  fp32 / f32  / f32  exact: greedy tokens match transformers
  bf16  fp32 / bf16 / u8   OpenVINO's own CPU default on AVX-512-bf16/AMX CPUs
  int8  int8 per-channel (NNCF, data-free) / bf16 / u8
  int4  int4 symmetric, groups of 64 (NNCF AWQ + scale estimation on calibration text; embeddings int8) / bf16 / u8
With int8/int4 weights each layer's q/k/v projections are fused into one matmul after export
(engines/backends/openvino/fuse.py: exact; one decompressing kernel instead of three); with fp32 weights the fused graph
measured slower at batch 32 and the stock graph is kept. The prefix cache is off: a benchmark must pay for every
prompt's prefill.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError
from compactlm.engines.backend import Backend
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Capabilities, Engine

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint

PRECISIONS = {
    # precision: (exported weight format, runtime properties)
    "fp32": ("fp32", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}),
    "bf16": ("fp32", {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "u8"}),
    "int8": ("int8", {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "u8"}),
    "int4": ("int4", {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "u8"}),
}
KV_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1}
FUSED_BY_DEFAULT = ("int8", "int4")
"""Weight formats whose q/k/v matmuls are fused unless BuildConfig.fuse_qkv says otherwise.
compactlm.bench.perf.cpu_engine, SmolLM2-135M, fused vs stock at batch 1 / 32: int8 +7.2% / -0.5%, int4 +10.0% /
+1.9% (docs/bench/cpu_engine.json) and +8.8% / +8.1% (an earlier run); fp32 weights +0.7% / -7.8%
(docs/bench/cpu_engine-fp32-fused.json), so fp32 and bf16 keep the stock graph."""


def fuses_qkv(precision: str, fuse_qkv: bool | None = None) -> bool:
    return fuse_qkv if fuse_qkv is not None else PRECISIONS[precision][0] in FUSED_BY_DEFAULT


_PIPELINES: list = []
"""Every pipeline made in this process, kept until exit: with openvino-genai 2026.4, once a
ContinuousBatchingPipeline has been destroyed, the next signal the process gets (Ctrl-C, SIGTERM) kills it with a
segmentation fault. A closed engine therefore keeps its pipeline's memory until the process ends."""


def _import_genai():
    try:
        import openvino as ov
        import openvino_genai as genai
    except ImportError as exc:
        raise CompactLMError(
            f"the cpu backend needs openvino and openvino-genai ({exc}); `pip install -e .` installs them"
        ) from exc
    return ov, genai


def kv_cache_gb(model: dict, limits, kv_precision: str) -> int:
    """KV cache for max_batch_size sequences of max_seq_len tokens, in whole GB (what SchedulerConfig takes)."""
    per_token = 2 * model["num_layers"] * model["num_query_groups"] * model["head_dim"] * KV_BYTES[kv_precision]
    total = per_token * limits.max_batch_size * limits.max_seq_len * 1.1  # paging slack
    return max(1, math.ceil(total / 1e9))


class CpuBackend(Backend):
    name = "cpu"
    precisions = tuple(PRECISIONS)
    default_precision = "fp32"
    description = "OpenVINO GenAI continuous batching on the CPU (the embedded default)"

    def check_available(self, config: BuildConfig) -> None:
        _import_genai()

    def check_model(self, model_config, config: BuildConfig) -> None:
        if config.tp_size != 1:
            raise CompactLMError("the cpu backend runs on one device: tp_size must be 1")
        if config.precision == "int4":
            from compactlm.engines.backends.openvino.export import int4_group_size

            int4_group_size(model_config)

    def build(self, checkpoint: Checkpoint, out: Path, config: BuildConfig) -> dict:
        from compactlm.engines.backends.openvino.export import export_openvino
        from compactlm.engines.backends.openvino.fuse import fuse_ir

        weight_format, properties = PRECISIONS[config.precision]
        calibration = calibration_texts(checkpoint, config) if weight_format == "int4" else None
        info = export_openvino(checkpoint.path, out / "model", weight_format, checkpoint.config, calibration)
        if weight_format == "int4" and not calibration:
            info["int4_method"] = "data-free (the checkpoint has no tokenizer to read calibration text with)"
        fuse = fuses_qkv(config.precision, config.fuse_qkv)
        info["fused_qkv_layers"] = fuse_ir(out / "model" / "openvino_model.xml")["groups"] if fuse else 0
        info["properties"] = properties
        info["prefix_caching"] = False
        return info

    def load(self, path: Path, manifest: Manifest) -> Engine:
        return OpenVINOEngine(path, manifest)


def calibration_texts(checkpoint: Checkpoint, config: BuildConfig) -> list[str] | None:
    """calib_samples x calib_seq_len tokens of the calibration corpus's train split, as text (AWQ tokenizes it)."""
    if not checkpoint.has_tokenizer:
        return None
    from compactlm.compress.checkpoint import load_tokenizer
    from compactlm.compress.data import load_sequences

    tokenizer = load_tokenizer(checkpoint)
    rows = load_sequences(
        config.calib_dataset, tokenizer, num_sequences=config.calib_samples, seq_len=config.calib_seq_len, split="train"
    )
    return [tokenizer.decode(row) for row in rows.tolist()]


class OpenVINOEngine(Engine):
    # OpenVINO GenAI samples per request (seeded), applies OpenAI's penalties, and returns the chosen token's
    # log-probability only ("any logprobs > 1 is treated as 1"); it cannot score a prompt.
    capabilities = Capabilities(sampling=True, penalties=True, logprobs=True, top_logprobs=0)

    def __init__(self, path: Path, manifest: Manifest, scheduler: dict | None = None, properties: dict | None = None):
        super().__init__(path, manifest)
        ov, genai = _import_genai()
        self._ov, self._genai = ov, genai
        info = manifest.backend_info
        self.properties = {**info.get("properties", {}), **(properties or {})}
        kv = str(self.properties.get("KV_CACHE_PRECISION", "u8"))
        config = genai.SchedulerConfig()
        config.enable_prefix_caching = False
        config.max_num_seqs = self.limits.max_batch_size
        config.max_num_batched_tokens = self.limits.max_num_tokens
        config.dynamic_split_fuse = True
        config.cache_size = kv_cache_gb(manifest.model, self.limits, kv)
        for key, value in (scheduler or {}).items():
            setattr(config, key, value)
        self.scheduler = config
        try:
            self._pipe = genai.ContinuousBatchingPipeline(str(path / "model"), config, "CPU", self.properties)
            _PIPELINES.append(self._pipe)
        except RuntimeError as exc:
            raise CompactLMError(f"OpenVINO could not load the engine in {path}: {str(exc).splitlines()[0]}") from exc

    def _generation_config(self, request):
        config = self._genai.GenerationConfig()
        config.max_new_tokens = request.max_new_tokens
        config.ignore_eos = request.ignore_eos
        config.min_new_tokens = min(request.min_new_tokens, request.max_new_tokens)
        config.do_sample = False
        if self.eos_token_ids:
            config.eos_token_id = self.eos_token_ids[0]
        stop = self.stop_ids(request) or set(self.eos_token_ids)
        if stop:
            config.stop_token_ids = stop
        sampling = request.sampling
        if sampling is not None:
            config.do_sample = True
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            if sampling.top_k:
                config.top_k = sampling.top_k
            if sampling.seed is not None:
                config.rng_seed = sampling.seed % (1 << 32)
            config.presence_penalty = sampling.presence_penalty
            config.frequency_penalty = sampling.frequency_penalty
        if request.logprobs is not None:
            config.logprobs = 1
        return config

    def _serve(self) -> None:
        import numpy as np

        genai = self._genai
        finished = genai.GenerationStatus.FINISHED
        running = (genai.GenerationStatus.RUNNING, finished)
        stop = genai.GenerationFinishReason.STOP
        active: dict[int, tuple] = {}
        while True:
            for stream in self._drain(block=not active):
                request = stream.request
                ids = self._ov.Tensor(np.asarray([request.prompt], dtype=np.int64))
                try:
                    handle = self._pipe.add_request(request.id, ids, self._generation_config(request))
                except RuntimeError as exc:
                    stream.finish("error", str(exc).splitlines()[0])
                    continue
                active[request.id] = (handle, stream, ["length"])
            if self._closed.is_set():
                for handle, stream, _ in active.values():
                    handle.cancel()
                    stream.finish("cancelled")
                return
            if not active:
                continue
            for request_id, (handle, stream, _) in list(active.items()):
                if stream.cancelled:  # its client left: free its slot and its KV cache now
                    handle.cancel()
                    stream.finish("cancelled")
                    del active[request_id]
            if not active:
                continue
            self._pipe.step()
            now = time.perf_counter()
            self._metrics = self._pipe.get_metrics()
            for request_id, (handle, stream, reason) in list(active.items()):
                if handle.can_read():
                    for output in handle.read().values():
                        if stream.request.logprobs is None:
                            stream.push(output.generated_ids, now)
                        else:
                            logprobs = list(output.generated_log_probs)
                            top = [{t: p} for t, p in zip(output.generated_ids, logprobs, strict=False)]
                            stream.push(output.generated_ids, now, logprobs, top if stream.request.logprobs else None)
                        if output.finish_reason == stop:
                            reason[0] = "stop"
                status = handle.get_status()
                if status not in running:
                    stream.finish("error", f"OpenVINO dropped the request ({status.name})")
                    del active[request_id]
                elif status == finished:
                    stream.finish(reason[0])
                    del active[request_id]

    def load(self) -> dict:
        """Running and waiting requests and KV-cache use, as the pipeline reported them after its last step."""
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return super().load()
        queued = self._inbox.qsize()
        return {
            "running": metrics.scheduled_requests,
            "waiting": max(0, metrics.requests - metrics.scheduled_requests) + queued,
            "kv_cache_usage": metrics.cache_usage / 100.0,
        }

    def _release(self) -> None:
        self._pipe = None
