"""Load generators: how requests are sent to a target.

- offline: every request submitted at once; the target batches up to its own limit (trtllm-bench throughput).
- concurrency: N requests in flight; a new one is sent as soon as one ends (the batch-size sweep).
- rate: requests sent at a mean rate, Poisson (exponential gaps) or constant arrivals, whatever is in flight.

Warm-up requests go first, through the same load, and are not recorded. With a `duration`, requests keep
coming for that long (concurrency and rate modes) and the metrics count what happened inside that window.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from compactlm.bench.metrics import RequestRecord
from compactlm.bench.sweep import ARRIVALS, MODES
from compactlm.bench.targets import Target
from compactlm.bench.workload import WorkloadItem
from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class Load:
    """One load level: the mode and its knob (concurrency or rate)."""

    mode: str = "concurrency"
    concurrency: int = 1
    """Requests in flight (concurrency mode)."""
    rate: float | None = None
    """Requests per second (rate mode)."""
    arrivals: str = "poisson"
    duration: float | None = None
    """Measurement window in seconds (concurrency and rate modes); None: run the given number of requests."""
    seed: int = 0
    """Seeds the Poisson arrival times."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise CompactLMError(f"load mode {self.mode!r} is unknown; choose from {', '.join(MODES)}")
        if self.mode == "concurrency" and (not isinstance(self.concurrency, int) or self.concurrency < 1):
            raise CompactLMError(f"concurrency must be a positive integer, got {self.concurrency!r}")
        if self.mode == "rate" and (self.rate is None or self.rate <= 0):
            raise CompactLMError(f"rate mode needs a positive request rate, got {self.rate!r}")
        if self.arrivals not in ARRIVALS:
            raise CompactLMError(f"arrivals {self.arrivals!r} is unknown; choose from {', '.join(ARRIVALS)}")
        if self.duration is not None:
            if self.duration <= 0:
                raise CompactLMError(f"the measurement window must be positive, got {self.duration}")
            if self.mode == "offline":
                raise CompactLMError("a measurement window needs a concurrency or rate load, not offline")

    def describe(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency {self.concurrency}"
        if self.mode == "rate":
            return f"{self.rate:g} req/s {self.arrivals}"
        return "offline"


@dataclass
class LoadRun:
    records: list[RequestRecord]
    started: float
    ended: float
    window: tuple[float, float] | None = None


def arrival_offsets(load: Load) -> Iterator[float]:
    """Seconds after the start at which each request is sent (rate mode), endless."""
    if load.arrivals == "constant":
        yield from (i / load.rate for i in itertools.count())
        return
    rng = np.random.default_rng(load.seed)
    t = 0.0
    while True:
        for gap in rng.exponential(1.0 / load.rate, 256):
            yield t
            t += float(gap)


def run_load(
    target: Target,
    items: Iterable[WorkloadItem],
    load: Load,
    warmup: Iterable[WorkloadItem] = (),
    timeout: float | None = 600.0,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadRun:
    """Warm up with `warmup` (not recorded), then send `items` under `load` and collect a record per request.

    `items` may be endless when `load.duration` is set (a `Workload`): sending stops when the window closes.
    `timeout`: seconds to wait for each request to end (a request past it is a failed record).
    """
    warm = list(warmup)
    if warm:
        _drive(target, warm, load, None, timeout, None)
    started = time.perf_counter()
    stop = started + load.duration if load.duration else None
    records = _drive(target, items, load, stop, timeout, on_record)
    ended = max((r.ended for r in records), default=started)
    return LoadRun(records, started, ended, (started, stop) if stop else None)


def _drive(target, items, load, stop, timeout, on_record) -> list[RequestRecord]:
    if load.mode == "offline":
        return _offline(target, items, timeout, on_record)
    if load.mode == "concurrency":
        return _concurrent(target, items, load.concurrency, stop, timeout, on_record)
    return _rate(target, items, arrival_offsets(load), stop, timeout, on_record)


def _offline(target, items, timeout, on_record) -> list[RequestRecord]:
    pending = [target.submit(item) for item in items]
    records = []
    for p in pending:  # token times are stamped as they arrive, so waiting in order loses nothing
        records.append(p.result(timeout))
        if on_record:
            on_record(records[-1])
    return records


def _concurrent(target, items, n, stop, timeout, on_record) -> list[RequestRecord]:
    source = iter(items)
    lock = threading.Lock()
    records: list[RequestRecord] = []

    def client() -> None:
        while True:
            with lock:
                if stop is not None and time.perf_counter() >= stop:
                    return
                item = next(source, None)
            if item is None:
                return
            record = target.submit(item).result(timeout)
            records.append(record)
            if on_record:
                on_record(record)

    if n == 1:
        client()
        return records
    threads = [threading.Thread(target=client, name=f"bench-client-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def _rate(target, items, offsets, stop, timeout, on_record) -> list[RequestRecord]:
    pending: queue.SimpleQueue = queue.SimpleQueue()
    records: list[RequestRecord] = []

    def collect() -> None:
        for p in iter(pending.get, None):
            records.append(p.result(timeout))
            if on_record:
                on_record(records[-1])

    collector = threading.Thread(target=collect, name="bench-collector", daemon=True)
    collector.start()
    start = time.perf_counter()
    try:
        for item, offset in zip(items, offsets, strict=False):
            at = start + offset
            if stop is not None and at >= stop:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pending.put(target.submit(item))
    finally:
        pending.put(None)
        collector.join()
    return records
