"""The sweep file's load fields: validated with the field (and its line) named, turned into the right points."""

from __future__ import annotations

import pytest

from compactlm.bench.runner import sweep_plan
from compactlm.bench.sweep import Sweep, load_sweep
from compactlm.core.errors import CompactLMError

GOOD = """\
shapes: [[128, 128], [2048, 128]]
scale: 8
batch_sizes: [1, 4]
repeats: 2
engines:
  teacher: engines/teacher
  width: http://127.0.0.1:8000/v1
requests: 8
warmup: 1
source: python-docs
slo: {ttft_ms: 500, tpot_ms: 50}
out: results/sweep.parquet
"""


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_a_full_sweep_file_reads_and_plans(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    assert sweep.targets() == [("teacher", "engines/teacher"), ("width", "http://127.0.0.1:8000/v1")]
    assert sweep.slo == {"ttft_ms": 500, "tpot_ms": 50} and sweep.out == "results/sweep.parquet"
    points = sweep_plan(sweep)
    assert len(points) == 2 * 2 * 2  # repeats x shapes x batch sizes
    assert [(p.spec.input_len, p.spec.output_len, p.load.concurrency, p.repeat) for p in points[:4]] == [
        (16, 16, 1, 0),
        (16, 16, 4, 0),
        (256, 16, 1, 0),
        (256, 16, 4, 0),
    ]
    assert all(p.requests == 8 and p.warmup == 1 and p.spec.source == "python-docs" for p in points)
    assert len({p.spec.seed for p in points}) == len(points)
    assert sweep.limits().max_batch_size == 4  # engines build --for-sweep still works


def test_rate_and_offline_modes(tmp_path):
    rate = load_sweep(write(tmp_path, "rates: [0.5, 2]\nmode: rate\narrivals: constant\nduration: 30\n"))
    loads = [p.load for p in sweep_plan(rate)]
    assert [(x.mode, x.rate, x.arrivals, x.duration) for x in loads[:2]] == [
        ("rate", 0.5, "constant", 30.0),
        ("rate", 2.0, "constant", 30.0),
    ]
    offline = sweep_plan(Sweep(mode="offline", shapes=((8, 8),), batch_sizes=(4,), requests=16))
    assert [p.load.mode for p in offline] == ["offline"]


def test_requests_per_in_flight_slot(tmp_path):
    sweep = load_sweep(write(tmp_path, "shapes: [[8, 8]]\nbatch_sizes: [1, 8, 32]\nrequests: 2x\n"))
    assert [p.requests for p in sweep_plan(sweep)] == [2, 16, 64]  # whole waves at every batch size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode: bursty\n", r"sweep.yaml:1: sweep field 'mode' must be one of offline, concurrency, rate"),
        ("batch_sizes: [1]\nmode: rate\n", r"sweep.yaml: sweep field 'rates' needs positive"),
        ("batch_sizes: [1, 32]\nrequests: 8\n", r"sweep.yaml:2: sweep field 'requests' \(8\) is below the largest"),
        ("slo: {ttft: 5}\n", r"sweep.yaml:1: sweep field 'slo' takes ttft_ms, tpot_ms, e2e_ms; unknown: ttft"),
        ("warmup: many\n", r"sweep.yaml:1: warmup must be an integer, not 'many'"),
        ("rates: fast\n", r"sweep.yaml:1: rates must be a list, not 'fast'"),
        ("duration: 10\nmode: offline\n", r"sweep field 'duration' must be positive, and needs mode concurrency"),
        ("names: [a]\n", r"sweep field 'names': give names with the mapping form"),
        ("concurrency: [1]\n", r"sweep.yaml:1: unknown key 'concurrency' in the sweep file"),
        ("requests: 2x\nmode: rate\nrates: [1]\n", r"sweep.yaml:1: sweep field 'requests' takes a count or 'Nx'"),
        ("requests: lots\n", r"sweep.yaml:1: sweep field 'requests' takes a count or 'Nx'"),
    ],
)
def test_an_invalid_sweep_names_the_field(tmp_path, text, message):
    with pytest.raises(CompactLMError, match=message):
        load_sweep(write(tmp_path, text))
