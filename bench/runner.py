"""run_benchmark: measure a target at every point of a plan (shape x load x repeat), one results row a point.

Every point is checked against the target's limits before the first request is sent; rows are appended to the
results file as points finish; a request that fails (a dead server, a refused submit, a short output) is counted
as an error of its point and the run goes on.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from compactlm.bench.loadgen import Load, run_load
from compactlm.bench.metrics import Slo, summarize
from compactlm.bench.results import ResultsFile, new_run_id
from compactlm.bench.sweep import Sweep
from compactlm.bench.targets import Target
from compactlm.bench.workload import Workload, WorkloadSpec
from compactlm.core.errors import CompactLMError
from compactlm.core.host import environment


@dataclass(frozen=True)
class Point:
    """One measured point: requests of `spec` under `load`, `requests` of them after `warmup` (or for
    `load.duration` seconds), repeat number `repeat`."""

    spec: WorkloadSpec
    load: Load
    requests: int
    warmup: int = 0
    repeat: int = 0

    def label(self) -> str:
        return f"{self.spec.input_len}/{self.spec.output_len} {self.load.describe()} #{self.repeat}"

    def batch_size(self, target: Target) -> float:
        """The most requests the target can batch at this point (the x axis of throughput vs batch size)."""
        if self.load.mode == "concurrency":
            return self.load.concurrency
        if self.load.mode == "offline":
            return min(self.requests, target.limits.max_batch_size) if target.limits else self.requests
        return math.nan

    def columns(self, target: Target) -> dict:
        load = self.load
        return {
            "isl": self.spec.input_len,
            "osl": self.spec.output_len,
            "input_stdev": self.spec.input_stdev,
            "output_stdev": self.spec.output_stdev,
            "source": self.spec.source,
            "mode": load.mode,
            "concurrency": load.concurrency if load.mode == "concurrency" else math.nan,
            "batch_size": self.batch_size(target),
            "rate": load.rate if load.mode == "rate" else math.nan,
            "arrivals": load.arrivals if load.mode == "rate" else None,
            "window_s": load.duration,
            "requests_asked": self.requests,
            "warmup": self.warmup,
            "repeat": self.repeat,
        }


def requests_for(requests: int | str, load: Load) -> int:
    """A point's request count: a number, or "Nx": N per in-flight request (concurrency mode)."""
    if isinstance(requests, int):
        return requests
    if not requests.endswith("x") or not requests[:-1].isdigit() or load.mode != "concurrency":
        raise CompactLMError(f"requests {requests!r}: give a count, or 'Nx' (N per in-flight request) with concurrency")
    return int(requests[:-1]) * load.concurrency


def plan(
    shapes: Sequence[tuple[int, int]],
    loads: Sequence[Load],
    requests: int | str,
    warmup: int = 0,
    repeats: int = 1,
    input_stdev: float = 0.0,
    output_stdev: float = 0.0,
    source: str = "random",
    seed: int = 0,
) -> list[Point]:
    """Every shape x load, `repeats` times (repeat-major: an interrupted run still has whole sweeps). Each point
    draws its own prompts (its own seed), so no prompt is ever sent twice. `requests`: see `requests_for`."""
    points = []
    for repeat in range(repeats):
        for isl, osl in shapes:
            for load in loads:
                spec = WorkloadSpec(isl, osl, input_stdev, output_stdev, source, seed * 1_000_003 + len(points))
                count = requests_for(requests, load)
                points.append(Point(spec, replace(load, seed=spec.seed), count, warmup, repeat))
    return points


def sweep_plan(sweep: Sweep) -> list[Point]:
    """The points of a sweep file."""
    if sweep.mode == "concurrency":
        loads = [Load("concurrency", concurrency=b, duration=sweep.duration) for b in sweep.batch_sizes]
    elif sweep.mode == "rate":
        loads = [Load("rate", rate=r, arrivals=sweep.arrivals, duration=sweep.duration) for r in sweep.rates]
    else:
        loads = [Load("offline")]
    return plan(
        sweep.scaled_shapes(),
        loads,
        sweep.requests,
        sweep.warmup,
        sweep.repeats,
        sweep.input_stdev,
        sweep.output_stdev,
        sweep.source,
        sweep.seed,
    )


def check_plan(target: Target, points: Sequence[Point], longest: tuple[int, int] | None = None) -> None:
    """Refuse, before anything runs, a point whose shapes (longest input and output) or batch size exceed the
    target's limits. `longest`: the workload's real longest input and output (a saved dataset)."""
    _check(target.name, target.limits, points, longest)


def check_limits(spec: str, name: str | None, points: Sequence[Point]) -> None:
    """`check_plan` for a target string without opening it: an engine folder's limits are in its manifest."""
    from compactlm.engines.manifest import MANIFEST, read_manifest

    if (Path(spec).expanduser() / MANIFEST).is_file():
        _check(name or spec, read_manifest(spec).limits, points, None)


def _check(name: str, limits, points: Sequence[Point], longest: tuple[int, int] | None) -> None:
    if limits is None:
        return
    for point in points:
        max_in, max_out = longest or point.spec.max_lengths()
        batch = point.load.concurrency if point.load.mode == "concurrency" else 1
        try:
            limits.check_shape(max_in, max_out, batch)
        except CompactLMError as exc:
            raise CompactLMError(f"{name}: point {point.label()} does not fit: {exc}") from exc


def synthetic_workload(target: Target, spec: WorkloadSpec) -> Workload:
    tokenizer = target.tokenizer if spec.source != "random" else None
    return Workload(spec, target.vocab_size, tokenizer, exclude=target.eos_token_ids)


def run_benchmark(
    target: Target,
    points: Sequence[Point],
    results: ResultsFile | None = None,
    slo: Slo | None = None,
    *,
    workload_for: Callable[[Target, WorkloadSpec], object] = synthetic_workload,
    longest: tuple[int, int] | None = None,
    timeout: float | None = 600.0,
    progress: bool = True,
    run_id: str | None = None,
) -> pd.DataFrame:
    """Measure `target` at each point; append a row per point to `results` as it finishes; return all rows.

    workload_for: makes each point's requests (default: synthetic, from the point's spec); longest: the real
    longest input and output of a saved dataset, for the limits check.
    """
    check_plan(target, points, longest)
    slo = slo or Slo()
    run_id = run_id or new_run_id()
    info, env = target.describe(), environment()
    rows = []
    with _Bars(progress) as bars:
        for point in points:
            workload = workload_for(target, point.spec)
            warm = workload.take(point.warmup) if point.warmup else []
            items = workload if point.load.duration else workload.take(point.requests)
            advance = bars(f"{target.name} {point.label()}", None if point.load.duration else point.requests)
            run = run_load(target, items, point.load, warm, timeout, on_record=advance)
            row = {
                "run_id": run_id,
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **info,
                **point.columns(target),
                **summarize(run.records, run.window, slo),
                "slo_ttft_ms": slo.ttft_ms,
                "slo_tpot_ms": slo.tpot_ms,
                "slo_e2e_ms": slo.e2e_ms,
                **env,
            }
            if results is not None:
                results.append(row)
            rows.append(row)
    return pd.DataFrame(rows)


class _Bars:
    """A progress bar per point (rich), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from compactlm.core.console import progress_bar

            self.progress = progress_bar()
            self.progress.__enter__()
        return self

    def __call__(self, label: str, total: int | None):
        if self.progress is None:
            return None
        progress, task = self.progress, self.progress.add_task(label, total=total)
        return lambda record: progress.advance(task)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
