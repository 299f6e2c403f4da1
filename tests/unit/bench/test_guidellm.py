"""bench/guidellm.py without GuideLLM: its run spec's validation, the scenario it writes, and the summary it reads
from a report shaped like GuideLLM 0.8.1's JSON (the integration test runs the real tool)."""

from __future__ import annotations

import pytest

from compactlm.bench.guidellm import GuideLLMRun, summarize


def _spec(tmp_path, **overrides) -> GuideLLMRun:
    fields = {"url": "http://127.0.0.1:8000", "model": "m", "tokenizer": tmp_path} | overrides
    return GuideLLMRun(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": "http://127.0.0.1:8000/v1"}, "server's root"),
        ({"url": "127.0.0.1:8000"}, "server's root"),
        ({"route": "/v1/embeddings"}, "route must be"),
        ({"streams": 0}, "streams must be"),
        ({"output_tokens": 0}, "output_tokens must be"),
    ],
)
def test_a_bad_spec_is_refused_with_the_field_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _spec(tmp_path, **overrides)


def test_a_missing_tokenizer_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tokenizer folder"):
        _spec(tmp_path, tokenizer=tmp_path / "absent")


def test_the_scenario_is_a_bounded_closed_loop_on_the_route_asked(tmp_path):
    spec = _spec(tmp_path, route="/v1/completions", streams=3, requests=7, prompt_tokens=20, output_tokens=5).scenario()
    body = spec["spec"]
    assert body["backend"] == {
        "kind": "openai_http",
        "target": "http://127.0.0.1:8000",
        "model": "m",
        "request_format": "/v1/completions",
    }
    assert body["profile"] == {"kind": "concurrent", "streams": 3}
    assert body["constraints"] == [{"kind": "max_requests", "count": 7}]
    assert body["data"][0] == {"kind": "synthetic_text", "prompt_tokens": 20, "output_tokens": 5}
    assert body["tokenizer"]["model"] == str(tmp_path.resolve())


def _dist(mean, median, p99):
    return {"successful": {"mean": mean, "median": median, "percentiles": {"p50": median, "p99": p99}}}


def test_the_summary_reads_its_headline_rate_and_the_completed_rate_apart():
    report = {
        "metadata": {"guidellm_version": "0.8.1"},
        "benchmarks": [
            {
                "duration": 4.0,
                "metrics": {
                    "request_totals": {"successful": 2, "errored": 1, "incomplete": 0, "total": 3},
                    "requests_per_second": _dist(0.4, 0.3, 0.9),
                    "time_to_first_token_ms": _dist(120.0, 100.0, 300.0),
                    "inter_token_latency_ms": _dist(11.0, 10.0, 20.0),
                },
                "requests": {
                    "successful": [{"output_tokens": 8, "prompt_tokens": 40}, {"output_tokens": 8, "prompt_tokens": 41}]
                },
            }
        ],
    }
    got = summarize(report)
    assert got["req_per_s"] == 0.4 and got["completed_per_s"] == 0.5  # 2 completed over 4 s
    assert (got["successful"], got["errored"], got["incomplete"]) == (2, 1, 0)
    assert (got["ttft_ms_p50"], got["ttft_ms_mean"], got["ttft_ms_p99"], got["itl_ms_p50"]) == (100, 120, 300, 10)
    assert got["output_tokens"] == [8, 8] and got["prompt_tokens"] == [40, 41]
    assert got["guidellm_version"] == "0.8.1"
