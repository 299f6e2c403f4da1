"""TensorRT-LLM end to end, both flows: the legacy engine flow (trtllm-engine: export, `trtllm-build`, generation) and
the current one (trtllm: the HF checkpoint loaded by tensorrt_llm.LLM), checked against transformers. Skipped unless
tensorrt_llm imports and a CUDA GPU is present (NVIDIA's TensorRT-LLM container)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from compactlm.engines.build import build_engine
from compactlm.engines.config import BuildConfig, Limits
from compactlm.engines.registry import load_engine
from compactlm.engines.runtime import Request
from tests.helpers import english_docs, save_word_tokenizer, tiny_model, write_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None, reason="needs TensorRT-LLM (its container)"),
]

LIMITS = Limits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=256)
PROMPTS = [[5, 17, 33, 2, 90], [7] * 12, list(range(40, 70))]
FP16_TOLERANCE = 0.25
"""A greedy token may differ from transformers' fp32 argmax only where the two best logits are this close."""


def tiny_llama():
    # head_dim 64: a size TensorRT-LLM's fused attention kernels cover; 2 KV heads so that tp 2 splits them.
    return tiny_model(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_hidden_layers=2, vocab_size=512,
    )  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trtllm") / "tiny"
    tiny_llama().save_pretrained(folder)
    texts = english_docs(120, words_per_doc=40)
    save_word_tokenizer(folder, texts)
    return {"checkpoint": folder, "corpus": write_jsonl(folder.parent / "corpus.jsonl", texts)}


@pytest.fixture(scope="module")
def fp16_engine(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "fp16"
    return build_engine(source["checkpoint"], out, BuildConfig(backend="trtllm-engine", limits=LIMITS))


def greedy_gaps(completions, prompts) -> torch.Tensor:
    """For every generated token: transformers' best logit minus the logit of the token the engine chose, with
    the engine's own tokens as the prefix (0 where the engine picked the fp32 argmax)."""
    model = tiny_llama().cuda()
    gaps = []
    with torch.inference_mode():
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([list(prompt) + completion.tokens], device="cuda")
            step_logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            chosen = step_logits.gather(-1, torch.tensor(completion.tokens, device="cuda")[:, None])[:, 0]
            gaps.append(step_logits.max(-1).values - chosen)
    return torch.cat(gaps).cpu()


def test_fp16_engine_is_built_and_its_greedy_tokens_follow_transformers(fp16_engine):
    info = json.loads((fp16_engine / "engine.json").read_text())["backend_info"]
    assert info["engine_built"] is True and (fp16_engine / "engine" / "config.json").is_file()
    assert any((fp16_engine / "engine").glob("rank0*.engine"))
    assert (fp16_engine / info["build_log"]).is_file()

    with load_engine(fp16_engine) as engine:
        completions = engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [len(c.tokens) for c in completions] == [16] * len(PROMPTS)
    assert all(c.finish_reason == "length" for c in completions)
    gaps = greedy_gaps(completions, PROMPTS)
    assert gaps.max() <= FP16_TOLERANCE, gaps


def test_tokens_stream_step_by_step_and_eos_stops_a_request(fp16_engine, tmp_path):
    with load_engine(fp16_engine) as engine:
        stream = engine.submit(Request(tuple(PROMPTS[0]), 24, ignore_eos=True))
        chunks = list(stream)
    tokens = [t for chunk, _ in chunks for t in chunk]
    times = [at for _, at in chunks]
    assert len(tokens) == 24 and len(chunks) > 1 and times == sorted(times)

    # Make the 4th greedy token the end-of-sequence id: without ignore_eos the request stops there.
    manifest = json.loads((fp16_engine / "engine.json").read_text())
    manifest["backend_info"]["eos_token_ids"] = [tokens[3]]
    copy = tmp_path / "eos-engine"
    shutil.copytree(fp16_engine, copy)
    (copy / "engine.json").write_text(json.dumps(manifest))
    with load_engine(copy) as engine:
        stopped = engine.generate([PROMPTS[0]], max_new_tokens=24, ignore_eos=False)[0]
    assert stopped.finish_reason == "stop"
    # the tokens before the end id are the greedy ones (whether the end id itself is returned is TensorRT-LLM's call)
    assert len(stopped.tokens) <= 4 and stopped.tokens == tokens[: len(stopped.tokens)]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="FP8 needs SM 8.9+"
)
def test_fp8_engine_generates_close_to_transformers(source, tmp_path):
    config = BuildConfig(
        backend="trtllm-engine", precision="fp8", limits=LIMITS,
        calib_dataset=str(source["corpus"]), calib_samples=8, calib_seq_len=32,
    )  # fmt: skip
    out = build_engine(source["checkpoint"], tmp_path / "fp8", config)
    info = json.loads((out / "engine.json").read_text())["backend_info"]
    assert info["engine_built"] is True and info["calibration_tokens"] == 8 * 32
    with load_engine(out) as engine:
        completions = engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [len(c.tokens) for c in completions] == [16] * len(PROMPTS)
    gaps = greedy_gaps(completions, PROMPTS)
    # FP8 is coarse on random tiny models (CPU simulation: 65-84% top-1 agreement): most steps still agree
    assert (gaps <= FP16_TOLERANCE).float().mean() >= 0.5, gaps


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_engine_matches_transformers(source, tmp_path):
    out = build_engine(
        source["checkpoint"], tmp_path / "tp2", BuildConfig(backend="trtllm-engine", tp_size=2, limits=LIMITS)
    )
    assert sorted(p.name for p in (out / "checkpoint").glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    with load_engine(out) as engine:
        completions = engine.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert greedy_gaps(completions, PROMPTS).max() <= FP16_TOLERANCE


def test_the_current_flow_loads_the_checkpoint_directly_and_follows_transformers(source, tmp_path):
    out = build_engine(source["checkpoint"], tmp_path / "current", BuildConfig(backend="trtllm", limits=LIMITS))
    info = json.loads((out / "engine.json").read_text())["backend_info"]
    assert info["runtime_missing"] is None and (out / "llm_args.yaml").is_file()
    with load_engine(out) as engine:
        completions = engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [len(c.tokens) for c in completions] == [16] * len(PROMPTS)
    assert greedy_gaps(completions, PROMPTS).max() <= FP16_TOLERANCE
