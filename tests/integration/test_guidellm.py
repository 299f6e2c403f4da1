"""Integration: GuideLLM, unmodified (its own venv, made once), benchmarks the OpenAI front serving the bundled
SmolLM2-135M over /v1/chat/completions for a short bounded run: every request completes with the tokens it asked
for, and GuideLLM's token counts are the server's own (its /metrics counters)."""

from __future__ import annotations

import urllib.request

import pytest

from compactlm.bench.guidellm import GuideLLMRun, run_guidellm
from compactlm.compress.models import pull
from compactlm.engines import BuildConfig, Limits, build_engine, load_engine
from compactlm.serve.openai_api.route import OpenAIRoute
from compactlm.serve.requests import GenerationService
from tests.helpers import HOST

pytestmark = pytest.mark.integration
REQUESTS, OUTPUT = 4, 16


def _counters(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    wanted = ("compactlm:prompt_tokens", "compactlm:generation_tokens", "compactlm:request_success")
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def test_guidellm_benchmarks_the_chat_route_and_counts_what_the_server_counts(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidellm")
    limits = Limits(max_batch_size=4, max_input_len=96, max_seq_len=160, max_num_tokens=384)
    engine_dir = build_engine(pull("smollm2-135m"), root / "torch", BuildConfig(backend="torch", limits=limits))
    with load_engine(engine_dir) as engine:
        route = OpenAIRoute(GenerationService(engine, "smol"), HOST, 0, "smol")
        route.start()
        try:
            before = _counters(route.port)
            spec = GuideLLMRun(
                f"http://{HOST}:{route.port}",
                "smol",
                engine_dir / "tokenizer",
                streams=2,
                requests=REQUESTS,
                prompt_tokens=32,
                output_tokens=OUTPUT,
            )
            result = run_guidellm(spec, root / "run")
            after = _counters(route.port)
        finally:
            route.stop(drain_s=2)
    assert (result["successful"], result["errored"], result["incomplete"]) == (REQUESTS, 0, 0), result
    assert result["output_tokens"] == [OUTPUT] * REQUESTS  # it sent ignore_eos and max_completion_tokens
    assert after["compactlm:request_success"] - before["compactlm:request_success"] == REQUESTS
    assert after["compactlm:generation_tokens"] - before["compactlm:generation_tokens"] == REQUESTS * OUTPUT
    # the usage GuideLLM read from the stream is the server's count of templated prompt tokens
    assert after["compactlm:prompt_tokens"] - before["compactlm:prompt_tokens"] == sum(result["prompt_tokens"])
    assert all(t > 32 for t in result["prompt_tokens"])  # 32 tokens of text plus the chat template's own
    assert result["req_per_s"] > 0 and result["completed_per_s"] > 0 and result["ttft_ms_p50"] > 0
