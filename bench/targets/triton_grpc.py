"""Triton over gRPC bi-directional streaming (tritonclient), a decoupled model speaking the protocol."""

from __future__ import annotations

import queue
import threading
import time

from compactlm.bench.metrics import RequestRecord
from compactlm.bench.targets.base import (
    TRITON_FINAL,
    TRITON_IGNORE_EOS,
    TRITON_INPUT_IDS,
    TRITON_MAX_TOKENS,
    TRITON_MODEL,
    TRITON_OUTPUT_IDS,
    Done,
    Pending,
    Target,
    failed,
)
from compactlm.bench.workload import WorkloadItem
from compactlm.core.errors import CompactLMError


class _GrpcSlot:
    """One gRPC client with its own stream, serving one request at a time (Triton's stream errors carry no id)."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.broken = False
        self.times: list[float] = []
        self.done = threading.Event()
        self.error: str | None = None
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result, error) -> None:
        now = time.perf_counter()
        if error is not None:
            self.error = str(error)
            self.broken = True  # a fresh stream for the next request: this one may be dead
            self.done.set()
            return
        ids = result.as_numpy(TRITON_OUTPUT_IDS)
        if ids is not None and ids.size:
            self.times.extend([now] * int(ids.size))
        final = result.get_response().parameters.get(TRITON_FINAL)
        if final is not None and final.bool_param:
            self.done.set()

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
        except Exception:  # closing a broken channel must not hide the run's results
            pass


class _GrpcPending(Pending):
    def __init__(self, target: TritonGrpcTarget, slot: _GrpcSlot, item: WorkloadItem, submitted: float):
        self.target, self.slot, self.item, self.submitted = target, slot, item, submitted
        self._record: RequestRecord | None = None

    def result(self, timeout: float | None = None) -> RequestRecord:
        if self._record is None:
            slot = self.slot
            if not slot.done.wait(timeout):
                slot.broken = True
                slot.error = f"no end within {timeout} s"
            times = list(slot.times)
            if slot.error:
                self._record = failed(self.item, self.submitted, slot.error, times)
            else:
                self._record = RequestRecord(
                    self.item.task_id, self.item.input_len, self.item.output_tokens, self.submitted, times
                )
            self.target._release(slot)
        return self._record


class TritonGrpcTarget(Target):
    """Triton over gRPC bi-directional streaming (tritonclient), a decoupled model speaking the protocol above."""

    kind = "triton-grpc"

    def __init__(
        self,
        url: str,
        model: str = TRITON_MODEL,
        *,
        vocab_size: int | None = None,
        tokenizer=None,
        name: str | None = None,
    ):
        try:
            import tritonclient.grpc  # noqa: F401
        except ImportError as exc:
            raise CompactLMError(
                "Triton gRPC targets need tritonclient: pip install 'tritonclient[grpc]==2.73.0'"
            ) from exc
        super().__init__(name or model)
        self.url, self.model = url, model
        self.vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        self._tokenizer = tokenizer
        self._idle: queue.SimpleQueue[_GrpcSlot] = queue.SimpleQueue()
        self._slots: list[_GrpcSlot] = []
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        return self._tokenizer

    def _take(self) -> _GrpcSlot:
        try:
            slot = self._idle.get_nowait()
        except queue.Empty:  # a fresh slot is clean (and its stream may already have reported a failure)
            slot = _GrpcSlot(self.url)
            with self._lock:
                self._slots.append(slot)
            return slot
        slot.times, slot.error = [], None
        slot.done.clear()
        return slot

    def _release(self, slot: _GrpcSlot) -> None:
        if slot.broken:
            slot.close()
        else:
            self._idle.put(slot)

    def submit(self, item: WorkloadItem) -> Pending:
        import numpy as np
        import tritonclient.grpc as grpcclient

        submitted = time.perf_counter()
        try:
            slot = self._take()
            tensors = {
                TRITON_INPUT_IDS: (np.asarray(item.input_ids, dtype=np.int32), "INT32"),
                TRITON_MAX_TOKENS: (np.asarray([item.output_tokens], dtype=np.int32), "INT32"),
                TRITON_IGNORE_EOS: (np.asarray([True]), "BOOL"),
            }
            inputs = []
            for name, (array, dtype) in tensors.items():
                tensor = grpcclient.InferInput(name, list(array.shape), dtype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            slot.client.async_stream_infer(
                self.model,
                inputs,
                request_id=str(item.task_id),
                outputs=[grpcclient.InferRequestedOutput(TRITON_OUTPUT_IDS)],
                enable_empty_final_response=True,
            )
        except Exception as exc:  # the server is gone: this request fails, the run goes on
            error = f"{type(exc).__name__}: {exc}"
            if "slot" in locals():
                if slot.done.wait(1.0) and slot.error:  # the stream's own error says why (e.g. unavailable)
                    error = slot.error
                slot.broken = True
                self._release(slot)
            return Done(failed(item, submitted, error))
        return _GrpcPending(self, slot, item, submitted)

    def describe(self) -> dict:
        return {**super().describe(), "model": self.name, "backend": self.kind, "url": self.url}

    def close(self) -> None:
        with self._lock:
            for slot in self._slots:
                slot.close()
            self._slots.clear()
