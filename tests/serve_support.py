"""Clients and helpers for the `compactlm serve` tests: free loopback ports, Triton gRPC/HTTP streams, the
OpenAI route, and a wait for a server that starts in another process."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import time
import urllib.error
import urllib.request

import numpy as np

from engines.protocol import (
    TRITON_FINAL,
    TRITON_IGNORE_EOS,
    TRITON_INPUT_IDS,
    TRITON_MAX_TOKENS,
    TRITON_MODEL,
    TRITON_OUTPUT_IDS,
    TRITON_TEXT_INPUT,
    TRITON_TEXT_OUTPUT,
)

HOST = "127.0.0.1"


def tiny_engine(root):
    """A tiny Llama with a word tokenizer, built as a torch engine (seconds): what the serving tests serve."""
    from engines import BuildConfig, Limits, build_engine
    from tests.factory import tiny_model
    from tests.unit.helpers import english_docs, save_word_tokenizer

    tiny_model("llama").save_pretrained(root / "ckpt")
    save_word_tokenizer(root / "ckpt", english_docs(40))
    limits = Limits(max_batch_size=8, max_input_len=48, max_seq_len=96, max_num_tokens=256)
    return build_engine(root / "ckpt", root / "tiny", BuildConfig(backend="torch", limits=limits))


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now (bound to port 0, then released)."""
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def triton_inputs(module, ids=None, text=None, max_tokens=None, ignore_eos=True, batched=False, dtype="INT32"):
    """tritonclient InferInputs of the protocol (module: tritonclient.grpc or .http); None leaves one out."""
    tensors = []
    if ids is not None:
        tensors.append((TRITON_INPUT_IDS, np.asarray(ids, dtype=np.int32 if dtype == "INT32" else np.float32), dtype))
    if text is not None:
        tensors.append((TRITON_TEXT_INPUT, np.asarray([text.encode()], dtype=object), "BYTES"))
    if max_tokens is not None:
        tensors.append((TRITON_MAX_TOKENS, np.asarray([max_tokens], dtype=np.int32), "INT32"))
    if ignore_eos is not None:
        tensors.append((TRITON_IGNORE_EOS, np.asarray([ignore_eos]), "BOOL"))
    inputs = []
    for name, array, kind in tensors:
        array = array[None, :] if batched else array
        tensor = module.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class GrpcStream:
    """One tritonclient gRPC stream: `generate(...)` returns (token ids, text, error) of one request."""

    def __init__(self, port: int):
        import tritonclient.grpc as grpcclient

        self.module = grpcclient
        self.client = grpcclient.InferenceServerClient(f"{HOST}:{port}")
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def generate(self, timeout: float = 60, **inputs) -> tuple[list[int], str, str | None]:
        self.client.async_stream_infer(
            TRITON_MODEL, triton_inputs(self.module, **inputs), enable_empty_final_response=True
        )
        ids, text = [], ""
        while True:
            result, error = self.responses.get(timeout=timeout)
            if error is not None:
                return ids, text, str(error)
            response = result.get_response()
            out = result.as_numpy(TRITON_OUTPUT_IDS)
            if out is not None:
                ids += out.tolist()
            pieces = result.as_numpy(TRITON_TEXT_OUTPUT)
            if pieces is not None:
                text += b"".join(pieces.reshape(-1)).decode()
            final = response.parameters.get(TRITON_FINAL)
            if final is not None and final.bool_param:
                return ids, text, None

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def post(port: int, path: str, body, timeout: float = 60) -> tuple[int, bytes]:
    """POST a JSON body (or raw bytes) and read the whole answer."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, raw = response.status, response.read()
    conn.close()
    return status, raw


def sse(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]


def triton_http_stream(port: int, body: dict) -> tuple[int, list[dict]]:
    status, raw = post(port, f"/v2/models/{TRITON_MODEL}/generate_stream", body)
    return status, [json.loads(event) for event in sse(raw)]


def openai_stream(port: int, body: dict) -> tuple[list[int], str, str | None, dict | None]:
    """A streaming /v1/completions: (token ids, text, finish_reason, usage); fails on a missing [DONE]."""
    status, raw = post(port, "/v1/completions", {**body, "stream": True})
    assert status == 200, raw
    events = sse(raw)
    assert events[-1] == "[DONE]", events[-3:]
    ids, text, finish, usage = [], "", None, None
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            ids += choice["token_ids"]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return ids, text, finish, usage


def wait_ready(http_port: int, openai_port: int | None, timeout: float = 120, process=None) -> None:
    """Wait until Triton's models answer ready (and the OpenAI route its health), or fail."""
    urls = [f"http://{HOST}:{http_port}/v2/models/{TRITON_MODEL}/ready"]
    if openai_port:
        urls.append(f"http://{HOST}:{openai_port}/health")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if all(urllib.request.urlopen(url, timeout=2).status == 200 for url in urls):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the server was not ready within {timeout} s")
