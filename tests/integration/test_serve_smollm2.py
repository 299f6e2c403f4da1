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


def test_chat_through_the_openai_sdk_uses_smollm2s_template_and_scores_like_the_model(engine_dir):
    """The real chat template (inside the GGUF's tokenizer): the reply is the in-process greedy continuation of the
    templated prompt, streamed or not; echo + logprobs score a text as the model does."""
    import openai
    import torch

    from compactlm.serve.openai_api.route import OpenAIRoute
    from compactlm.serve.requests import GenerationService

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with load_engine(engine_dir) as engine:
        service = GenerationService(engine, "smol")
        ids = service.chat_prompt(messages)
        assert "<|im_start|>assistant" in engine.tokenizer.decode(list(ids))  # SmolLM2's ChatML template
        (done,) = engine.generate([ids], NEW, ignore_eos=False)
        want = service.decode(done.tokens)
        route = OpenAIRoute(service, "127.0.0.1", 0, "smol")
        route.start()
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{route.port}/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=NEW, temperature=0)
            assert reply.choices[0].message.content == want and "Paris" in want
            chunks = client.chat.completions.create(model="smol", messages=messages, max_tokens=NEW, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want

            text = "The Python standard library includes modules for files."
            scored = client.completions.create(model="smol", prompt=text, max_tokens=0, echo=True, logprobs=0)
            prompt = torch.tensor([engine.tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(engine.model(prompt).logits[0, :-1].float(), -1)
            expect = logp.gather(1, prompt[0, 1:, None])[:, 0].tolist()
            assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expect, abs=1e-3)
            assert scored.choices[0].text == text
        finally:
            route.stop(drain_s=2)
