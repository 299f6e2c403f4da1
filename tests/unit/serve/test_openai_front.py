"""The OpenAI front (FastAPI + uvicorn) alone on a tiny torch engine, driven by the real `openai` SDK: greedy tokens
equal the in-process engine's through completions and chat (streaming and not), seeded sampling repeats, stop
sequences, min_tokens, logprobs and echo scores equal the model's own log-softmax, Prometheus metrics count what
was served, a full queue answers 429, and a schema-driven fuzz run gets no 5xx."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from compactlm.engines import Request, load_engine
from compactlm.serve.openai_api.app import FrontLimits
from compactlm.serve.openai_api.route import OpenAIRoute
from compactlm.serve.requests import GenerationService
from tests.helpers import HOST, post, tiny_engine

openai = pytest.importorskip("openai")
NEW = 10
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21]]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    folder = tiny_engine(tmp_path_factory.mktemp("front"))
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = TEMPLATE
    config_file.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def served(engine_dir):
    engine = load_engine(engine_dir)
    service = GenerationService(engine, "tiny")
    route = OpenAIRoute(service, HOST, 0, "tiny", FrontLimits(body_timeout_s=2.0, max_queue=12))
    route.start()
    try:
        yield route
    finally:
        route.stop(drain_s=2)
        engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://{HOST}:{served.port}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(engine_dir):
    with load_engine(engine_dir) as engine:
        return [c.tokens for c in engine.generate(PROMPTS, NEW, ignore_eos=True)]


@pytest.fixture(scope="module")
def model(engine_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine_dir / "model").eval()


def test_completions_give_the_in_process_greedy_tokens_streamed_or_not(client, expected):
    whole = client.completions.create(
        model="tiny", prompt=PROMPTS, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
    )
    by_index = sorted(whole.choices, key=lambda c: c.index)
    assert [c.token_ids for c in by_index] == expected
    assert whole.usage.prompt_tokens == sum(map(len, PROMPTS)) and whole.usage.completion_tokens == NEW * 3
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=NEW,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        streamed = [t for c in chunks for choice in c.choices for t in choice.token_ids]
        assert streamed == tokens
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_gives_the_greedy_tokens_of_the_templated_prompt(client, engine_dir):
    messages = [{"role": "system", "content": "the model"}, {"role": "user", "content": "reads a page of text"}]
    with load_engine(engine_dir) as engine:
        service = GenerationService(engine, "x")
        ids = service.chat_prompt(messages)
        assert ids == tuple(
            engine.tokenizer(
                engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )["input_ids"]
        )
        (done,) = engine.generate([ids], NEW, ignore_eos=True)
        text = service.decode(done.tokens)
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == NEW
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=NEW, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_repeats_and_differs_from_greedy(client, expected):
    def sample(seed, n=1):
        out = client.completions.create(
            model="tiny",
            prompt=PROMPTS[0],
            max_tokens=NEW,
            temperature=1.5,
            seed=seed,
            n=n,
            extra_body={"ignore_eos": True},
        )
        return [c.token_ids for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(7)
    # the same seed while other requests share the batch: a request's tokens do not depend on its neighbours
    results = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, sample(7 if i == 0 else 100 + i))) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] == first
    assert first[0] != expected[0]  # temperature 1.5 over a random model's flat distribution
    assert sample(8) != first
    two = sample(7, n=2)
    assert two[0] == first[0] and two[1] != first[0]  # choice j samples with seed + j


def test_stop_sequences_and_stop_token_ids_end_the_text(client, engine_dir):
    body = {"model": "tiny", "max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for prompt in ("the model reads", "which word comes next", "the pruned student keeps", "layers heads"):
        whole = client.completions.create(prompt=prompt, **body).choices[0]
        words = whole.text.split()
        if len(set(words)) >= 2:
            break
    else:
        pytest.skip("the tiny model's greedy text holds no two words to stop at")
    stop = words[1] if words[1] != words[0] else words[-1]
    at = whole.text.index(stop)
    cut = client.completions.create(prompt=prompt, stop=[stop, "never there"], **body).choices[0]
    assert cut.text == whole.text[:at] and cut.finish_reason == "stop"
    kept = client.completions.create(
        prompt=prompt, stop=stop, **{**body, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}
    )
    assert kept.choices[0].text == whole.text[: at + len(stop)]
    streamed = client.completions.create(prompt=prompt, stop=[stop], stream=True, **body)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed if c.choices]
    assert "".join(p for p, _ in pieces) == whole.text[:at] and pieces[-1][1] == "stop"

    first = whole.token_ids[2]
    ended = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body={"stop_token_ids": [first]}
    )
    assert ended.choices[0].token_ids[-1] == first and ended.choices[0].finish_reason == "stop"
    assert len(ended.choices[0].token_ids) <= 3


def test_min_tokens_masks_the_stop_tokens_until_reached(engine_dir):
    with load_engine(engine_dir) as engine:
        (greedy,) = engine.generate([PROMPTS[1]], 12, ignore_eos=True)
        first = greedy.tokens[0]
        quick = engine.submit(Request(tuple(PROMPTS[1]), 12, ignore_eos=False, stop_token_ids=(first,))).result()
        assert quick.tokens == [first] and quick.finish_reason == "stop"
        held = engine.submit(
            Request(tuple(PROMPTS[1]), 12, ignore_eos=False, stop_token_ids=(first,), min_new_tokens=5)
        ).result()
        assert first not in held.tokens[:5] and len(held.tokens) >= 5


def test_logprobs_and_echo_scores_are_the_models_log_softmax(client, model, expected):
    prompt = PROMPTS[1]
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    ids = torch.tensor([prompt + expected[1]])
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    want = [reference[len(prompt) - 1 + i, t].item() for i, t in enumerate(expected[1])]
    assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(
        len(top) >= 1 and max(top.values()) == pytest.approx(lp, abs=1e-6)
        for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True)
    )

    # lm-evaluation-harness's loglikelihood request: echo + logprobs 1 + max_tokens 1 over token ids
    scored = client.completions.create(
        model="tiny", prompt=[prompt], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lps = scored.choices[0].logprobs.token_logprobs
    assert lps[0] is None and len(lps) == len(prompt) + 1
    prompt_want = [reference[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert lps[1 : len(prompt)] == pytest.approx(prompt_want, abs=1e-4)
    only = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert len(only.choices[0].logprobs.token_logprobs) == len(prompt) and only.usage.completion_tokens == 0
    # streamed: the first chunk carries the prompt's scores, then each chunk its tokens', as unstreamed
    whole = client.completions.create(model="tiny", prompt=[prompt], max_tokens=3, echo=True, logprobs=1, temperature=0)
    chunks = [
        c.choices[0]
        for c in client.completions.create(
            model="tiny", prompt=[prompt], max_tokens=3, echo=True, logprobs=1, temperature=0, stream=True
        )
        if c.choices
    ]
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6, nan_ok=True)
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.choices[0].logprobs.tokens
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    scored_only = [
        c.choices[0]
        for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0, stream=True
        )
        if c.choices
    ]
    assert [lp for c in scored_only if c.logprobs for lp in c.logprobs.token_logprobs][1:] == pytest.approx(
        only.choices[0].logprobs.token_logprobs[1:], abs=1e-6
    )

    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "the model"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(
        len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content
    )


def test_the_torch_engine_reports_its_kv_cache_use(engine_dir):
    with load_engine(engine_dir) as engine:
        assert engine.load()["kv_cache_usage"] == 0.0
        capacity = engine.limits.max_batch_size * engine.limits.max_seq_len
        stream, seen = engine.submit(Request(tuple(PROMPTS[0]), 40, ignore_eos=True)), []
        while not stream.done:
            seen.append(engine.load()["kv_cache_usage"] * capacity)
            time.sleep(0.002)
        assert len(stream.result().tokens) == 40
        positions = [round(v) for v in seen if v > 0]
        assert positions and all(len(PROMPTS[0]) <= v <= len(PROMPTS[0]) + 40 for v in positions)  # one row: its length
        assert positions == sorted(positions)  # grows a position a step
        assert engine.load()["kv_cache_usage"] == 0.0  # freed with the batch


def test_metrics_count_requests_tokens_and_latencies(served, client):
    def scrape() -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://{HOST}:{served.port}/metrics", timeout=10).read().decode()

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = scrape()
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, extra_body={"ignore_eos": True})
    post(served.port, "/v1/completions", {"prompt": ""})
    after = scrape()
    assert value(after, "compactlm:generation_tokens_total") - value(before, "compactlm:generation_tokens_total") == 5
    assert value(after, "compactlm:prompt_tokens_total") - value(before, "compactlm:prompt_tokens_total") == 4
    assert (
        value(after, "compactlm:time_to_first_token_seconds_count")
        == value(before, "compactlm:time_to_first_token_seconds_count") + 1
    )
    assert (
        value(after, "compactlm:inter_token_latency_seconds_count")
        - value(before, "compactlm:inter_token_latency_seconds_count")
        == 4
    )
    bad = 'compactlm:http_requests_total{route="/v1/completions",status="400"}'
    assert value(after, bad) == value(before, bad) + 1
    for name in (
        "compactlm:num_requests_running",
        "compactlm:num_requests_waiting",
        "compactlm:kv_cache_usage_perc",
        "compactlm:e2e_request_latency_seconds_bucket",
    ):
        assert name in after


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(served, client):
    service = served.service
    long = {"prompt": PROMPTS[0], "max_tokens": 80, "ignore_eos": True, "stream": True}
    conns = []
    for _ in range(12):  # the queue limit of this server
        conn = socket.create_connection((HOST, served.port))
        data = json.dumps(long).encode()
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        conns.append(conn)
    deadline = time.monotonic() + 30
    while served.app.state.admission.inflight < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, raw = post(served.port, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 2})
    assert status == 429 and json.loads(raw)["error"]["type"] == "rate_limit_exceeded"
    for conn in conns:  # every client leaves mid-stream
        conn.close()
    deadline = time.monotonic() + 30
    while served.app.state.admission.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.app.state.admission.inflight == 0
    cancelled = service.stats.failed["openai"]
    assert cancelled >= 1  # the engine ended them early ("cancelled"), not after 80 tokens each
    assert client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=2).choices[0].token_ids


def _raw(port: int, data: bytes, wait: float = 10) -> bytes:
    with socket.create_connection((HOST, port), timeout=wait) as conn:
        conn.sendall(data)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


BAD = [
    # (body, status, message fragment): the error is OpenAI's shape with this message
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "no body"),
    (b'"text"', 400, "must be a JSON object"),
    ({"max_tokens": 4}, 400, "missing field 'prompt'"),
    ({"prompt": "", "max_tokens": 4}, 400, "the prompt is empty"),
    ({"prompt": [], "max_tokens": 4}, 400, "the prompt is empty"),
    ({"prompt": [1, 2], "max_tokens": -1}, 400, "'max_tokens'"),
    ({"prompt": [1, 2], "max_tokens": 10**9}, 400, "max_seq_len"),
    ({"prompt": [1, 2], "max_tokens": "8"}, 400, "valid integer"),
    ({"prompt": [1, 2], "max_tokens": 4.5}, 400, "valid integer"),
    ({"prompt": [1, 2], "temperature": "hot"}, 400, "'temperature'"),
    ({"prompt": [1, 2], "temperature": 3}, 400, "'temperature'"),
    ({"prompt": [1, 2], "top_p": 0}, 400, "'top_p'"),
    ({"prompt": [1, 2], "bogus": 1}, 400, "unknown field 'bogus'"),
    ({"prompt": [1, -3]}, 400, "token id -3 is outside the vocabulary"),
    ({"prompt": [1, 999]}, 400, "outside the vocabulary"),
    ({"prompt": [[1, 2], "mixed"]}, 400, "'prompt'"),
    ({"prompt": list(range(1, 50))}, 400, "max_input_len 48"),
    ({"prompt": "x " * 200_000}, 400, "characters"),
    ({"prompt": "\ud800 lone"}, 400, "surrogate"),
    ({"prompt": [1, 2], "n": 0}, 400, "'n'"),
    ({"prompt": [1, 2], "stop": [""]}, 400, "stop sequence is empty"),
    ({"prompt": [1, 2], "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"prompt": [1, 2], "suffix": "end"}, 400, "suffix"),
    ({"prompt": [1, 2], "presence_penalty": 1.0}, 400, "temperature > 0"),
    ({"prompt": [1, 2], "logprobs": 21}, 400, "'logprobs'"),
    ({"prompt": [1, 2], "stream_options": {"bogus": True}}, 400, "unknown field"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "does not exist"),
]
BAD_CHAT = [
    ({"messages": []}, 400, "'messages'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "'messages.0.role'"),
    ({"messages": [{"role": "user"}], "max_completion_tokens": 0}, 400, "'max_completion_tokens'"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tool calls"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400, "JSON mode"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "needs logprobs"),
]


def test_bad_requests_get_4xx_in_openais_shape_and_the_server_keeps_serving(served, client, expected):
    kinds = 0
    for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for body, code, message in cases:
            status, raw = post(served.port, path, body)
            error = json.loads(raw)["error"]
            assert status == code and message in error["message"], (body, status, error)
            assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
            kinds += 1
    status, raw = post(served.port, "/v1/nothing", {"prompt": [1]})
    assert status == 404 and "error" in json.loads(raw)

    too_big = b"x" * (9 << 20)  # over the 8 MiB cap: refused from its Content-Length, unread
    reply = _raw(
        served.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(too_big) + too_big[:1000],
    )
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than" in reply
    started = time.monotonic()
    reply = _raw(served.port, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"prompt"')
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 8  # the test server waits 2 s
    reply = _raw(served.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400")
    chunked = b'{"prompt": [5, 6], "max_tokens": 2}'
    reply = _raw(
        served.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked), chunked),
    )
    assert reply.startswith(b"HTTP/1.1 200")
    kinds += 5
    assert kinds >= 20
    again = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=NEW, extra_body={"ignore_eos": True})
    assert again.choices[0].token_ids == expected[2]


def test_the_openapi_document_and_models_and_health(served, client):
    import urllib.request

    doc = json.loads(urllib.request.urlopen(f"http://{HOST}:{served.port}/openapi.json", timeout=10).read())
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert json.loads(urllib.request.urlopen(f"http://{HOST}:{served.port}/health").read()) == {"status": "ok"}


def test_schema_driven_fuzzing_finds_no_server_error(served):
    """schemathesis generates bodies from the OpenAPI document (valid and not); none may get a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"http://{HOST}:{served.port}/openapi.json")
    failures = []
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = schema[path]["POST"]

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 4)  # bounded: keep the run short
            if isinstance(case.body, dict):
                case.body.pop("stream", None)
            response = case.call(timeout=30)
            if response.status_code >= 500:
                failures.append((case.path, case.body, response.status_code, response.text[:300]))

        check()
    assert failures == []
