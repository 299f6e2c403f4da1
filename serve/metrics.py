"""Prometheus metrics of the OpenAI front (`GET /metrics`), named like vLLM's and trtllm-serve's so that the
dashboards and scrapers people have (AIPerf, Grafana boards) find their counterparts: requests by route and
status, finished requests by reason, prompt and generation token counters, TTFT / inter-token / end-to-end
latency histograms, the engine's running and waiting requests and KV-cache use, its resident memory and, for a
recycled cpu engine, how often its worker was replaced (read when scraped).

Each server has its own registry: two servers in one process (the tests) never share counters.
"""

from __future__ import annotations

from compactlm.engines.runtime import Completion, Engine

PREFIX = "compactlm:"
# seconds; the same spirit as vLLM's buckets: sub-ms steps on fast engines up to minute-long requests
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class ServeMetrics:
    """The metrics of one server; `render()` is the Prometheus text exposition."""

    def __init__(self, engine: Engine, model: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series double the page and nobody reads them (vLLM drops them too)
        self.registry = CollectorRegistry()
        labels = {"model_name": model}
        self._labels = labels
        kw = {"registry": self.registry}
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests by route and status code", ["route", "status"], **kw
        )
        self.finished = Counter(
            PREFIX + "request_success", "Requests the engine finished, by finish reason", ["model_name", "reason"], **kw
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", ["model_name"], **kw)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", ["model_name"], **kw)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token", ["model_name"], buckets=TTFT_BUCKETS, **kw
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between tokens", ["model_name"], buckets=ITL_BUCKETS, **kw
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Request latency", ["model_name"], buckets=E2E_BUCKETS, **kw
        )
        running = Gauge(PREFIX + "num_requests_running", "Requests the engine is generating", ["model_name"], **kw)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued for the engine", ["model_name"], **kw)
        running.labels(**labels).set_function(lambda: engine.load().get("running", 0))
        waiting.labels(**labels).set_function(lambda: engine.load().get("waiting", 0))
        if "kv_cache_usage" in engine.load():
            kv = Gauge(PREFIX + "kv_cache_usage_perc", "KV cache in use (1 = full)", ["model_name"], **kw)
            kv.labels(**labels).set_function(lambda: engine.load().get("kv_cache_usage", 0.0))
        memory = Gauge(PREFIX + "engine_resident_memory_bytes", "Resident memory of the engine's processes", **kw)
        memory.set_function(engine.memory)
        if getattr(engine, "recycle", False):
            self.registry.register(_Replacements(engine))
        # children made once: a labelled lookup per token would cost more than the observation
        self._ttft, self._itl, self._e2e = (h.labels(**labels) for h in (self.ttft, self.itl, self.e2e))
        self._prompt, self._generated = self.prompt_tokens.labels(**labels), self.generation_tokens.labels(**labels)

    def request(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()

    def completed(self, done: Completion, reason: str | None = None) -> None:
        """One finished engine request: its tokens and latencies (`reason` overrides its finish reason)."""
        self.finished.labels(reason=reason or done.finish_reason, **self._labels).inc()
        self._prompt.inc(done.prompt_len)
        self._generated.inc(len(done.tokens))
        if done.ttft is not None:
            self._ttft.observe(done.ttft)
            self._e2e.observe(done.e2e)
        for gap in done.itl:
            self._itl.observe(gap)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Replacements:
    """`compactlm:engine_worker_replacements_total`: a counter the engine keeps (read when scraped)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            PREFIX + "engine_worker_replacements", "Times the engine replaced its grown worker process"
        )
        family.add_metric([], self.engine.recycles)
        yield family
