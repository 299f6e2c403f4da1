"""The trtllm backend (TensorRT-LLM's current flow) on CPU: the checkpoint it writes reads back to the source, the
LLM-arguments YAML fits TensorRT-LLM's TorchLlmArgs, the command lines follow the limits, bad input is refused before
any work, and the runtime drives the LLM API (a stand-in for tensorrt_llm here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open

from compactlm.compress.checkpoint import load_model
from compactlm.core.errors import CompactLMError
from compactlm.engines.backends.trtllm import llm_args as la
from compactlm.engines.backends.trtllm.commands import command_lines
from compactlm.engines.build import build_engine
from compactlm.engines.config import BuildConfig, Limits
from compactlm.engines.registry import load_engine
from compactlm.engines.runtime import Request
from tests.helpers import logits, random_tokens, tiny_model

LIMITS = Limits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "engine.json").read_text())


def test_fp16_build_writes_a_checkpoint_transformers_loads_with_the_sources_logits(tiny_dir, tmp_path):
    out = build_engine(tiny_dir, tmp_path / "e", BuildConfig(backend="trtllm", precision="fp16", limits=LIMITS))
    info = manifest_of(out)["backend_info"]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "checkpoint", dtype=torch.float32)  # no compactlm code
    with safe_open(out / "checkpoint" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float16
    tokens = random_tokens(2, 16)
    source = logits(load_model(tiny_dir), tokens)
    error = (logits(exported, tokens) - source).abs().max().item()
    assert 0 < error < 0.05  # fp16 rounding, not nothing and not a different model
    assert info["verification"]["max_logit_error"] < 0.05 and info["verification"]["reader"] == "transformers"
    assert info["verification"]["top1_agreement"] > 0.95
    assert info["runtime_missing"] and "trtllm-serve checkpoint" in info["notice"]


def test_the_llm_arguments_fit_torch_llm_args_and_the_limits(tiny_dir, tmp_path):
    limits = Limits(max_batch_size=4, max_input_len=64, max_seq_len=96, max_num_tokens=48)
    out = build_engine(tiny_dir, tmp_path / "e", BuildConfig(backend="trtllm", tp_size=3, limits=limits))
    args = yaml.safe_load((out / "llm_args.yaml").read_text())
    fields = la.reference()["TorchLlmArgs"]
    assert set(args) <= set(fields) and "0004396720054fd8e205cbf616f21f0b57c6b412" in la.reference()["source"]
    assert (args["tensor_parallel_size"], args["max_batch_size"], args["max_input_len"]) == (3, 4, 64)
    assert (args["max_seq_len"], args["max_num_tokens"]) == (96, 48)
    assert args["enable_chunked_prefill"] is True  # a 64-token prompt does not fit one 48-token step
    assert args["cuda_graph_config"]["max_batch_size"] == 4
    assert set(args["kv_cache_config"]) <= set(la.reference()["KvCacheConfig"])
    assert la.read_llm_args(out / "llm_args.yaml") == args
    for name in ("model", "tensor_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len", "kv_cache_config"):
        assert name in fields  # the names Triton's llmapi model.yaml and trtllm-serve --config rely on


@pytest.mark.parametrize(
    "args,message",
    [
        ({"tp_size": 2}, "'tp_size' is not a field of TensorRT-LLM's TorchLlmArgs"),  # a CLI flag, not a field
        ({"max_batch_size": "8"}, "max_batch_size='8' does not fit Optional\\[int\\]"),
        ({"max_batch_size": True}, "does not fit"),
        ({"enable_chunked_prefill": 1}, "does not fit bool"),
        ({"kv_cache_config": {"free_gpu_memory": 0.9}}, "kv_cache_config.free_gpu_memory is not a field"),
        ({"kv_cache_config": {"free_gpu_memory_fraction": "0.9"}}, "does not fit Optional\\[float\\]"),
        ({"backend": "tensorrt"}, "backend='tensorrt' does not fit"),  # the removed engine backend
    ],
)
def test_llm_arguments_torch_llm_args_would_refuse_are_refused(args, message):
    with pytest.raises(CompactLMError, match=message):
        la.check_llm_args(args)
    la.check_llm_args({"backend": "pytorch", "max_batch_size": 8, "kv_cache_config": {"dtype": "fp8"}})


def test_command_lines_follow_the_limits_and_the_sweep():
    config = BuildConfig(backend="trtllm", tp_size=2, limits=Limits(16, 512, 1024, 2048))
    commands = command_lines(config, "student")
    assert commands["trtllm_serve"] == (
        "trtllm-serve checkpoint --host 127.0.0.1 --port 8000 --backend pytorch --config llm_args.yaml"
    )
    assert "--tensor-parallel-size 2 --max-model-len 1024 --max-num-seqs 16" in commands["vllm_serve"]
    (point,) = commands["trtllm_bench"]
    assert (point["isl"], point["osl"]) == (128, 128)
    assert "--input-mean 128 --input-stdev 0 --output-mean 128" in point["prepare"]
    assert point["throughput"] == [
        "trtllm-bench --model student --model_path checkpoint throughput --dataset dataset-128x128.jsonl "
        "--backend pytorch --config llm_args.yaml --concurrency 16 --num_requests 128"
    ]
    sized = BuildConfig(
        backend="trtllm",
        limits=Limits(32, 512, 1024, 2048),
        bench_shapes=((128, 128), (512, 256)),
        bench_batches=(1, 32),
    )
    points = command_lines(sized)["trtllm_bench"]
    assert [(p["isl"], p["osl"], len(p["throughput"])) for p in points] == [(128, 128, 2), (512, 256, 2)]
    assert points[1]["throughput"][0].endswith("--concurrency 1 --num_requests 8")
    with pytest.raises(CompactLMError, match="exceeds the engine's max_seq_len"):
        BuildConfig(backend="trtllm", limits=Limits(32, 512, 600, 2048), bench_shapes=((512, 256),))


def test_fp8_build_writes_the_unified_checkpoint_calibrated_on_the_data(retrain_checkpoints, tmp_path):
    teacher = retrain_checkpoints["teacher"]
    config = BuildConfig(
        backend="trtllm", precision="fp8", limits=LIMITS,
        calib_dataset=str(retrain_checkpoints["corpus"]), calib_samples=16, calib_seq_len=32,
    )  # fmt: skip
    out = build_engine(teacher, tmp_path / "e", config)
    ckpt = out / "checkpoint"
    quant = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and "lm_head" in quant["exclude_modules"]
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.self_attn.q_proj.input_scale").numel() == 1
    info = manifest_of(out)["backend_info"]
    assert info["calibration_tokens"] == 16 * 32 and info["dtype"] in ("bfloat16", "float16")
    check = info["verification"]
    assert check["reader"] == "compactlm unified reader" and "held-out" in check["tokens"]
    assert check["max_logit_error"] > 0 and abs(check["loss_delta"]) < 0.5
    assert (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file()


def test_a_unified_checkpoint_from_compress_quantize_is_copied_as_it_is(retrain_checkpoints, tmp_path):
    from compactlm.compress.quantize import QuantizeConfig, quantize_checkpoint

    corpus = str(retrain_checkpoints["corpus"])
    quantized = tmp_path / "q"
    quantize_checkpoint(
        retrain_checkpoints["teacher"],
        quantized,
        QuantizeConfig("fp8", calib_data=corpus, calib_samples=32, calib_seq_len=32),
    )
    out = build_engine(quantized, tmp_path / "e", BuildConfig(backend="trtllm", precision="fp8", limits=LIMITS))
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == (quantized / "model.safetensors").read_bytes()
    assert manifest_of(out)["backend_info"]["quantized_by"].startswith("compress quantize")
    with pytest.raises(CompactLMError, match="legacy trtllm-engine flow quantizes at build time"):
        build_engine(quantized, tmp_path / "e2", BuildConfig(backend="trtllm-engine", precision="fp8", limits=LIMITS))
    with pytest.raises(CompactLMError, match="build it with --precision fp8, not fp16"):
        build_engine(quantized, tmp_path / "e3", BuildConfig(backend="trtllm", precision="fp16", limits=LIMITS))


def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path):
    odd = tmp_path / "odd"
    tiny_model(intermediate_size=72).save_pretrained(odd)  # 72 is no multiple of 16
    cases = [
        (odd, BuildConfig(backend="trtllm", precision="fp8", limits=LIMITS), "FP8 GEMMs need multiples of 16"),
        (odd, BuildConfig(backend="trtllm", tp_size=4, limits=LIMITS), "tp_size 4 does not divide the model's 6"),
        (odd, BuildConfig(backend="trtllm", limits=Limits(4, 32, 4096, 64)), "exceeds the model's max_position"),
        (odd, BuildConfig(backend="trtllm", precision="int8-sq", limits=LIMITS), "no precision 'int8-sq'"),
    ]
    for source, config, message in cases:
        with pytest.raises(CompactLMError, match=message) as error:
            build_engine(source, tmp_path / "out", config)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


class FakeLLM:
    """Stands in for tensorrt_llm.LLM on CPU (token t+1 follows t, one response per step); records its kwargs."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        self.model, self.kwargs, self.closed = model, kwargs, False
        FakeLLM.instances.append(self)

    def generate_async(self, prompt, sampling_params, streaming):
        assert streaming and sampling_params.detokenize is False
        return FakeResult(prompt[-1], sampling_params)

    def shutdown(self):
        self.closed = True


class FakeResult:
    def __init__(self, last: int, params):
        self.last, self.params, self.made = last, params, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.made == self.params.max_tokens:
            raise StopAsyncIteration
        self.made += 1
        reason = "length" if self.made == self.params.max_tokens else None
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids_diff=[self.last + self.made], finish_reason=reason)])

    def abort(self):
        pass


def test_the_runtime_opens_the_checkpoint_with_its_llm_arguments(tiny_dir, tmp_path, monkeypatch):
    import compactlm.engines.backends.trtllm.shared as shared

    out = build_engine(tiny_dir, tmp_path / "e", BuildConfig(backend="trtllm", tp_size=3, limits=LIMITS))
    with pytest.raises(CompactLMError, match="tensorrt_llm is not importable.*trtllm-serve checkpoint"):
        load_engine(out)
    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    monkeypatch.setattr(shared, "runtime_missing", lambda: None)
    with load_engine(out) as engine:
        llm = FakeLLM.instances[-1]
        stream = engine.submit(Request((5, 6), 3, ignore_eos=True))
        chunks = [c for c, _ in stream]
    assert llm.model == str(out / "checkpoint") and llm.kwargs["skip_tokenizer_init"] is True
    assert llm.kwargs["tensor_parallel_size"] == 3 and llm.kwargs["max_num_tokens"] == LIMITS.max_num_tokens
    assert chunks == [[7], [8], [9]] and stream.result().finish_reason == "length" and llm.closed
