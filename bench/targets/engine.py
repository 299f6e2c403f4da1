"""In-process engines, through the runtime interface (compactlm.engines.runtime)."""

from __future__ import annotations

import time
from pathlib import Path

from compactlm.bench.metrics import RequestRecord
from compactlm.bench.targets.base import Done, Pending, Target, failed
from compactlm.bench.workload import WorkloadItem


class _EnginePending(Pending):
    def __init__(self, item: WorkloadItem, stream):
        self.item, self.stream = item, stream

    def result(self, timeout: float | None = None) -> RequestRecord:
        try:
            done = self.stream.result(timeout)
        except TimeoutError as exc:
            return failed(self.item, self.stream.submitted, str(exc), self.stream.token_times)
        error = done.error
        if error is None and done.finish_reason in ("error", "cancelled"):
            error = f"the engine {done.finish_reason} the request"
        return RequestRecord(
            self.item.task_id,
            done.prompt_len,
            self.item.output_tokens,
            done.submitted,
            done.token_times,
            error=error,
            finish_reason=done.finish_reason,
        )


class EngineTarget(Target):
    """An engine in this process, through the runtime interface; token times are stamped by the engine's worker."""

    kind = "engine"

    def __init__(self, engine, name: str | None = None, close_engine: bool = True):
        from compactlm.engines.runtime import Request

        self._request = Request
        self.engine = engine
        self.limits = engine.limits
        manifest = engine.manifest
        self.vocab_size = manifest.model.get("vocab_size")
        self.eos_token_ids = tuple(engine.eos_token_ids)
        self._close_engine = close_engine
        super().__init__(name or _model_name(manifest))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def submit(self, item: WorkloadItem) -> Pending:
        try:
            stream = self.engine.submit(self._request(item.input_ids, item.output_tokens, ignore_eos=True))
        except Exception as exc:  # a dead or closed engine: this request fails, the run goes on
            return Done(failed(item, time.perf_counter(), f"{type(exc).__name__}: {exc}"))
        return _EnginePending(item, stream)

    def describe(self) -> dict:
        m = self.engine.manifest
        record = m.source.get("record") or {}
        return {
            **super().describe(),
            "model": self.name,
            "backend": m.backend,
            "precision": m.precision,
            "model_family": m.model.get("family"),
            "model_params": m.model.get("params"),
            "model_layers": m.model.get("num_layers"),
            "model_hidden": m.model.get("hidden_size"),
            "model_ffn": m.model.get("ffn_hidden_size"),
            "source_path": m.source.get("path"),
            "source_sha256": m.source.get("sha256"),
            "source_parent": record.get("parent"),
            "source_history": " > ".join(str(h.get("op")) for h in record.get("history", []) if isinstance(h, dict)),
            "engine_path": str(self.engine.path),
            "engine_created": m.created,
            "engine_max_batch_size": m.limits.max_batch_size,
            "engine_max_seq_len": m.limits.max_seq_len,
            "tp_size": m.tp_size,
        }

    def close(self) -> None:
        if self._close_engine:
            self.engine.close()


def _model_name(manifest) -> str:
    path = manifest.source.get("path") if isinstance(manifest.source, dict) else None
    return Path(path).name if path else manifest.backend
