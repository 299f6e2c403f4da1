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
from compactlm.core.host import rss_bytes
from compactlm.engines.backend import Backend
from compactlm.engines.backends.openvino.worker import (
    Step,
    Stepper,
    WorkerStepper,
    import_genai,
    make_pipeline,
)
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
        import_genai()

    takes_draft = True

    def check_model(self, model_config, config: BuildConfig) -> None:
        if config.tp_size != 1:
            raise CompactLMError("the cpu backend runs on one device: tp_size must be 1")
        if config.precision == "int4":
            from compactlm.engines.backends.openvino.export import int4_group_size

            int4_group_size(model_config)
        if config.draft is not None:
            from compactlm.engines.backends.openvino.draft import check_draft_checkpoint

            draft = check_draft_checkpoint(model_config, config)
            if config.precision == "int4":
                int4_group_size(draft.config)

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
        if config.draft is not None:
            from compactlm.engines.backends.openvino.draft import build_draft, check_draft_checkpoint

            draft = check_draft_checkpoint(checkpoint.config, config)
            texts = calibration_texts(draft, config) if weight_format == "int4" else None
            info["draft"] = build_draft(draft, out, weight_format, config, texts, fuse)
        return info

    load_options = ("recycle", "recycle_above_mb", "draft", "draft_tokens", "max_num_tokens")

    def load(
        self,
        path: Path,
        manifest: Manifest,
        recycle: bool = False,
        recycle_above_mb: int | None = None,
        draft: str | Path | None = None,
        draft_tokens: int | None = None,
        max_num_tokens: int | None = None,
    ):
        return OpenVINOEngine(
            path,
            manifest,
            recycle=recycle,
            recycle_above_mb=recycle_above_mb,
            draft=draft,
            draft_tokens=draft_tokens,
            max_num_tokens=max_num_tokens,
        )


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

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        scheduler: dict | None = None,
        properties: dict | None = None,
        recycle: bool = False,
        recycle_slack_mb: int = 256,
        recycle_above_mb: int | None = None,
        draft: str | Path | None = None,
        draft_tokens: int | None = None,
        max_num_tokens: int | None = None,
    ):
        """`max_num_tokens`: the step budget to run with instead of the one built (`Limits.with_step_budget`)."""
        from compactlm.engines.backends.openvino.draft import resolve_draft

        super().__init__(path, manifest)
        if max_num_tokens is not None:
            self.limits = self.limits.with_step_budget(max_num_tokens)
        import_genai()
        info = manifest.backend_info
        self.properties = {**info.get("properties", {}), **(properties or {})}
        self.draft = resolve_draft(self.path, manifest, self.properties, draft, draft_tokens)
        """The speculative-decoding draft the pipeline runs with (None: none)."""
        kv = str(self.properties.get("KV_CACHE_PRECISION", "u8"))
        self.scheduler = {
            "enable_prefix_caching": False,
            "max_num_seqs": self.limits.max_batch_size,
            "max_num_batched_tokens": self.limits.max_num_tokens,
            "dynamic_split_fuse": True,
            "cache_size": kv_cache_gb(manifest.model, self.limits, kv),
            **(scheduler or {}),
        }
        self.recycle = recycle
        self.recycles = 0
        """How many times the worker process was replaced."""
        self.handovers = 0
        """How many of those replacements happened under load (a new worker loaded beside the busy one)."""
        self.recycle_above = 0
        """The worker's RSS beyond which it is replaced when idle: `recycle_above_mb`, else its RSS once loaded plus
        the whole KV cache (which the pipeline touches as requests use it) plus `recycle_slack_mb`."""
        self._slack = recycle_slack_mb << 20
        self._above = None if recycle_above_mb is None else recycle_above_mb << 20
        self._pending: WorkerStepper | None = None  # a replacement loading beside a busy worker
        self._draining: tuple | None = None  # (old worker, its streams) finishing after a replacement took over
        self._replace_failed = False
        self._stepper = self._start()

    def _start(self, wait: bool = True):
        model_dir = str(self.path / "model")
        if self.recycle:
            stepper = WorkerStepper(model_dir, self.scheduler, self.properties, self.draft, wait=wait)
            if wait:
                self._bound(stepper)
            return stepper
        _, genai = import_genai()
        try:
            pipe = make_pipeline(genai, model_dir, self.scheduler, self.properties, self.draft)
        except RuntimeError as exc:
            raise CompactLMError(
                f"OpenVINO could not load the engine in {self.path}: {str(exc).splitlines()[0]}"
            ) from exc
        _PIPELINES.append(pipe)
        return Stepper(pipe)

    def _bound(self, stepper: WorkerStepper) -> None:
        """The RSS beyond which a worker that has just loaded (and becomes the current one) will be replaced."""
        default = stepper.ready_rss + self.scheduler["cache_size"] * 10**9 + self._slack
        self.recycle_above = default if self._above is None else self._above

    @property
    def pipeline(self):
        """The in-process pipeline (for benchmarks that call OpenVINO GenAI's own API on it)."""
        if not isinstance(self._stepper, Stepper):
            raise CompactLMError("this engine runs its pipeline in a worker process")
        return self._stepper.pipe

    @property
    def worker(self) -> WorkerStepper | None:
        """The worker process running the pipeline now (None in process): its pid, RSS and step timings."""
        return self._stepper if isinstance(self._stepper, WorkerStepper) else None

    def memory(self) -> int:
        """Resident bytes of this process and, when recycled, of its worker processes (two during a replacement)."""
        workers = (self._stepper, self._pending, self._draining[0] if self._draining else None)
        return rss_bytes() + sum(w.rss for w in workers if isinstance(w, WorkerStepper))

    def _settings(self, request) -> dict:
        """The request's OpenVINO GenerationConfig fields."""
        settings = {
            "max_new_tokens": request.max_new_tokens,
            "ignore_eos": request.ignore_eos,
            "min_new_tokens": min(request.min_new_tokens, request.max_new_tokens),
            "do_sample": False,
        }
        if self.eos_token_ids:
            settings["eos_token_id"] = self.eos_token_ids[0]
        stop = self.stop_ids(request) or set(self.eos_token_ids)
        if stop:
            settings["stop_token_ids"] = set(stop)
        sampling = request.sampling
        if sampling is not None:
            settings |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.top_k:
                settings["top_k"] = sampling.top_k
            if sampling.seed is not None:
                settings["rng_seed"] = sampling.seed % (1 << 32)
            settings["presence_penalty"] = sampling.presence_penalty
            settings["frequency_penalty"] = sampling.frequency_penalty
        if request.logprobs is not None:
            settings["logprobs"] = 1
        if self.draft is not None:
            settings["num_assistant_tokens"] = self.draft.tokens
        return settings

    def _serve(self) -> None:
        active: dict[int, object] = {}  # request id -> stream, on the current stepper
        while True:
            self._swap_if_ready(active)
            draining = self._draining[1] if self._draining else {}
            for stream in self._drain(block=not active and not draining):
                if isinstance(self._stepper, WorkerStepper) and not self._stepper.alive:
                    self._stepper.close()
                    self._stepper = self._start()  # the worker died: a fresh one for what comes next
                self._stepper.add(stream.request.id, list(stream.request.prompt), self._settings(stream.request))
                active[stream.request.id] = stream
            lanes = [(self._stepper, active)] + ([self._draining] if self._draining else [])
            if self._closed.is_set():
                for stepper, streams in lanes:
                    for request_id, stream in streams.items():
                        stepper.cancel(request_id)
                        stream.finish("cancelled")
                if self._pending is not None:
                    self._pending.close()
                return
            for stepper, streams in lanes:
                for request_id, stream in list(streams.items()):
                    if stream.cancelled:  # its client left: free its slot and its KV cache now
                        stepper.cancel(request_id)
                        stream.finish("cancelled")
                        del streams[request_id]
            lanes = [(stepper, streams) for stepper, streams in lanes if streams]
            if len(lanes) == 2:  # the old worker finishes its requests while the new one runs the newer ones
                for stepper, _ in lanes:
                    stepper.send_step()
                for stepper, streams in lanes:
                    self._deliver(stepper.read_step(), streams)
            elif lanes:
                self._deliver(lanes[0][0].step(), lanes[0][1])
            if self._draining and not self._draining[1]:
                self._draining[0].close()
                self._draining = None
                self.recycles += 1
                self.handovers += 1
            self._maybe_recycle(busy=bool(active))

    def _deliver(self, step: Step, active: dict) -> None:
        now = time.perf_counter()
        if step.metrics is not None:
            self._metrics = step.metrics
        for request_id, ids, logprobs in step.events:
            stream = active.get(request_id)
            if stream is None:
                continue
            if stream.request.logprobs is None or logprobs is None:
                stream.push(ids, now)
            else:
                top = [{t: p} for t, p in zip(ids, logprobs, strict=False)]
                stream.push(ids, now, logprobs, top if stream.request.logprobs else None)
        for request_id, reason, error in step.finished:
            stream = active.pop(request_id, None)
            if stream is not None:
                stream.finish(reason, error)

    def _maybe_recycle(self, busy: bool) -> None:
        """Replace a worker grown past `recycle_above`. Idle: at once (requests that arrive meanwhile wait for the new
        one to load). Busy: a new worker loads beside it, takes the requests that come once it is ready, and the old
        one exits when it has finished its own (memory holds both for that while)."""
        stepper = self._stepper
        if not isinstance(stepper, WorkerStepper) or stepper.rss <= self.recycle_above or self._draining:
            return
        if not busy and self._inbox.empty():
            fresh, self._pending = self._pending, None
            try:
                fresh = fresh if fresh is not None and fresh.ready(timeout=300) else None
            except CompactLMError:  # the replacement that was loading failed: a fresh try below
                fresh = None
            stepper.close()
            if fresh is not None:
                self._bound(fresh)
            self._stepper = fresh or self._start()
            self.recycles += 1
        elif self._pending is None and not self._replace_failed:
            self._pending = self._start(wait=False)

    def _swap_if_ready(self, active: dict) -> None:
        """A replacement worker that has loaded becomes the current one; the old one is drained."""
        if self._pending is None or self._draining:
            return
        try:
            ready = self._pending.ready()
        except CompactLMError:  # it could not load: keep the old worker, and do not try again while busy
            self._pending, self._replace_failed = None, True
            return
        if ready:
            self._draining = (self._stepper, dict(active))
            active.clear()
            self._stepper, self._pending = self._pending, None
            self._bound(self._stepper)

    def load(self) -> dict:
        """Running and waiting requests and KV-cache use, as the pipeline reported them after its last step."""
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return super().load()
        scheduled, requests, cache_usage = metrics
        queued = self._inbox.qsize()
        return {
            "running": scheduled,
            "waiting": max(0, requests - scheduled) + queued,
            "kv_cache_usage": cache_usage / 100.0,
        }

    def _release(self) -> None:
        for stepper in (self._stepper, self._pending, self._draining and self._draining[0]):
            if isinstance(stepper, WorkerStepper):
                stepper.close()
        self._stepper = self._pending = self._draining = None
