"""Request throughput of a checkpoint's engine at one shape: what the architecture search ranks candidates by.

`compress.search` takes a `measure(checkpoint, engine_dir)` function instead of importing the harness (bench sits
above compress); this is that function: build the engine (once: an engine folder already there is reused), then
`run_benchmark` at ISL/OSL with `batch` requests submitted at once (offline load), after a warm-up, `repeats`
times with fresh prompts; the median is returned.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompactLMError


@dataclass(frozen=True)
class ThroughputSpec:
    """The shape a candidate is timed at."""

    isl: int = 128
    osl: int = 128
    batch: int = 8
    repeats: int = 2
    backend: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self):
        for name in ("isl", "osl", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"throughput {name} must be at least 1, not {getattr(self, name)}")


def measure_throughput(checkpoint: str | Path, engine_dir: str | Path, spec: ThroughputSpec | None = None) -> dict:
    """Median request and output-token throughput of `checkpoint`'s engine (built into `engine_dir` if missing)."""
    from bench.loadgen import Load
    from bench.runner import plan, run_benchmark
    from bench.targets.engine import EngineTarget
    from engines import BuildConfig, Limits, build_engine, load_engine

    spec = spec or ThroughputSpec()
    engine_dir = Path(engine_dir)
    if not (engine_dir / "engine.json").is_file():
        limits = Limits(
            max_batch_size=spec.batch,
            max_input_len=spec.isl,
            max_seq_len=spec.isl + spec.osl,
            max_num_tokens=max(2048, spec.isl),
        )
        build_engine(
            checkpoint, engine_dir, BuildConfig(backend=spec.backend, precision=spec.precision, limits=limits), True
        )
    points = plan(
        [(spec.isl, spec.osl)], [Load("offline")], spec.batch, warmup=min(2, spec.batch), repeats=spec.repeats
    )
    target = EngineTarget(load_engine(engine_dir), name=Path(checkpoint).name)
    try:
        rows = run_benchmark(target, points, progress=False)
    finally:
        target.close()
    errors = int(rows["errors"].sum())
    if errors:
        example = rows["error_example"].dropna().iloc[0]
        raise CompactLMError(f"{engine_dir}: {errors} requests failed while measuring throughput: {example}")
    return {
        "request_throughput": statistics.median(rows["request_throughput"]),
        "output_throughput": statistics.median(rows["output_throughput"]),
        "request_throughput_runs": rows["request_throughput"].tolist(),
        "engine": str(engine_dir),
        **{k: getattr(spec, k) for k in ("isl", "osl", "batch", "repeats", "backend", "precision")},
    }
