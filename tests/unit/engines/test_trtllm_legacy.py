"""The legacy trtllm-engine backend on CPU: TensorRT-LLM checkpoints exported with modelopt, read back and
compared with the source model (FP16/BF16/FP8, tensor-parallel ranks), the config repairs,
and the checkpoint-only build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import compactlm.engines.backends.trtllm.checkpoint as tc
from compactlm.core.errors import CompactLMError
from compactlm.engines.backends.trtllm.legacy import TrtllmEngineBackend, trtllm_build_command
from compactlm.engines.backends.trtllm.shared import runtime_missing
from compactlm.engines.build import build_engine
from compactlm.engines.config import BuildConfig, Limits
from compactlm.engines.registry import load_engine
from compactlm.engines.runtime import Request
from tests.helpers import REPO, logits, random_tokens, tiny_config, tiny_model

# (family, tp, overrides). The factory's models have head_dim 16 != hidden/heads (8) and tied embeddings.
CASES = [
    pytest.param("llama", 1, {}, id="llama-tp1"),
    pytest.param("llama", 2, {"num_key_value_heads": 2}, id="llama-tp2"),
    pytest.param("qwen2", 1, {}, id="qwen2-tp1"),  # q/k/v biases
    # 1 KV head copied to both ranks; vocab 251 padded to 252 across the ranks
    pytest.param("qwen2", 2, {"num_key_value_heads": 1, "vocab_size": 251}, id="qwen2-tp2-kvcopy-vocabpad"),
    pytest.param("qwen3", 2, {"num_key_value_heads": 2}, id="qwen3-tp2"),  # q/k norms
]
LIMITS = Limits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=128)

FP16_MAX_LOGIT_ERROR = 0.05
"""Measured 0.008-0.02 on these models (logit std ~1.4): weights rounded to fp16, math in fp32."""
FP8_MAX_LOSS_DELTA = 0.1
"""|loss(FP8) - loss(source)| in nats on random tokens: measured <= 0.05 (weights only) and <= 0.066 with FP8
inputs too, over 18 tiny models (3 families x tp 1/2 x 3 seeds). FP8 is coarse on these random models: top-1
agreement 0.65-0.84, mean |logit error| 0.13-0.30."""


def export(tmp_path: Path, family: str, tp: int, overrides: dict, precision: str, seed: int = 0):
    """(source model, its logits and tokens, checkpoint folder, export info); the source is left unquantized."""
    source = tiny_model(family, seed=seed, **overrides)
    tokens = random_tokens(2, 32, vocab=source.config.vocab_size, seed=7)
    source_logits = logits(source, tokens)
    model = tiny_model(family, seed=seed, **overrides)  # quantized in place by fp8
    calibration = list(random_tokens(4, 32, vocab=source.config.vocab_size, seed=11))
    folder = tmp_path / f"{family}-{precision}-tp{tp}"
    info = tc.export_checkpoint(
        model, folder, precision=precision, tp_size=tp, calibration=calibration, verify_tokens=tokens
    )
    return SimpleNamespace(source=source, model=model, tokens=tokens, logits=source_logits, folder=folder, info=info)


@pytest.mark.parametrize("family,tp,overrides", CASES)
def test_fp16_checkpoint_reads_back_as_the_fp16_rounded_source(tmp_path, family, tp, overrides):
    run = export(tmp_path, family, tp, overrides, "fp16")
    config, state = tc.load_trtllm_checkpoint(run.folder)

    assert config["mapping"]["tp_size"] == tp
    assert sorted((run.folder).glob("rank*.safetensors")) == [run.folder / f"rank{r}.safetensors" for r in range(tp)]
    source_state = run.source.state_dict()
    assert state.keys() == source_state.keys()
    for name, value in source_state.items():  # merged ranks, unpadded vocab, HF names: bit-exact after fp16
        assert torch.equal(state[name], value.half().float()), name

    exported = logits(tc.reference_model(run.source.config, state), run.tokens)
    error = (exported - run.logits).abs().max().item()
    assert 0 < error < FP16_MAX_LOGIT_ERROR
    assert run.info["verification"]["max_logit_error"] == pytest.approx(error, abs=1e-5)
    assert abs(run.info["verification"]["loss_delta"]) < 0.005
    assert "fp8_activations" not in run.info["verification"]


@pytest.mark.parametrize("family,tp,overrides", CASES)
def test_fp8_checkpoint_holds_modelopts_quantized_weights_and_stays_close(tmp_path, family, tp, overrides):
    run = export(tmp_path, family, tp, overrides, "fp8")
    config, state = tc.load_trtllm_checkpoint(run.folder)

    assert config["quantization"]["quant_algo"] == "FP8"
    assert "lm_head" in config["quantization"]["exclude_modules"]
    with safe_open(run.folder / f"rank{tp - 1}.safetensors", framework="pt") as f:
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("transformer.layers.0.mlp.proj.weights_scaling_factor").numel() == 1
        assert f.get_tensor("transformer.layers.0.mlp.fc.activation_scaling_factor").item() > 0
        assert f.get_tensor("lm_head.weight").dtype == torch.float16

    # Dequantized weights are exactly the source weights quantized with modelopt's calibrated per-tensor scales
    # (amax / 448, after it unified the q/k/v and gate/up scales for TensorRT-LLM's fused GEMMs), so merging
    # ranks and applying scales lost nothing. (modelopt's own fake-quant computes w * (448 / amax) and can land
    # on the other side of a rounding tie: one FP8 step on ~1 weight in 10^4.)
    modules = dict(run.model.named_modules())
    linears = [n.removesuffix(".weight") for n in state if n.startswith("model.layers.") and "proj.weight" in n]
    assert len(linears) == 7 * run.source.config.num_hidden_layers
    for name in linears:
        weight, scale = run.source.state_dict()[name + ".weight"], modules[name].weight_quantizer.amax.float() / 448
        expected = (weight / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.allclose(state[name + ".weight"], expected, rtol=0, atol=1e-6), name
        assert not torch.equal(state[name + ".weight"], weight)

    check = run.info["verification"]
    for result in (check, check["fp8_activations"]):
        assert abs(result["loss_delta"]) < FP8_MAX_LOSS_DELTA
        assert result["top1_agreement"] > 0.5
        assert FP16_MAX_LOGIT_ERROR < result["max_logit_error"] < 5
    assert set(tc.activation_scales(run.folder)) == {n for n in linears}
    assert run.info["calibration_tokens"] == 4 * 32


def test_bf16_checkpoint_holds_bf16_weights(tmp_path):
    run = export(tmp_path, "llama", 2, {"num_key_value_heads": 2}, "bf16")
    config, state = tc.load_trtllm_checkpoint(run.folder)
    assert config["dtype"] == "bfloat16"
    for name, value in run.source.state_dict().items():
        assert torch.equal(state[name], value.bfloat16().float()), name
    assert FP16_MAX_LOGIT_ERROR < run.info["verification"]["max_logit_error"] < 0.5


def test_config_has_the_real_rope_base_and_the_models_shape(tmp_path):
    model = tiny_model("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    folder = tmp_path / "ckpt"
    info = tc.export_checkpoint(model, folder, precision="fp16", tp_size=2, verify_tokens=None)
    config = json.loads((folder / "config.json").read_text())

    # modelopt alone writes no rotary_base under transformers 5 (TensorRT-LLM would use its own default)
    assert info["config_fixes"]["rotary_base"] == ["<missing>", 123456.0]
    assert config["rotary_base"] == 123456.0 and config["rotary_scaling"] is None
    assert config["qwen_type"] == "qwen2" and config["attn_bias"] is True and config["mlp_bias"] is False
    assert config["architecture"] == "Qwen2ForCausalLM"
    assert config["head_size"] == 16 != config["hidden_size"] // config["num_attention_heads"]
    expected = {"num_hidden_layers": 4, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 6,
                "num_key_value_heads": 3, "vocab_size": 256, "max_position_embeddings": 128, "norm_epsilon": 1e-6,
                "dtype": "float16", "hidden_act": "silu", "position_embedding_type": "rope_gpt_neox"}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert "verification" not in info


def test_tied_embeddings_are_exported_as_a_separate_equal_lm_head(tmp_path):
    tied = export(tmp_path, "llama", 1, {}, "fp16")
    _, state = tc.load_trtllm_checkpoint(tied.folder)
    record = {k: tied.info[k] for k in ("tied_embeddings", "share_embedding_table", "lm_head_duplicated")}
    assert record == {"tied_embeddings": True, "share_embedding_table": False, "lm_head_duplicated": True}
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])

    untied = export(tmp_path / "untied", "llama", 1, {"tie_word_embeddings": False}, "fp16")
    _, state = tc.load_trtllm_checkpoint(untied.folder)
    assert untied.info["lm_head_duplicated"] is False
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"], untied.source.lm_head.weight.half().float())


def test_rope_scaling_is_written_with_its_type(tmp_path):
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    tc.export_checkpoint(tiny_model("llama", rope_parameters=llama3), tmp_path, precision="fp16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rotary_base"] == 500000.0
    assert config["rotary_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip

    linear = SimpleNamespace(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    assert tc.rope_settings(linear) == (1e4, {"type": "linear", "factor": 2.0})
    with pytest.raises(CompactLMError, match="longrope.*default, linear"):
        tc.rope_settings(SimpleNamespace(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))


def test_reader_refuses_incomplete_or_foreign_checkpoints(tmp_path):
    run = export(tmp_path, "llama", 2, {"num_key_value_heads": 2}, "fp16")
    (run.folder / "rank1.safetensors").unlink()
    with pytest.raises(CompactLMError, match="rank1.safetensors is missing"):
        tc.load_trtllm_checkpoint(run.folder)
    with pytest.raises(CompactLMError, match="not a TensorRT-LLM checkpoint"):
        tc.load_trtllm_checkpoint(tmp_path)


def test_checkpoint_only_build_records_the_trtllm_build_command_and_load_says_why(tiny_dir, tmp_path):
    out = build_engine(
        tiny_dir, tmp_path / "engine", BuildConfig(backend="trtllm-engine", checkpoint_only=True, limits=LIMITS)
    )
    manifest = json.loads((out / "engine.json").read_text())
    info = manifest["backend_info"]

    assert manifest["backend"] == "trtllm-engine" and manifest["precision"] == "fp16"
    assert info["engine_built"] is False and "checkpoint_only" in info["notice"]
    assert info["trtllm_build_command"] == (
        "trtllm-build --checkpoint_dir checkpoint --output_dir engine --max_batch_size 4 --max_input_len 32 "
        "--max_seq_len 64 --max_num_tokens 128 --gemm_plugin auto"
    )
    assert (out / "checkpoint" / "config.json").is_file() and (out / "checkpoint" / "rank0.safetensors").is_file()
    assert not (out / "engine").exists()
    assert info["verification"]["max_logit_error"] < FP16_MAX_LOGIT_ERROR
    assert info["verification"]["tokens"].startswith("random tokens")  # tiny_dir has no tokenizer

    with pytest.raises(CompactLMError, match=r"no engine \(checkpoint_only was asked\).*trtllm-build --checkpoint_dir"):
        load_engine(out)


@pytest.mark.skipif(runtime_missing() is None, reason="TensorRT-LLM and a GPU are here: the engine gets built")
def test_build_without_tensorrt_llm_stops_at_the_checkpoint_and_names_what_is_missing(tiny_dir, tmp_path):
    out = build_engine(tiny_dir, tmp_path / "engine", BuildConfig(backend="trtllm-engine", limits=LIMITS, tp_size=3))
    info = json.loads((out / "engine.json").read_text())["backend_info"]
    assert info["engine_built"] is False
    assert runtime_missing() in info["notice"] and runtime_missing() == info["engine_missing"]
    assert info["trtllm_build_command"].endswith("--gemm_plugin auto --workers 3")
    assert sorted(p.name for p in (out / "checkpoint").glob("rank*")) == [f"rank{r}.safetensors" for r in range(3)]
    with pytest.raises(CompactLMError, match=runtime_missing()):
        load_engine(out)


def test_fp8_build_calibrates_on_the_data_and_verifies_on_held_out_text(retrain_checkpoints, tmp_path):
    config = BuildConfig(
        backend="trtllm-engine", precision="fp8", checkpoint_only=True, limits=LIMITS,
        calib_dataset=str(retrain_checkpoints["corpus"]), calib_samples=4, calib_seq_len=16,
    )  # fmt: skip
    out = build_engine(retrain_checkpoints["teacher"], tmp_path / "fp8", config)
    manifest = json.loads((out / "engine.json").read_text())
    info = manifest["backend_info"]
    assert manifest["precision"] == "fp8" and info["calibration_tokens"] == 4 * 16
    assert json.loads((out / "checkpoint" / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    assert info["verification"]["tokens"].endswith("(held-out split)")
    assert abs(info["verification"]["fp8_activations"]["loss_delta"]) < FP8_MAX_LOSS_DELTA
    assert info["tokenizer"] is True


def test_unknown_precision_and_unfit_shapes_are_refused_before_any_work(tiny_dir, tmp_path):
    with pytest.raises(CompactLMError, match="no precision 'int4'; choose from fp16, bf16, fp8"):
        build_engine(tiny_dir, tmp_path / "a", BuildConfig(backend="trtllm-engine", precision="int4", limits=LIMITS))
    with pytest.raises(CompactLMError, match="tp_size 4 does not divide the model's 6 attention heads"):
        build_engine(tiny_dir, tmp_path / "b", BuildConfig(backend="trtllm-engine", tp_size=4, limits=LIMITS))
    with pytest.raises(CompactLMError, match="tp_size 2 and the model's 3 KV heads"):
        build_engine(tiny_dir, tmp_path / "c", BuildConfig(backend="trtllm-engine", tp_size=2, limits=LIMITS))
    assert not any((tmp_path / name).exists() for name in "abc")

    backend = TrtllmEngineBackend()
    mistral = tiny_config("mistral", sliding_window=32)
    with pytest.raises(CompactLMError, match="sliding window of 32 tokens"):
        backend.check_model(mistral, BuildConfig(backend="trtllm-engine", limits=LIMITS))
    backend.check_model(mistral, BuildConfig(backend="trtllm-engine", limits=Limits(4, 16, 32, 64)))
    with pytest.raises(CompactLMError, match="FP8 GEMMs need multiples of 16"):
        backend.check_model(
            tiny_config("llama", intermediate_size=72), BuildConfig(backend="trtllm-engine", precision="fp8")
        )


def test_build_command_follows_the_limits():
    command = trtllm_build_command(BuildConfig(backend="trtllm-engine", tp_size=2, limits=Limits(8, 100, 300, 900)))
    pairs = dict(zip(command[1::2], command[2::2], strict=False))
    assert pairs == {"--checkpoint_dir": "checkpoint", "--output_dir": "engine", "--max_batch_size": "8",
                     "--max_input_len": "100", "--max_seq_len": "300", "--max_num_tokens": "900",
                     "--gemm_plugin": "auto", "--workers": "2"}  # fmt: skip


def test_importing_the_backend_imports_neither_modelopt_nor_tensorrt_llm():
    code = (
        "import sys, compactlm.engines.backends.trtllm.legacy, compactlm.engines.backends.trtllm.pytorch\n"
        "import compactlm.engines.backends.trtllm.checkpoint, compactlm.compress.unified\n"
        "heavy = [m for m in ('modelopt', 'tensorrt_llm') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


class FakeLLM:
    """Stands in for TensorRT-LLM's LLM API on CPU: token t+1 follows t, one response per step, like
    `generate_async(..., streaming=True)`; stops at end_id unless ignore_eos."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, skip_tokenizer_init: bool, tensor_parallel_size: int):
        self.model, self.tp, self.requests, self.results, self.closed = model, tensor_parallel_size, [], [], False
        FakeLLM.instances.append(self)

    def generate_async(self, prompt, sampling_params, streaming):
        assert streaming and sampling_params.detokenize is False and sampling_params.top_k == 1
        self.requests.append((prompt, sampling_params))
        self.results.append(FakeResult(prompt[-1], sampling_params))
        return self.results[-1]

    def shutdown(self):
        self.closed = True


class FakeResult:
    def __init__(self, last: int, params):
        self.last, self.params, self.made, self.aborted = last, params, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        import asyncio

        if self.made == self.params.max_tokens or getattr(self, "stopped", False):
            raise StopAsyncIteration
        await asyncio.sleep(0.001)
        self.made += 1
        token = (self.last + self.made) % 256
        self.stopped = not self.params.ignore_eos and token == self.params.end_id
        reason = "stop" if self.stopped else "length" if self.made == self.params.max_tokens else None
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids_diff=[token], finish_reason=reason)])

    def abort(self):
        self.aborted = True


def test_engine_streams_requests_through_the_llm_api(tiny_dir, tmp_path, monkeypatch):
    import compactlm.engines.backends.trtllm.legacy as backend

    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(backend, "runtime_missing", lambda: None)
    out = build_engine(
        tiny_dir, tmp_path / "e", BuildConfig(backend="trtllm-engine", checkpoint_only=True, limits=LIMITS)
    )
    (out / "engine").mkdir()
    (out / "engine" / "config.json").write_text("{}")  # as if trtllm-build had run in the container

    with load_engine(out) as engine:
        llm = FakeLLM.instances[-1]
        assert llm.model == str(out / "engine") and llm.tp == 1
        stream = engine.submit(Request((5, 6, 7), 5, ignore_eos=True))
        chunks = list(stream)
        done = engine.generate([[1], [2]], max_new_tokens=4, ignore_eos=False)  # eos id 2 (the factory's)
        unfinished = engine.submit(Request((9,), 60, ignore_eos=True))
        next(iter(unfinished))  # running when the engine closes
    assert [c for c, _ in chunks] == [[8], [9], [10], [11], [12]] and stream.result().finish_reason == "length"
    assert done[0].tokens == [2] and done[0].finish_reason == "stop"
    assert done[1].tokens == [3, 4, 5, 6] and done[1].finish_reason == "length"
    params = llm.requests[0][1]
    assert (params.ignore_eos, params.end_id, params.max_tokens) == (True, 2, 5)
    assert unfinished.result(timeout=5).finish_reason == "cancelled" and len(unfinished.tokens) < 60
    assert llm.results[-1].aborted and llm.closed


def test_each_flow_names_the_families_it_runs_before_any_work():
    from compactlm.engines.backends.trtllm.pytorch import TrtllmBackend

    big = Limits(4, 16, 32, 64)
    current, legacy = TrtllmBackend(), TrtllmEngineBackend()
    for family in ("gemma2", "olmo2", "qwen2_moe"):
        with pytest.raises(CompactLMError, match=f"does not run {family} models; it takes llama, mistral"):
            current.check_model(tiny_config(family), BuildConfig(backend="trtllm", limits=big))
    for family in ("gemma3_text", "phi3", "granite", "olmo2", "mixtral", "qwen3_moe"):
        with pytest.raises(CompactLMError, match=f"legacy TensorRT-LLM checkpoint export does not run {family}"):
            legacy.check_model(tiny_config(family), BuildConfig(backend="trtllm-engine", limits=big))
    for family in ("phi3", "granite", "mixtral", "qwen3_moe"):  # on the current flow's list: the other checks pass
        current.check_model(tiny_config(family), BuildConfig(backend="trtllm", limits=big))
    fp8 = BuildConfig(backend="trtllm", precision="fp8", limits=big)
    with pytest.raises(CompactLMError, match="FP8 GEMMs need multiples of 16; the model's expert FFN width per rank"):
        current.check_model(tiny_config("qwen3_moe", moe_intermediate_size=24), fp8)
