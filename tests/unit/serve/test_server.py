"""`compactlm serve` on a tiny torch engine: a real Triton server (PyTriton's) on loopback, called through
tritonclient gRPC streaming and HTTP, Triton's generate_stream, and the OpenAI route; every front gives the
in-process engine's greedy tokens; bad requests get clear errors while the server goes on serving.
One server for the module (~6 s to start, ~6 s to stop)."""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import numpy as np
import pytest

from compactlm.engines import load_engine
from compactlm.serve.protocol import TRITON_FULL_MODEL, TRITON_MODEL
from tests.helpers import (
    HOST,
    GrpcStream,
    cli,
    free_ports,
    openai_stream,
    post,
    random_tokens,
    tiny_engine,
    triton_http_stream,
    triton_inputs,
)

pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (a dependency: pip install -e .)")
NEW = 12


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    folder = tiny_engine(tmp_path_factory.mktemp("serve"))
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(engine_dir):
    from compactlm.serve.server import ServeConfig, Server

    http, grpc, metrics, openai = free_ports(4)
    config = ServeConfig(
        http_port=http, grpc_port=grpc, metrics_port=metrics, openai_port=openai, max_batch_size=4, stream_instances=2
    )
    server = Server(engine_dir, config)
    try:
        server.start()
        yield server
    finally:
        server.stop()  # also ends tritonserver's lingering processes


@pytest.fixture(scope="module")
def expected(engine_dir):
    """Prompts of several lengths and the in-process engine's greedy continuation of each."""
    rows = random_tokens(3, 30, seed=7).tolist()
    prompts = [row[: 6 + 9 * i] for i, row in enumerate(rows)]
    with load_engine(engine_dir) as engine:
        tokens = [c.tokens for c in engine.generate(prompts, NEW, ignore_eos=True)]
    return prompts, tokens


def test_every_front_gives_the_in_process_greedy_tokens(server, expected):
    import tritonclient.http as httpclient

    prompts, tokens = expected
    cfg = server.config
    stream = GrpcStream(cfg.grpc_port)
    try:
        grpc = [stream.generate(ids=p, max_tokens=NEW) for p in prompts]
    finally:
        stream.close()
    assert [g[0] for g in grpc] == tokens and all(g[2] is None for g in grpc)

    sse = [triton_http_stream(cfg.http_port, {"input_ids": p, "max_tokens": NEW, "ignore_eos": True}) for p in prompts]
    assert all(status == 200 for status, _ in sse)
    assert [[t for e in events for t in np.ravel(e["output_ids"]).tolist()] for _, events in sse] == tokens

    client = httpclient.InferenceServerClient(f"{HOST}:{cfg.http_port}")
    full = [
        client.infer(TRITON_FULL_MODEL, triton_inputs(httpclient, ids=p, max_tokens=NEW, batched=True)) for p in prompts
    ]
    assert [r.as_numpy("output_ids")[0].tolist() for r in full] == tokens
    assert {r.as_numpy("finish_reason")[0, 0] for r in full} == {b"length"}

    streamed = [openai_stream(cfg.openai_port, {"prompt": p, "max_tokens": NEW, "ignore_eos": True}) for p in prompts]
    assert [s[0] for s in streamed] == tokens
    assert {s[2] for s in streamed} == {"length"}
    status, raw = post(cfg.openai_port, "/v1/completions", {"prompt": prompts[0], "max_tokens": NEW, "min_tokens": NEW})
    body = json.loads(raw)
    assert status == 200 and body["choices"][0]["token_ids"] == tokens[0]
    assert body["usage"] == {"prompt_tokens": len(prompts[0]), "completion_tokens": NEW, "total_tokens": 6 + NEW}

    # chat: the templated prompt's greedy tokens, the same through Triton gRPC and in-process
    messages = [{"role": "user", "content": "the model reads a page"}]
    chat_ids = server.service.chat_prompt(messages)
    (in_process,) = server.engine.generate([chat_ids], NEW, ignore_eos=True)
    stream = GrpcStream(cfg.grpc_port)
    try:
        assert stream.generate(ids=list(chat_ids), max_tokens=NEW)[0] == in_process.tokens
    finally:
        stream.close()
    chat = {"messages": messages, "max_completion_tokens": NEW, "ignore_eos": True, "temperature": 0}
    status, raw = post(cfg.openai_port, "/v1/chat/completions", chat)
    reply = json.loads(raw)
    assert status == 200 and reply["choices"][0]["message"]["content"] == server.service.decode(in_process.tokens)
    assert reply["usage"]["prompt_tokens"] == len(chat_ids) and reply["usage"]["completion_tokens"] == NEW


def test_text_in_gives_the_tokens_of_the_tokenized_prompt_and_their_text(server, engine_dir):
    text = "the engine and the server"
    cfg = server.config
    tokenizer = server.engine.tokenizer
    ids = tokenizer(text)["input_ids"]
    with load_engine(engine_dir) as engine:
        want = engine.generate([ids], NEW, ignore_eos=True)[0].tokens
    stream = GrpcStream(cfg.grpc_port)
    try:
        got, streamed_text, error = stream.generate(text=text, max_tokens=NEW)
    finally:
        stream.close()
    assert error is None and got == want
    assert streamed_text and streamed_text == tokenizer.decode(want, skip_special_tokens=True)
    status, raw = post(cfg.openai_port, "/v1/completions", {"prompt": text, "max_tokens": NEW, "ignore_eos": True})
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["token_ids"] == want and choice["text"] == streamed_text


def test_concurrent_streams_all_finish_and_full_requests_are_batched(server, expected):
    import tritonclient.http as httpclient

    prompts, tokens = expected
    cfg = server.config
    results: dict[int, list] = {}

    def one(i: int) -> None:
        stream = GrpcStream(cfg.grpc_port)
        try:
            results[i] = stream.generate(ids=prompts[i % 3], max_tokens=NEW)[0]
        finally:
            stream.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(8)] == [tokens[i % 3] for i in range(8)]

    # 8 same-shape requests at once: the dynamic batcher (max 4) makes fewer executions than requests
    client = httpclient.InferenceServerClient(f"{HOST}:{cfg.http_port}", concurrency=8)
    before = _metric(cfg.metrics_port, "nv_inference_exec_count", TRITON_FULL_MODEL)
    pending = [
        client.async_infer(TRITON_FULL_MODEL, triton_inputs(httpclient, ids=prompts[0], max_tokens=NEW, batched=True))
        for _ in range(8)
    ]
    assert [p.get_result().as_numpy("output_ids")[0].tolist() for p in pending] == [tokens[0]] * 8
    executions = _metric(cfg.metrics_port, "nv_inference_exec_count", TRITON_FULL_MODEL) - before
    assert 2 <= executions < 8, executions  # batches of at most max_batch_size=4


def test_the_openai_route_takes_many_connections_at_once(server, expected):
    prompts, tokens = expected
    port = server.config.openai_port
    results: dict[int, tuple] = {}
    body = {"prompt": prompts[0], "max_tokens": 2, "ignore_eos": True}

    def one(i: int) -> None:
        status, raw = post(port, "/v1/completions", body)
        results[i] = (status, json.loads(raw)["choices"][0]["token_ids"] if status == 200 else raw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(48)] == [(200, tokens[0][:2])] * 48


def _metric(port: int, name: str, model: str) -> float:
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match.group(1))


def test_health_readiness_and_metrics(server):
    cfg = server.config
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{TRITON_MODEL}/ready"):
        assert urllib.request.urlopen(f"http://{HOST}:{cfg.http_port}{path}", timeout=5).status == 200
    before = _metric(cfg.metrics_port, "nv_inference_request_success", TRITON_MODEL)
    assert triton_http_stream(cfg.http_port, {"input_ids": [5, 6], "max_tokens": 2})[0] == 200
    assert _metric(cfg.metrics_port, "nv_inference_request_success", TRITON_MODEL) == before + 1
    config = json.loads(urllib.request.urlopen(f"http://{HOST}:{cfg.http_port}/v2/models/{TRITON_MODEL}/config").read())
    assert config["instance_group"][0]["count"] == 2 and config["model_transaction_policy"]["decoupled"]
    models = json.loads(urllib.request.urlopen(f"http://{HOST}:{cfg.openai_port}/v1/models", timeout=5).read())
    assert [m["id"] for m in models["data"]] == ["tiny"]


BAD_TRITON = [
    ({"input_ids": [5, 6]}, "missing input 'max_tokens'"),
    ({"max_tokens": 4}, "missing input: the prompt"),
    ({"input_ids": [], "max_tokens": 4}, "the prompt is empty"),
    ({"text_input": "", "max_tokens": 4}, "the prompt is empty"),
    ({"input_ids": list(range(49)), "max_tokens": 4}, "longer than the engine's max_input_len 48"),
    ({"input_ids": [5], "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"input_ids": [5], "max_tokens": 96}, "exceeds the engine's max_seq_len 96"),
    ({"input_ids": [999], "max_tokens": 2}, "outside the vocabulary"),
]
BAD_OPENAI = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "no body"),
    ({"max_tokens": 4}, 400, "missing field 'prompt'"),
    ({"prompt": "", "max_tokens": 4}, 400, "the prompt is empty"),
    ({"prompt": [], "max_tokens": 4}, 400, "the prompt is empty"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens 0 generates nothing"),
    ({"prompt": [1, 2], "max_tokens": "8"}, 400, "'max_tokens': Input should be a valid integer"),
    ({"prompt": list(range(49)), "max_tokens": 4}, 400, "max_input_len 48"),
    ({"prompt": [1, 2], "max_tokens": 4, "n": 17}, 400, "'n': Input should be less than or equal to 16"),
    ({"prompt": [1, 2], "max_tokens": 4, "stop": list("abcde")}, 400, "at most 4 stop sequences"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "does not exist"),
]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, expected):
    import tritonclient.grpc as grpcclient

    prompts, tokens = expected
    cfg = server.config
    for body, message in BAD_TRITON:
        status, events = triton_http_stream(cfg.http_port, body)
        assert status == 400 and len(events) == 1, (body, status, events)
        assert message in events[0]["error"] and "Traceback" not in events[0]["error"], events[0]["error"]

    stream = GrpcStream(cfg.grpc_port)
    try:
        _, _, error = stream.generate(ids=prompts[0])  # no max_tokens
        assert "missing input 'max_tokens'" in error
        _, _, error = stream.generate(ids=[1.5, 2.0], max_tokens=4, dtype="FP32")
        assert "data-type is 'FP32', but model 'compactlm' expects 'INT32'" in error
        assert stream.generate(ids=prompts[1], max_tokens=NEW)[0] == tokens[1]  # the same stream goes on
    finally:
        stream.close()
    client = grpcclient.InferenceServerClient(f"{HOST}:{cfg.grpc_port}")
    with pytest.raises(Exception, match="the prompt is empty"):
        client.infer(TRITON_FULL_MODEL, triton_inputs(grpcclient, text="", max_tokens=4, batched=True))

    for body, code, message in BAD_OPENAI:
        status, raw = post(cfg.openai_port, "/v1/completions", body)
        error = json.loads(raw)["error"]
        assert status == code and message in error["message"], (body, status, error)
        assert error["type"] == "invalid_request_error"
    assert openai_stream(cfg.openai_port, {"prompt": prompts[2], "max_tokens": NEW, "ignore_eos": True})[0] == tokens[2]
    assert server.service.stats.refused["openai"] >= len(BAD_OPENAI)


def test_serve_cli_runs_by_default_and_refuses_a_missing_engine(tmp_path):
    for args in (["serve", "--help"], ["serve", "start", "--help"], ["serve", "triton-repo", "--help"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    assert "--max-batch-size" in cli("serve", "start", "--help").output
    result = cli("serve", tmp_path / "nothing")  # `serve ENGINE` is `serve start ENGINE`
    assert result.exit_code != 0 and "does not exist" in str(result.exception)


def test_a_route_that_never_started_stops_at_once(engine_dir):
    """Server.start stops what it made when Triton fails to start; the OpenAI route was made but not started."""
    from compactlm.serve.openai_api.route import OpenAIRoute
    from compactlm.serve.requests import GenerationService

    with load_engine(engine_dir) as engine:
        route = OpenAIRoute(GenerationService(engine, "tiny"), HOST, 0, "tiny")
        done = threading.Event()
        threading.Thread(target=lambda: (route.stop(drain_s=1), done.set()), daemon=True).start()
        assert done.wait(5), "stop() hung on a route that never served"


def test_start_goes_again_once_after_pytritons_handshake_race_and_only_then(monkeypatch, tmp_path):
    from compactlm.serve.server import HANDSHAKE_RACE, Server

    calls = []

    def lose_the_race_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"load failed for model 'compactlm': ... in {HANDSHAKE_RACE} ... Connection refused")
        return self

    monkeypatch.setattr(Server, "_start", lose_the_race_once)
    server = Server(tmp_path)
    assert server.start() is server and len(calls) == 2

    def fail(self):
        calls.append(1)
        raise RuntimeError("load failed for model 'compactlm': some other error")

    calls.clear()
    monkeypatch.setattr(Server, "_start", fail)
    with pytest.raises(RuntimeError, match="some other error"):
        server.start()
    assert len(calls) == 1  # any other failure is not retried


def test_a_step_budget_is_refused_where_the_engine_cannot_take_it(engine_dir):
    """--max-num-tokens is a cpu engine's load option; a torch engine gets a clear error before it loads, and a
    budget that is not a positive integer is refused by the config."""
    from compactlm.core.errors import CompactLMError
    from compactlm.serve.server import ServeConfig, Server

    with pytest.raises(CompactLMError, match="max_num_tokens must be a positive integer"):
        ServeConfig(triton=False, max_num_tokens=0)
    server = Server(engine_dir, ServeConfig(triton=False, openai_port=free_ports(1)[0], max_num_tokens=256))
    with pytest.raises(CompactLMError, match="a torch engine takes none at load"):
        server.start()
    assert server.engine is None
    assert "--max-num-tokens" in cli("serve", "start", "--help").output
