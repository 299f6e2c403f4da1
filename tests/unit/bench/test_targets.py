"""Remote targets against tiny in-test servers on 127.0.0.1: OpenAI SSE, Triton HTTP SSE, Triton gRPC streaming,
and a server that dies in the middle of a run."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from compactlm.bench.loadgen import Load, run_load
from compactlm.bench.metrics import summarize
from compactlm.bench.results import ResultsFile
from compactlm.bench.runner import plan, run_benchmark
from compactlm.bench.targets import OpenAITarget, TritonHttpTarget, iter_sse, open_target
from compactlm.bench.targets.sse_client import SSEParser
from compactlm.bench.workload import Workload, WorkloadSpec


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a dying server must not wait for its own streams


class FakeServer:
    """Streams `max_tokens` tokens per request: the first `ttft` s after the request, then one every `itl` s.
    Speaks OpenAI `/v1/completions` and Triton `generate_stream`; `die_after`: the request after that many kills it;
    `template`: tokens the server adds to each prompt (as a chat template does), reported in usage.prompt_tokens."""

    def __init__(self, ttft=0.01, itl=0.005, die_after=None, token_ids=True, per_chunk=1, template=None):
        self.ttft, self.itl, self.die_after = ttft, itl, die_after
        self.token_ids, self.per_chunk, self.template = token_ids, per_chunk, template
        self.bodies: list[dict] = []
        self.sent: dict[tuple, list[float]] = {}
        """When each token's event was written, per prompt (the same perf_counter clock as the client's)."""
        self.dead = threading.Event()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def kill(self) -> None:
        if not self.dead.is_set():
            self.dead.set()
            self.httpd.shutdown()
            self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send({"data": [{"id": "fake-model"}]}, "application/json")

            def do_POST(self):
                arrived = time.perf_counter()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                if server.die_after is not None and len(server.bodies) > server.die_after:
                    server.kill()
                    return  # the connection drops with no answer
                n = body.get("max_tokens")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                openai = self.path == "/v1/completions"
                for start in range(0, n, server.per_chunk):
                    time.sleep(max(0.0, arrived + server.ttft + start * server.itl - time.perf_counter()))
                    if server.dead.is_set():
                        return  # killed mid-stream
                    ids = list(range(start, min(n, start + server.per_chunk)))
                    if openai:
                        choice = {
                            "index": 0,
                            "text": " w" * len(ids),
                            "finish_reason": "length" if ids[-1] == n - 1 else None,
                        }
                        if server.token_ids:
                            choice["token_ids"] = ids
                        event = {"choices": [choice]}
                    else:
                        event = {"model_name": "m", "output_ids": ids}
                    prompt = tuple(body.get("prompt") or body.get("input_ids"))
                    server.sent.setdefault(prompt, []).extend([time.perf_counter()] * len(ids))  # then send
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                if openai:
                    usage = {"completion_tokens": n}
                    if server.template is not None:
                        usage["prompt_tokens"] = len(prompt) + server.template
                    self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")

            def _send(self, obj, kind):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture
def server():
    servers = []

    def make(**kwargs):
        servers.append(FakeServer(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.kill()


def work(isl=6, osl=5, n=3):
    return Workload(WorkloadSpec(isl, osl), vocab_size=100).take(n)


def test_iter_sse_reads_events_like_a_browser():
    raw = b': comment\r\ndata: {"a": 1}\r\n\r\ndata: line one\ndata:line two\n\nevent: x\ndata: last'
    assert list(iter_sse(raw.splitlines(keepends=True))) == ['{"a": 1}', "line one\nline two", "last"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_sse_parser_gives_the_same_events_whatever_the_chunking(size):
    raw = b'data: {"a": 1}\r\n\r\n: keep-alive\n\ndata: x\r\ndata:y\r\n\r\nid: 3\ndata: z\n\ndata: tail'
    parser = SSEParser()
    events = [e for i in range(0, len(raw), size) for e in parser.feed(raw[i : i + size])] + parser.end()
    assert events == ['{"a": 1}', "x\ny", "z", "tail"]


def test_a_refusing_server_is_a_failed_record_with_its_status_and_message():
    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            data = b'{"error": {"message": "too many requests in flight"}}'
            self.send_response(429)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = _Server(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with OpenAITarget(f"http://127.0.0.1:{httpd.server_address[1]}", "m") as target:
            (record,) = run_load(target, work(n=1), Load("offline")).records
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not record.ok and "HTTP 429" in record.error and "too many requests in flight" in record.error


def test_a_request_past_its_timeout_is_a_failed_record_at_once(server):
    srv = server(ttft=5.0, itl=0.01)
    with OpenAITarget(srv.url, "m") as target:
        started = time.perf_counter()
        record = target.submit(work(n=1)[0]).result(timeout=0.3)
        assert time.perf_counter() - started < 2
    assert not record.ok and "no end within 0.3 s" in record.error


def test_openai_streams_are_timed_and_counted(server):
    srv = server(ttft=0.05, itl=0.01)
    with OpenAITarget(srv.url) as target:  # the model comes from /v1/models
        assert target.model == "fake-model"
        requests = work(n=4)
        run = run_load(target, requests[1:], Load("concurrency", concurrency=1), warmup=requests[:1])
    body = srv.bodies[0]
    assert body["prompt"] == list(requests[0].input_ids) and body["max_tokens"] == 5
    assert body["stream"] is True and body["ignore_eos"] is True and body["min_tokens"] == 5
    row = summarize(run.records)
    assert row["completed"] == 3 and row["errors"] == 0 and row["output_tokens_mean"] == 5
    # each token is stamped when its event arrives: right after the server wrote it (one clock, one process)
    delays = np.concatenate([np.subtract(r.token_times, srv.sent[requests[r.task_id].input_ids]) for r in run.records])
    assert len(delays) == 15 and delays.min() >= 0 and np.median(delays) < 0.002
    assert row["itl_ms_p50"] == pytest.approx(10, abs=1.5)  # the server's pace
    assert 50 <= row["ttft_ms_p50"] < 65  # the server's delay, plus localhost HTTP on a possibly busy machine


def test_openai_chunks_without_token_ids_are_counted_by_usage(server):
    srv = server(ttft=0.001, itl=0.001, token_ids=False, per_chunk=2)
    with OpenAITarget(srv.url, "m") as target:
        records = run_load(target, work(osl=5, n=2), Load("offline")).records
    assert [r.output_tokens for r in records] == [5, 5] and all(r.ok for r in records)
    assert records[0].itl.count(0.0) >= 2  # the second token of each chunk arrived with the first


def test_the_prompt_is_counted_as_the_server_ran_it(server):
    """A chat template's tokens count as input, as usage.prompt_tokens says (GuideLLM and vLLM's bench count so);
    a server that does not say leaves the workload's length."""
    for template, expected in ((30, 36), (None, 6)):
        srv = server(ttft=0.001, itl=0.001, template=template)
        with OpenAITarget(srv.url, "m") as target:
            records = run_load(target, work(isl=6, n=2), Load("offline")).records
        assert [r.input_tokens for r in records] == [expected, expected]
        assert summarize(records)["input_tokens_mean"] == expected


def test_triton_http_generate_stream(server):
    srv = server(ttft=0.002, itl=0.001)
    target = open_target(f"triton+http://127.0.0.1:{srv.httpd.server_address[1]}/m")
    assert isinstance(target, TritonHttpTarget)
    with target:
        records = run_load(target, work(n=2), Load("concurrency", concurrency=2)).records
    assert all(r.ok and r.output_tokens == 5 for r in records)
    assert srv.bodies[0]["input_ids"] and srv.bodies[0]["max_tokens"] == 5 and srv.bodies[0]["ignore_eos"] is True


def test_a_server_dying_mid_run_fails_its_requests_and_keeps_earlier_points(server, tmp_path):
    srv = server(ttft=0.005, itl=0.002, die_after=6)
    results = ResultsFile(tmp_path / "results.csv")
    points = plan([(6, 5)], [Load("concurrency", concurrency=2)], requests=4, repeats=3)
    with OpenAITarget(srv.url, "m", vocab_size=100) as target:
        frame = run_benchmark(target, points, results, progress=False, timeout=10)
    saved = results.read()
    assert len(saved) == len(frame) == 3  # the run finished every point
    assert saved["errors"].tolist()[0] == 0 and saved["completed"].tolist()[0] == 4
    assert saved["errors"].tolist()[1] >= 1 and saved["errors"].tolist()[2] == 4
    assert saved["completed"].sum() + saved["errors"].sum() == 12
    assert "Connection" in saved["error_example"].iloc[2] or "refused" in saved["error_example"].iloc[2]


# -- Triton gRPC: a fake GRPCInferenceService that streams like a decoupled model ---------------------------------


def test_triton_grpc_streaming_protocol():
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    from concurrent import futures

    from tritonclient.grpc import service_pb2, service_pb2_grpc

    seen = []

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 - the gRPC method's name
            for request in request_iterator:
                tensors = {t.name: (t, raw) for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
                ids = np.frombuffer(tensors["input_ids"][1], dtype=np.int32)
                n = int(np.frombuffer(tensors["max_tokens"][1], dtype=np.int32)[0])
                seen.append((request.model_name, ids.tolist(), n, tensors["ignore_eos"][0].datatype))
                for k in range(n):
                    out = service_pb2.ModelInferResponse.InferOutputTensor(
                        name="output_ids", datatype="INT32", shape=[1]
                    )
                    raw = [np.array([k], dtype=np.int32).tobytes()]
                    response = service_pb2.ModelInferResponse(
                        model_name=request.model_name, id=request.id, outputs=[out], raw_output_contents=raw
                    )
                    yield service_pb2.ModelStreamInferResponse(infer_response=response)
                final = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                final.parameters["triton_final_response"].bool_param = True
                yield service_pb2.ModelStreamInferResponse(infer_response=final)

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with open_target(f"triton://127.0.0.1:{port}/llm", vocab_size=100) as target:
            requests = work(osl=4, n=4)
            records = run_load(target, requests, Load("concurrency", concurrency=2), timeout=20).records
    finally:
        grpc_server.stop(0)
    assert all(r.ok and r.output_tokens == 4 for r in records), [r.error for r in records]
    assert {s[0] for s in seen} == {"llm"} and seen[0][2] == 4 and seen[0][3] == "BOOL"
    assert sorted(s[1] for s in seen) == sorted(list(r.input_ids) for r in requests)
