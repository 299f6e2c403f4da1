"""Accuracy of measurement: load generators against an engine whose delays are scripted, so the truth is known.

Every metric the harness reports (TTFT, ITL, TPOT, E2E: mean and percentiles; request, output and total token
throughput) must be within 2% of the truth worked out from the script.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from compactlm.bench.fake import Script, ScriptedEngine
from compactlm.bench.loadgen import Load, arrival_offsets, run_load
from compactlm.bench.metrics import summarize
from compactlm.bench.targets import EngineTarget
from compactlm.bench.workload import Workload, WorkloadSpec

REL = 0.02


def items(isl, osl, n, input_stdev=0.0, seed=0):
    return Workload(WorkloadSpec(isl, osl, input_stdev, seed=seed), vocab_size=1000).take(n)


def stats(values_s) -> dict[str, float]:
    ms = np.asarray(values_s) * 1e3
    return {"mean": ms.mean(), **{f"p{p}": np.percentile(ms, p) for p in (50, 90, 99)}}


def assert_latencies(row, name, truth_s):
    for stat, value in stats(truth_s).items():
        assert row[f"{name}_ms_{stat}"] == pytest.approx(value, rel=REL), f"{name} {stat}"


def wave_truth(records, script: Script, isl: int, osl: int, batch: int) -> dict[str, np.ndarray]:
    """Per request TTFT and E2E of requests that arrive in waves of `batch`: the script starts a wave at its first
    arrival (+ the batch window), so a request submitted later in its wave waits that much less."""
    truth = script.wave(isl, osl, batch)
    waves: dict[float, list] = {}
    for r in records:
        waves.setdefault(r.token_times[0], []).append(r)  # a wave's first tokens share a step
    assert all(len(w) == batch for w in waves.values()), [len(w) for w in waves.values()]
    late = np.array([r.submitted - min(x.submitted for x in w) for w in waves.values() for r in w])
    return {"ttft": truth["ttft"] - late, "e2e": truth["e2e"] - late}


def test_concurrency_one_with_spread_inputs_measures_every_metric_within_2_percent():
    script = Script(decode_step=0.02, prefill_per_token=0.0005)
    with EngineTarget(ScriptedEngine(script)) as target:
        work = items(40, 4, 8, input_stdev=10, seed=1)
        run = run_load(target, work, Load("concurrency", concurrency=1))
    row = summarize(run.records)
    isl = np.array([i.input_len for i in work])
    assert isl.std() > 3  # the TTFT distribution really is spread
    ttft = script.decode_step + script.prefill_per_token * isl
    e2e = ttft + 3 * script.decode_step
    assert row["completed"] == 8 and row["errors"] == 0
    assert_latencies(row, "ttft", ttft)
    assert_latencies(row, "e2e", e2e)
    assert_latencies(row, "itl", [script.decode_step] * 24)
    assert_latencies(row, "tpot", [script.decode_step] * 8)
    busy = e2e.sum()  # back to back: the run lasts the sum of the latencies
    assert row["request_throughput"] == pytest.approx(8 / busy, rel=REL)
    assert row["output_throughput"] == pytest.approx(32 / busy, rel=REL)
    assert row["total_throughput"] == pytest.approx((isl.sum() + 32) / busy, rel=REL)


def test_fixed_concurrency_keeps_n_in_flight_and_measures_batches_within_2_percent():
    # the window is generous so that a busy machine's late thread still joins its wave
    script = Script(decode_step=0.02, decode_per_seq=0.002, prefill_per_token=0.0005, batch_window=0.05)
    engine = ScriptedEngine(script)
    with EngineTarget(engine) as target:
        run = run_load(target, items(32, 6, 12), Load("concurrency", concurrency=4))
    row = summarize(run.records)
    truth = script.wave(32, 6, batch=4)
    assert {b for _, b in engine.steps} == {4}  # every step ran a full batch of 4: three waves
    per_request = wave_truth(run.records, script, 32, 6, batch=4)
    assert_latencies(row, "ttft", per_request["ttft"])
    assert_latencies(row, "e2e", per_request["e2e"])
    assert_latencies(row, "itl", [truth["itl"]] * 60)
    assert_latencies(row, "tpot", [truth["tpot"]] * 12)
    assert row["request_throughput"] == pytest.approx(4 / truth["e2e"], rel=REL)
    assert row["output_throughput"] == pytest.approx(24 / truth["e2e"], rel=REL)


def test_offline_submits_everything_at_once():
    script = Script(decode_step=0.02, prefill_per_token=0.0002, batch_window=0.05)
    engine = ScriptedEngine(script, max_batch_size=8)
    with EngineTarget(engine) as target:
        run = run_load(target, items(16, 5, 6), Load("offline"))
    row = summarize(run.records)
    truth = script.wave(16, 5, batch=6)
    assert engine.steps[0][1] == 6  # all six in the first step
    per_request = wave_truth(run.records, script, 16, 5, batch=6)
    assert_latencies(row, "ttft", per_request["ttft"])
    assert_latencies(row, "e2e", per_request["e2e"])
    assert row["request_throughput"] == pytest.approx(6 / truth["e2e"], rel=REL)


def test_constant_rate_arrivals_give_the_offered_throughput():
    script = Script(decode_step=0.01)
    with EngineTarget(ScriptedEngine(script)) as target:
        run = run_load(target, items(8, 3, 8), Load("rate", rate=20, arrivals="constant"))
    row = summarize(run.records)
    submits = np.array(sorted(r.submitted for r in run.records))
    assert submits - submits[0] == pytest.approx(np.arange(8) * 0.05, abs=0.01)  # on schedule, never drifting
    assert row["request_throughput"] == pytest.approx(8 / (7 * 0.05 + 0.03), rel=REL)
    assert_latencies(row, "e2e", [0.03] * 8)


def test_poisson_arrivals_are_exponential_and_seeded():
    load = Load("rate", rate=50, seed=4)
    offsets = np.array(list(itertools.islice(arrival_offsets(load), 4001)))
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential: CV 1
    assert list(itertools.islice(arrival_offsets(load), 10)) == offsets[:10].tolist()
    constant = list(itertools.islice(arrival_offsets(Load("rate", rate=4, arrivals="constant")), 3))
    assert constant == [0.0, 0.25, 0.5]


def test_warmup_requests_are_sent_but_not_counted():
    engine = ScriptedEngine(Script(decode_step=0.001))
    work = items(8, 2, 8)
    with EngineTarget(engine) as target:
        run = run_load(target, work[3:], Load("concurrency", concurrency=2), warmup=work[:3])
    assert engine.admitted == 8
    assert sorted(r.task_id for r in run.records) == [3, 4, 5, 6, 7]
    assert min(r.submitted for r in run.records) >= run.started


def test_a_measurement_window_keeps_requests_coming_and_counts_inside_it():
    engine = ScriptedEngine(Script(decode_step=0.01))
    workload = Workload(WorkloadSpec(8, 5), vocab_size=100)  # endless
    with EngineTarget(engine) as target:
        run = run_load(target, workload, Load("concurrency", concurrency=2, duration=0.3))
    start, stop = run.window
    assert stop - start == pytest.approx(0.3)
    assert all(r.submitted < stop for r in run.records) and len(run.records) >= 10  # 2 in flight, 50 ms each
    row = summarize(run.records, run.window)
    assert row["duration_s"] == pytest.approx(0.3)
    # the engine's own log: every step hands one token to each active request
    tokens = sum(batch for at, batch in engine.steps if start <= at <= stop)
    assert row["output_throughput"] == pytest.approx(tokens / 0.3, rel=1e-9)
    assert row["completed"] == sum(start <= r.ended <= stop for r in run.records) >= 9


def test_real_time_stamps_still_measure_means_within_2_percent():
    script = Script(decode_step=0.03)
    with EngineTarget(ScriptedEngine(script, exact_times=False)) as target:
        run = run_load(target, items(8, 6, 4), Load("concurrency", concurrency=1))
    row = summarize(run.records)
    assert row["e2e_ms_mean"] == pytest.approx(6 * 30, rel=REL)
    assert row["itl_ms_mean"] == pytest.approx(30, rel=REL)
    assert row["tpot_ms_mean"] == pytest.approx(30, rel=REL)
