"""What a benchmark measures: per request TTFT, inter-token latencies, end-to-end latency and token counts; per
point throughput, latency percentiles and goodput; confidence intervals over repeats.

Definitions (those of vLLM's and trtllm-bench's serving benchmarks):
- TTFT: first token time - submit time. E2E: last token time - submit time.
- ITL: the gaps between successive output tokens, pooled over the requests of a point (tokens that arrive in
  one chunk share a time, so a gap can be 0). TPOT, per request: (E2E - TTFT) / (output tokens - 1).
- Throughput: completed requests (and their tokens) over the point's duration, from the first submit to the
  last token; or, with a measurement window, what completed (tokens: what arrived) inside the window over its
  length. Goodput: requests per second that met every SLO given.
- Failed requests (errors, or fewer/more tokens than asked) count as errors, never in latency or throughput.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from compactlm.core.errors import CompactLMError
from compactlm.engines.runtime import TokenTiming

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "itl", "tpot", "e2e")
STATS = ("mean", *(f"p{p}" for p in PERCENTILES))


@dataclass
class RequestRecord(TokenTiming):
    """One request as the harness saw it. Times are time.perf_counter() seconds."""

    task_id: int
    input_tokens: int
    expected_tokens: int
    submitted: float
    token_times: list[float] = field(default_factory=list)
    """When each output token arrived (tokens of one chunk share a time)."""
    ended: float | None = None
    """When the request ended (its last token, or when its failure was seen)."""
    error: str | None = None
    finish_reason: str | None = None

    def __post_init__(self):
        if self.ended is None:
            self.ended = self.token_times[-1] if self.token_times else self.submitted
        if self.error is None and self.output_tokens != self.expected_tokens:
            self.error = (
                f"returned {self.output_tokens} tokens, {self.expected_tokens} were asked"
                f" (finish reason {self.finish_reason})"
            )

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput, in milliseconds; None: no objective on that latency."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self):
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CompactLMError(f"SLO {name} must be positive, got {value}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met(self, r: RequestRecord) -> bool:
        checks = ((self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot if r.tpot is not None else 0.0), (self.e2e_ms, r.e2e))
        return r.ok and all(limit is None or (v is not None and v * 1e3 <= limit) for limit, v in checks)


def _stats(name: str, values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 in milliseconds (NaN when there is nothing to measure)."""
    if len(values) == 0:
        return {f"{name}_ms_{s}": math.nan for s in STATS}
    ms = np.asarray(values, dtype=np.float64) * 1e3
    out = {f"{name}_ms_mean": float(ms.mean())}
    out.update({f"{name}_ms_p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True)})
    return out


def summarize(
    records: Sequence[RequestRecord], window: tuple[float, float] | None = None, slo: Slo | None = None
) -> dict:
    """The per-point metrics (one flat dict: a row of the results table) of a point's measured requests."""
    slo = slo or Slo()
    if window is not None:
        start, end = window
        counted = [r for r in records if r.ok and start <= r.ended <= end]
        failed = [r for r in records if not r.ok and r.ended <= end]
        output_tokens = sum(sum(start <= t <= end for t in r.token_times) for r in records if r.ok)
        input_tokens = sum(
            r.input_tokens for r in records if r.ok and r.token_times and start <= r.token_times[0] <= end
        )
    else:
        counted = [r for r in records if r.ok]
        failed = [r for r in records if not r.ok]
        start = min((r.submitted for r in records), default=0.0)
        end = max((r.ended for r in records), default=start)
        output_tokens = sum(r.output_tokens for r in counted)
        input_tokens = sum(r.input_tokens for r in counted)
    duration = end - start
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    row = {
        "requests": len(records),
        "completed": len(counted),
        "errors": len(failed),
        "error_example": failed[0].error if failed else None,
        "duration_s": duration,
        "request_throughput": rate(len(counted)),
        "output_throughput": rate(output_tokens),
        "total_throughput": rate(output_tokens + input_tokens),
        "goodput": rate(sum(slo.met(r) for r in counted)) if slo.given else math.nan,
        "input_tokens_mean": float(np.mean([r.input_tokens for r in counted])) if counted else math.nan,
        "output_tokens_mean": float(np.mean([r.output_tokens for r in counted])) if counted else math.nan,
    }
    row.update(_stats("ttft", [r.ttft for r in counted]))
    row.update(_stats("itl", [gap for r in counted for gap in r.itl]))
    row.update(_stats("tpot", [r.tpot for r in counted if r.tpot is not None]))
    row.update(_stats("e2e", [r.e2e for r in counted]))
    return row


def metric_columns() -> list[str]:
    """The numeric per-point metric columns `summarize` writes (what repeats are averaged over)."""
    columns = ["request_throughput", "output_throughput", "total_throughput", "goodput", "errors"]
    return columns + [f"{name}_ms_{s}" for name in LATENCIES for s in STATS]


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution: exact for df 1 and 2, Cornish-Fisher beyond (relative error
    < 0.11% at df 3, falling fast with df; plenty for a confidence interval)."""
    if df < 1:
        raise ValueError("a t quantile needs df >= 1")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half width) of the t-distribution confidence interval; the half width is NaN for one value."""
    x = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    half = t_quantile(0.5 + level / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean()), half


def aggregate_repeats(frame: pd.DataFrame, keys: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """One row per point: each metric's mean over repeats and `<metric>_ci` (the half width), with `repeats`;
    `errors` is the total over repeats."""
    metrics = [c for c in metric_columns() if c in frame.columns and c != "errors"]
    rows = []
    for key, group in frame.groupby(list(keys), dropna=False, sort=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row["repeats"] = len(group)
        if "errors" in group:
            row["errors"] = int(group["errors"].sum())
        for column in metrics:
            row[column], row[f"{column}_ci"] = confidence_interval(group[column].astype(float).tolist(), level)
        rows.append(row)
    return pd.DataFrame(rows)
