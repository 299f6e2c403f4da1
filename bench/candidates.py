"""Request throughput of several checkpoints' engines at one shape, side by side: what the architecture search
ranks candidates by.

`compactlm.compress.search` takes a `measure([(checkpoint, engine_dir), ...])` function instead of importing the harness
(bench sits above compress); this is that function. It builds each engine (once: an engine folder already there is
reused), warms each up, then times them interleaved, repeat-major (A B C, A B C, ...), so that a busy machine's
drift hits every model alike: each timing is one `run_benchmark` point at ISL/OSL with `batch` requests submitted
at once (offline load), fresh random prompts each time. The median over repeats is returned, with every run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class ThroughputSpec:
    """The shape the models are timed at."""

    isl: int = 128
    osl: int = 128
    batch: int = 8
    repeats: int = 3
    backend: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self):
        for name in ("isl", "osl", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"throughput {name} must be at least 1, not {getattr(self, name)}")


def ensure_engine(checkpoint: str | Path, engine_dir: Path, spec: ThroughputSpec) -> Path:
    from compactlm.engines import BuildConfig, Limits, build_engine

    if not (engine_dir / "engine.json").is_file():
        limits = Limits(
            max_batch_size=spec.batch,
            max_input_len=spec.isl,
            max_seq_len=spec.isl + spec.osl,
            max_num_tokens=max(2048, spec.isl),
        )
        config = BuildConfig(backend=spec.backend, precision=spec.precision, limits=limits)
        build_engine(checkpoint, engine_dir, config, overwrite=True)
    return engine_dir


def measure_throughput(models: list[tuple[str | Path, str | Path]], spec: ThroughputSpec | None = None) -> list[dict]:
    """Median request and output-token throughput of each (checkpoint, engine folder), measured interleaved."""
    from compactlm.bench.loadgen import Load
    from compactlm.bench.runner import plan, run_benchmark
    from compactlm.bench.targets.engine import EngineTarget
    from compactlm.engines import load_engine

    spec = spec or ThroughputSpec()
    targets = []
    try:
        for checkpoint, engine_dir in models:
            engine = load_engine(ensure_engine(checkpoint, Path(engine_dir), spec))
            targets.append(EngineTarget(engine, name=Path(checkpoint).name))
        points = plan([(spec.isl, spec.osl)], [Load("offline")], spec.batch, warmup=0, repeats=spec.repeats + 1)
        runs: list[list[dict]] = [[] for _ in targets]
        for point in points:  # repeat-major: the first round warms every engine up and is not counted
            for i, target in enumerate(targets):
                row = run_benchmark(target, [point], progress=False).iloc[0]
                if row["errors"]:
                    raise CompactLMError(
                        f"{target.name}: {row['errors']} requests failed while measuring throughput: "
                        f"{row['error_example']}"
                    )
                if point.repeat > 0:
                    runs[i].append({k: float(row[k]) for k in ("request_throughput", "output_throughput")})
    finally:
        for target in targets:
            target.close()
    return [
        {
            "request_throughput": statistics.median(r["request_throughput"] for r in model_runs),
            "output_throughput": statistics.median(r["output_throughput"] for r in model_runs),
            "request_throughput_runs": [r["request_throughput"] for r in model_runs],
            "engine": str(engine_dir),
            **{k: getattr(spec, k) for k in ("isl", "osl", "batch", "repeats", "backend", "precision")},
        }
        for model_runs, (_, engine_dir) in zip(runs, models, strict=True)
    ]
