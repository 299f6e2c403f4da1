"""Stepping OpenVINO GenAI's continuous-batching pipeline, in this process or in a worker process that the engine
recycles.

`Stepper` adds requests to the pipeline, steps it and reports what each request produced; the engine's loop
(engine.py) turns that into token streams. `WorkerStepper` offers the same three calls for a pipeline that lives in
a child process (a fresh interpreter talking pickles over a socket pair, told by the kernel to die with its
parent; not multiprocessing's spawn, which re-runs the caller's main script), so that the engine can replace the process
when it has grown: openvino-genai 2026.4's pipeline keeps memory for every request it served (~23 KiB each on a
tiny model, without a plateau), and destroying a pipeline inside a process makes that process segfault at its next
signal, so a fresh process is the only way to give the memory back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from compactlm.core.errors import CompactLMError
from compactlm.core.host import rss_bytes

Event = tuple[int, list[int], "list[float] | None"]
"""(request id, new token ids, their log-probabilities or None)"""
Finish = tuple[int, str, "str | None"]
"""(request id, finish reason: stop | length | error, error message)"""


@dataclass(frozen=True)
class Step:
    events: list[Event]
    finished: list[Finish]
    metrics: tuple[int, int, float] | None = None
    """(scheduled requests, requests, KV-cache use in %) after the step, as the pipeline reports them."""
    seconds: float = 0.0
    """Time the step took where the pipeline runs (the pipeline's step and reading its outputs)."""


def import_genai():
    try:
        import openvino as ov
        import openvino_genai as genai
    except ImportError as exc:
        raise CompactLMError(
            f"the cpu backend needs openvino and openvino-genai ({exc}); `pip install -e .` installs them"
        ) from exc
    return ov, genai


def make_pipeline(genai, model_dir: str, scheduler: dict, properties: dict, draft=None):
    """The pipeline; `draft` (engines/backends/openvino/draft.py's Draft) adds a speculative-decoding draft model."""
    config = genai.SchedulerConfig()
    for key, value in scheduler.items():
        setattr(config, key, value)
    if draft is not None:
        properties = {**properties, "draft_model": genai.draft_model(draft.model_dir, "CPU", **draft.properties)}
    return genai.ContinuousBatchingPipeline(model_dir, config, "CPU", properties)


class Stepper:
    """A pipeline in this process: `add`, `cancel`, `step`."""

    def __init__(self, pipe):
        self._ov, self._genai = import_genai()
        self.pipe = pipe
        self._handles: dict[int, tuple] = {}  # id -> (handle, wants logprobs, [finish reason])
        self._failed: list[Finish] = []

    def add(self, request_id: int, prompt: list[int], settings: dict) -> None:
        import numpy as np

        config = self._genai.GenerationConfig()
        for key, value in settings.items():
            setattr(config, key, value)
        ids = self._ov.Tensor(np.asarray([prompt], dtype=np.int64))
        try:
            handle = self.pipe.add_request(request_id, ids, config)
        except RuntimeError as exc:
            self._failed.append((request_id, "error", str(exc).splitlines()[0]))
            return
        self._handles[request_id] = (handle, "logprobs" in settings, ["length"])

    def cancel(self, request_id: int) -> None:
        entry = self._handles.pop(request_id, None)
        if entry is not None:
            entry[0].cancel()

    @property
    def active(self) -> bool:
        return bool(self._handles or self._failed)

    def step(self) -> Step:
        genai = self._genai
        finished_status = genai.GenerationStatus.FINISHED
        running = (genai.GenerationStatus.RUNNING, finished_status)
        stop = genai.GenerationFinishReason.STOP
        started = time.perf_counter()
        finished, self._failed = self._failed, []
        if self._handles:
            self.pipe.step()
        events: list[Event] = []
        for request_id, (handle, logprobs, reason) in list(self._handles.items()):
            if handle.can_read():
                for output in handle.read().values():
                    if output.finish_reason == stop:
                        reason[0] = "stop"
                    probs = list(output.generated_log_probs) if logprobs else None
                    events.append((request_id, list(output.generated_ids), probs))
            status = handle.get_status()
            if status not in running:
                finished.append((request_id, "error", f"OpenVINO dropped the request ({status.name})"))
                del self._handles[request_id]
            elif status == finished_status:
                finished.append((request_id, reason[0], None))
                del self._handles[request_id]
        m = self.pipe.get_metrics()
        return Step(events, finished, (m.scheduled_requests, m.requests, m.cache_usage), time.perf_counter() - started)


def _child(fd: int) -> None:
    """The worker process: build the pipeline, then add/cancel/step on the parent's messages until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    conn = Connection(fd)
    model_dir, scheduler, properties, draft = conn.recv()
    _, genai = import_genai()
    try:
        stepper = Stepper(make_pipeline(genai, model_dir, scheduler, properties, draft))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        return
    conn.send(("ready", rss_bytes()))
    while True:  # in lock-step with the parent: it asks for each step, and does its own work while none runs
        message = conn.recv()
        if message[0] == "add":
            stepper.add(*message[1:])
        elif message[0] == "cancel":
            stepper.cancel(message[1])
        elif message[0] == "step":
            conn.send(("step", stepper.step(), rss_bytes()))
        elif message[0] == "close":
            os._exit(0)  # never destroy the pipeline (see the module's docstring): the process just ends


class WorkerStepper:
    """The pipeline in a worker process: the same `add`, `cancel`, `step` as `Stepper`, plus the worker's memory."""

    def __init__(
        self, model_dir: str, scheduler: dict, properties: dict, draft=None, timeout: float = 300, wait: bool = True
    ):
        """Start the worker; with `wait`, return once it has loaded the engine, else `ready()` says when it has."""
        from compactlm.core import procs

        ours, theirs = socket.socketpair()
        code = f"from compactlm.engines.backends.openvino.worker import _child; _child({theirs.fileno()})"
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-c", code],
            pass_fds=(theirs.fileno(),),
            preexec_fn=procs._die_with_parent if procs._PRCTL is not None else None,  # noqa: PLW1509
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._sent: set[int] = set()
        self._conn.send((model_dir, scheduler, properties, draft))
        self.steps, self.step_seconds, self.wait_seconds = 0, 0.0, 0.0
        """Steps run, seconds the worker spent in them, seconds the parent waited for them (the difference is what
        the process boundary costs: messages and wake-ups)."""
        self._asked = 0.0
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self.ready_rss = self.rss = 0
        self._ready = False
        if wait:
            self.ready(timeout)

    def ready(self, timeout: float = 0) -> bool:
        """Whether the worker has loaded the engine (waiting up to `timeout` s); a failed or late load raises."""
        if self._ready:
            return True
        if not self._conn.poll(max(0.0, min(timeout, self._deadline - time.monotonic()))):
            if time.monotonic() < self._deadline:
                return False
            self.close()
            raise CompactLMError(f"the OpenVINO worker did not load the engine within {self._timeout:.0f} s")
        kind, value = self._receive()
        if kind != "ready":
            self.close()
            raise CompactLMError(f"OpenVINO could not load the engine in its worker process: {value}")
        self.ready_rss = self.rss = int(value)
        self._ready = True
        return True

    @property
    def pid(self) -> int:
        return self._process.pid

    def _receive(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            try:
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            return ("died", f"the OpenVINO worker process died (exit code {code})")

    def add(self, request_id: int, prompt: list[int], settings: dict) -> None:
        self._sent.add(request_id)
        try:
            self._conn.send(("add", request_id, list(prompt), settings))
        except (BrokenPipeError, OSError):
            pass  # the next step reports the dead worker for every request sent

    def cancel(self, request_id: int) -> None:
        self._sent.discard(request_id)
        try:
            self._conn.send(("cancel", request_id))
        except (BrokenPipeError, OSError):
            pass

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def step(self) -> Step:
        """One step of the worker's pipeline (the adds and cancels sent before it included)."""
        self.send_step()
        return self.read_step()

    def send_step(self) -> None:
        """Ask for a step without waiting for it (`read_step` collects it): two workers can step at once."""
        self._asked = time.perf_counter()
        try:
            self._conn.send(("step",))
        except (BrokenPipeError, OSError):
            pass  # reported by read_step

    def read_step(self) -> Step:
        message = self._receive()
        if message[0] == "died":
            finished = [(request_id, "error", message[1]) for request_id in sorted(self._sent)]
            self._sent.clear()
            return Step([], finished)
        _, step, self.rss = message
        self.steps += 1
        self.step_seconds += step.seconds
        self.wait_seconds += time.perf_counter() - self._asked
        for request_id, _, _ in step.finished:
            self._sent.discard(request_id)
        return step

    def close(self) -> None:
        try:
            self._conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._conn.close()
