"""Integration: `compactlm serve` on the bundled SmolLM2-135M (torch engine: its build is a copy, seconds): text
prompts through its real tokenizer over Triton gRPC streaming, Triton's batched model and the OpenAI route give the
in-process engine's greedy tokens and their text."""

from __future__ import annotations

import json

import pytest

from compactlm.compress.models import pull
from compactlm.engines import BuildConfig, Limits, build_engine, load_engine
from tests.helpers import GrpcStream, free_ports, openai_stream, post, triton_inputs

pytestmark = pytest.mark.integration
pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (a dependency: pip install -e .)")
NEW = 24
PROMPTS = ["The Python standard library includes", "To open a file for reading, use"]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    limits = Limits(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=256)
    return build_engine(
        pull("smollm2-135m"), tmp_path_factory.mktemp("smol") / "torch", BuildConfig(backend="torch", limits=limits)
    )


def test_served_smollm2_gives_in_process_tokens_and_text(engine_dir):
    import tritonclient.grpc as grpcclient

    from compactlm.serve.server import ServeConfig, Server

    with load_engine(engine_dir) as engine:
        tokenizer = engine.tokenizer
        ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        want = [c.tokens for c in engine.generate(ids, NEW, ignore_eos=True)]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in want]
    assert all(len(t.split()) >= 5 for t in texts), texts  # real words, not noise

    http, grpc, metrics, openai = free_ports(4)
    config = ServeConfig(http_port=http, grpc_port=grpc, metrics_port=metrics, openai_port=openai)
    with Server(engine_dir, config):
        stream = GrpcStream(grpc)
        try:
            streamed = [stream.generate(text=p, max_tokens=NEW) for p in PROMPTS]
        finally:
            stream.close()
        assert [s[0] for s in streamed] == want and [s[1] for s in streamed] == texts

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        full = client.infer("compactlm_full", triton_inputs(grpcclient, text=PROMPTS[0], max_tokens=NEW, batched=True))
        assert full.as_numpy("output_ids")[0].tolist() == want[0]
        assert full.as_numpy("text_output")[0, 0].decode() == texts[0]

        for prompt, tokens, text in zip(PROMPTS, want, texts, strict=True):
            got = openai_stream(openai, {"prompt": prompt, "max_tokens": NEW, "ignore_eos": True})
            assert got[0] == tokens and got[1] == text and got[2] == "length"
        status, raw = post(openai, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": NEW, "ignore_eos": True})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == texts[1]
