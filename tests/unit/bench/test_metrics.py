"""Benchmark metrics from hand-made records: every definition checked against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from compactlm.bench.metrics import RequestRecord, Slo, aggregate_repeats, confidence_interval, summarize, t_quantile


def record(submitted, times, expected=None, error=None, task_id=0, input_tokens=10):
    expected = len(times) if expected is None else expected
    return RequestRecord(task_id, input_tokens, expected, submitted, list(times), error=error)


def test_per_request_latencies():
    r = record(1.0, [1.5, 1.6, 1.6, 1.9])
    assert r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(0.9)
    assert r.itl == pytest.approx([0.1, 0.0, 0.3])  # tokens of one chunk share a time
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.ended == 1.9 and r.ok


def test_a_short_output_is_an_error_counted_apart():
    r = record(0.0, [0.1, 0.2], expected=3)
    assert not r.ok and "returned 2 tokens, 3 were asked" in r.error
    row = summarize([r, record(0.0, [0.1, 0.2, 0.4])])
    assert row["completed"] == 1 and row["errors"] == 1 and "3 were asked" in row["error_example"]
    assert row["ttft_ms_mean"] == pytest.approx(100)  # the failed request is not in the latencies


def test_point_metrics_match_hand_computed_values():
    records = [
        record(0.0, [0.2, 0.3, 0.4], input_tokens=10),
        record(0.1, [0.5, 0.6, 0.8], input_tokens=20),
        record(0.2, [0.4, 0.5, 1.2], input_tokens=30),
    ]
    row = summarize(records)
    assert row["duration_s"] == pytest.approx(1.2)
    assert row["request_throughput"] == pytest.approx(3 / 1.2)
    assert row["output_throughput"] == pytest.approx(9 / 1.2)
    assert row["total_throughput"] == pytest.approx((9 + 60) / 1.2)
    ttft = np.array([0.2, 0.4, 0.2]) * 1e3
    assert row["ttft_ms_mean"] == pytest.approx(ttft.mean())
    assert row["ttft_ms_p90"] == pytest.approx(np.percentile(ttft, 90))
    itl = np.array([0.1, 0.1, 0.1, 0.2, 0.1, 0.7]) * 1e3
    for p in (50, 90, 99):
        assert row[f"itl_ms_p{p}"] == pytest.approx(np.percentile(itl, p))
    assert row["tpot_ms_mean"] == pytest.approx(np.mean([100, 150, 400]))
    assert row["e2e_ms_p50"] == pytest.approx(700)
    assert math.isnan(row["goodput"])  # no SLO, no goodput


def test_goodput_counts_requests_within_every_slo():
    records = [record(0.0, [0.1, 0.2]), record(0.0, [0.3, 0.4]), record(0.0, [0.1, 0.9])]
    row = summarize(records, slo=Slo(ttft_ms=200, tpot_ms=500))
    assert row["goodput"] == pytest.approx(1 / 0.9)  # only the first meets both
    with pytest.raises(Exception, match="must be positive"):
        Slo(ttft_ms=0)


def test_a_window_counts_only_what_happened_inside_it():
    records = [
        record(0.0, [0.5, 1.5]),  # ends inside
        record(1.0, [1.5, 2.5]),  # ends inside
        record(1.5, [2.0, 3.5]),  # ends after: its first token counts, the request does not
        record(1.0, [1.2], expected=2),  # failed inside the window
    ]
    row = summarize(records, window=(1.0, 3.0))
    assert row["duration_s"] == pytest.approx(2.0)
    assert row["completed"] == 2 and row["errors"] == 1
    assert row["request_throughput"] == pytest.approx(1.0)
    assert row["output_throughput"] == pytest.approx(4 / 2.0)  # 1.5, 1.5, 2.5, 2.0
    assert row["total_throughput"] == pytest.approx((4 + 20) / 2.0)  # prompts whose first token came inside


def test_t_quantiles_match_the_tables():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, rel=1.5e-3)  # CIs need no more
    stats = pytest.importorskip("scipy.stats")
    for df in range(3, 60):
        assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.95, df), rel=1e-3)


def test_confidence_intervals_over_repeats():
    mean, half = confidence_interval([10.0, 12.0, 11.0])
    assert mean == pytest.approx(11.0) and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    assert math.isnan(confidence_interval([5.0])[1])
    frame = pd.DataFrame(
        {"model": ["a"] * 3 + ["b"], "request_throughput": [10.0, 12.0, 11.0, 7.0], "errors": [0, 2, 1, 0]}
    )
    agg = aggregate_repeats(frame, ["model"]).set_index("model")
    assert agg.loc["a", "errors"] == 3  # errors add up over repeats
    assert agg.loc["a", "repeats"] == 3 and agg.loc["a", "request_throughput"] == pytest.approx(11.0)
    assert agg.loc["a", "request_throughput_ci"] == pytest.approx(half)
    assert math.isnan(agg.loc["b", "request_throughput_ci"])
