"""`compactlm serve triton-repo` for legacy engine folders: the inflight_batcher_llm repository written from a
trtllm-engine manifest. Every config.pbtxt is parsed with Triton's ModelConfig protobuf (tritonclient's) and checked
field by field; the Python models run here against a stand-in for `triton_python_backend_utils` (the real one exists
only inside Triton), with a fake tensorrt_llm model behind the BLS chain."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from compactlm.core.errors import CompactLMError
from compactlm.engines.config import Limits
from compactlm.engines.manifest import Manifest, write_manifest
from compactlm.serve.triton_repo import TritonRepoConfig, check_repository, parse_config, write_triton_repo
from tests.helpers import cli, english_docs, save_word_tokenizer

MODELS = ["preprocessing", "tensorrt_llm", "postprocessing", "ensemble"]


def fake_engine(root: Path, backend: str = "trtllm-engine", tp_size: int = 1, built: bool = False) -> Path:
    """An engine folder as `engines build --backend trtllm-engine --checkpoint-only` leaves it: manifest + tokenizer."""
    root.mkdir(parents=True)
    save_word_tokenizer(root / "tokenizer", english_docs(40))
    info = {"eos_token_ids": [1], "checkpoint_dir": "checkpoint", "engine_built": built}
    info["trtllm_build_command"] = "trtllm-build --checkpoint_dir checkpoint --output_dir engine --max_batch_size 16"
    manifest = Manifest(
        backend=backend,
        precision="fp16",
        limits=Limits(max_batch_size=16, max_input_len=512, max_seq_len=1024, max_num_tokens=2048),
        tp_size=tp_size,
        source={"path": "/ckpt", "sha256": "0" * 64, "record": None},
        model={"family": "llama", "num_layers": 2, "vocab_size": 256},
        backend_info=info,
    )
    write_manifest(root, manifest)
    return root


def read_config(repo: Path, name: str) -> pb.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), pb.ModelConfig())


def param(config: pb.ModelConfig, key: str) -> str:
    return config.parameters[key].string_value


def test_configs_are_filled_from_the_manifest(tmp_path):
    engine = fake_engine(tmp_path / "eng")
    config = TritonRepoConfig(kv_cache_free_gpu_mem_fraction=0.75, batch_scheduler_policy="max_utilization")
    repo = write_triton_repo(engine, tmp_path / "repo", config)
    assert repo.models == MODELS and sorted(p.name for p in repo.path.iterdir() if p.is_dir()) == sorted(MODELS)
    configs = {name: read_config(repo.path, name) for name in MODELS}
    assert {c.max_batch_size for c in configs.values()} == {16}
    llm = configs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert param(llm, "gpt_model_path") == str(engine.resolve() / "engine")
    assert param(llm, "gpt_model_type") == "inflight_fused_batching"
    assert param(llm, "kv_cache_free_gpu_mem_fraction") == "0.75"
    assert param(llm, "batch_scheduler_policy") == "max_utilization"
    assert param(llm, "exclude_input_in_output") == "true"
    assert list(llm.dynamic_batching.preferred_batch_size) == [16]
    inputs = {t.name: t for t in llm.input}
    assert inputs["input_ids"].allow_ragged_batch and inputs["input_lengths"].HasField("reshape")
    assert inputs["end_id"].optional and not inputs["request_output_len"].optional
    for name in ("preprocessing", "postprocessing"):
        assert param(configs[name], "tokenizer_dir") == str(engine.resolve() / "tokenizer")
        assert (repo.path / name / "1" / "model.py").is_file()
    ensemble = configs["ensemble"]
    assert ensemble.platform == "ensemble" and ensemble.model_transaction_policy.decoupled
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "preprocessing",
        "tensorrt_llm",
        "postprocessing",
    ]
    assert {t.name for t in ensemble.input} >= {"text_input", "max_tokens", "stream"}
    assert [t.name for t in ensemble.output] == ["text_output"]
    assert repo.command == [
        "tritonserver",
        f"--model-repository={repo.path}",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
    ]
    assert "trtllm-build" in repo.notices[0]  # checkpoint-only: build the engine first
    assert (repo.path / "serve.sh").read_text().endswith(repo.command_line + "\n")


def test_options_bls_no_streaming_and_tensor_parallel(tmp_path):
    engine = fake_engine(tmp_path / "eng", tp_size=2, built=True)
    config = TritonRepoConfig(
        decoupled=False, bls=True, max_batch_size=8, engine_path="/models/eng/engine", batching_strategy="V1"
    )
    repo = write_triton_repo(engine, tmp_path / "repo", config)
    assert repo.models == MODELS + ["tensorrt_llm_bls"] and repo.notices == []
    llm, bls = read_config(repo.path, "tensorrt_llm"), read_config(repo.path, "tensorrt_llm_bls")
    assert not llm.model_transaction_policy.decoupled and llm.max_batch_size == 8
    assert param(llm, "gpt_model_path") == "/models/eng/engine" and param(llm, "gpt_model_type") == "V1"
    assert not read_config(repo.path, "ensemble").model_transaction_policy.decoupled
    assert bls.model_transaction_policy.decoupled and param(bls, "tensorrt_llm_decoupled") == "false"
    assert repo.command[:2] == ["mpirun", "--allow-run-as-root"] and repo.command.count("tritonserver") == 2
    assert "--load-model=tensorrt_llm" in repo.command  # rank 1 loads only the engine
    with pytest.raises(CompactLMError, match="exists; give --overwrite"):
        write_triton_repo(engine, tmp_path / "repo", config)
    assert write_triton_repo(engine, tmp_path / "repo", TritonRepoConfig(), overwrite=True).models == MODELS


def test_refusals(tmp_path):
    with pytest.raises(CompactLMError, match="is a torch engine; Triton's TensorRT-LLM backend serves trtllm"):
        write_triton_repo(fake_engine(tmp_path / "torch", backend="torch"), tmp_path / "r1")
    engine = fake_engine(tmp_path / "eng")
    with pytest.raises(CompactLMError, match="exceeds the engine's max_batch_size 16"):
        write_triton_repo(engine, tmp_path / "r2", TritonRepoConfig(max_batch_size=32))
    with pytest.raises(CompactLMError, match=r"share of free GPU memory in \(0, 1\]"):
        TritonRepoConfig(kv_cache_free_gpu_mem_fraction=1.5)
    with pytest.raises(CompactLMError, match="is not a valid Triton model config"):
        parse_config('name: "x"\nmax_batch_size: "many"')
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_the_cross_check_catches_a_broken_ensemble(tmp_path):
    repo = write_triton_repo(fake_engine(tmp_path / "eng"), tmp_path / "repo").path
    configs = {name: read_config(repo, name) for name in MODELS}
    check_repository(configs)
    del configs["postprocessing"].output[:]
    with pytest.raises(CompactLMError, match="postprocessing has no output 'OUTPUT'"):
        check_repository(configs)
    configs = {name: read_config(repo, name) for name in MODELS}
    del configs["ensemble"].ensemble_scheduling.step[1].input_map["input_lengths"]
    with pytest.raises(CompactLMError, match=r"required inputs \['input_lengths'\] are not fed"):
        check_repository(configs)


def test_cli_writes_the_repository_and_prints_the_command(tmp_path):
    engine = fake_engine(tmp_path / "eng")
    result = cli("serve", "triton-repo", engine, tmp_path / "repo", "--kv-cache-fraction", "0.5", "--bls")
    assert result.exit_code == 0, result.output
    assert f"tritonserver --model-repository={(tmp_path / 'repo').resolve()}" in result.output
    assert param(read_config(tmp_path / "repo", "tensorrt_llm"), "kv_cache_free_gpu_mem_fraction") == "0.5"
    result = cli("serve", "triton-repo", engine, tmp_path / "repo2", "--scheduler-policy", "fifo")
    assert result.exit_code != 0 and "scheduler policy must be one of" in str(result.exception)


# -- the Python models, against a stand-in for triton_python_backend_utils


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.tensors = {t.name(): t for t in output_tensors or []}
        self._error = error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return list(self.tensors.values())


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


class _Request:
    def __init__(self, model_name=None, inputs=(), requested_output_names=(), **_):
        self.model_name, self.tensors = model_name, {t.name(): t for t in inputs}

    def get_response_sender(self):
        return self.sender


@pytest.fixture
def pb_utils(monkeypatch):
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.InferenceResponse, module.TritonError = _Tensor, _Response, _Error
    module.InferenceRequest = _Request
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    module.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    module.get_output_tensor_by_name = lambda response, name: response.tensors.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def load_model(repo: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"triton_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    text = (repo / name / "config.pbtxt").read_text()
    config = json.loads(_config_json(text_format.Parse(text, pb.ModelConfig())))
    model.initialize({"model_config": json.dumps(config)})
    return model


def _config_json(config: pb.ModelConfig) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(config, preserving_proto_field_name=True)


def test_python_models_tokenize_decode_and_chain(tmp_path, pb_utils):
    from transformers import AutoTokenizer

    engine = fake_engine(tmp_path / "eng")
    repo = write_triton_repo(engine, tmp_path / "repo", TritonRepoConfig(bls=True)).path
    tokenizer = AutoTokenizer.from_pretrained(engine / "tokenizer")
    pre, post, bls = (load_model(repo, n) for n in ("preprocessing", "postprocessing", "tensorrt_llm_bls"))

    texts = ["the model learns", "text"]
    request = _Request(inputs=[_Tensor("QUERY", np.array([[t.encode()] for t in texts], dtype=object))])
    request.tensors["REQUEST_OUTPUT_LEN"] = _Tensor("REQUEST_OUTPUT_LEN", np.array([[5], [5]], dtype=np.int32))
    empty = _Request(inputs=[_Tensor("QUERY", np.array([[b""]], dtype=object))])
    empty.tensors["REQUEST_OUTPUT_LEN"] = _Tensor("REQUEST_OUTPUT_LEN", np.array([[5]], dtype=np.int32))
    good, bad = pre.execute([request, empty])
    ids = [tokenizer.encode(t) for t in texts]
    assert bad.has_error() and "empty" in bad.error().message()
    assert good.tensors["REQUEST_INPUT_LEN"].as_numpy().ravel().tolist() == [len(i) for i in ids]
    assert good.tensors["INPUT_ID"].as_numpy()[0, : len(ids[0])].tolist() == ids[0]
    assert good.tensors["OUT_END_ID"].as_numpy().ravel().tolist() == [tokenizer.eos_token_id] * 2

    tokens = np.array([[[ids[0][0], ids[0][1], 0]]], dtype=np.int32)  # [batch, beam, tokens], 2 valid
    request = _Request(inputs=[_Tensor("TOKENS_BATCH", tokens), _Tensor("SEQUENCE_LENGTH", np.array([[2]]))])
    (decoded,) = post.execute([request])
    assert decoded.tensors["OUTPUT"].as_numpy()[0, 0].decode() == tokenizer.decode(ids[0][:2])

    # BLS: preprocessing -> a fake streaming tensorrt_llm that echoes the prompt one token a step -> postprocessing
    def fake_exec(self, decoupled=False):
        if self.model_name == "preprocessing":
            return pre.execute([self])[0]
        if self.model_name == "postprocessing":
            return post.execute([self])[0]
        prompt = self.tensors["input_ids"].as_numpy()[0, : int(self.tensors["input_lengths"].as_numpy()[0, 0])]
        assert bool(self.tensors["streaming"].as_numpy().item())
        steps = [_Response([_Tensor("output_ids", [[[t]]]), _Tensor("sequence_length", [[1]])]) for t in prompt]
        return iter(steps + [_Response()])

    pb_utils.InferenceRequest.exec = fake_exec
    sent = []
    request = _Request(inputs=[_Tensor("text_input", np.array([[b"the model learns"]], dtype=object))])
    request.tensors["max_tokens"] = _Tensor("max_tokens", np.array([[3]], dtype=np.int32))
    request.tensors["stream"] = _Tensor("stream", np.array([[True]]))
    request.sender = types.SimpleNamespace(send=lambda response=None, flags=0: sent.append((response, flags)))
    assert bls.execute([request]) is None
    pieces = [r.tensors["text_output"].as_numpy()[0, 0].decode() for r, _ in sent[:-1]]
    assert pieces == [tokenizer.decode([t]) for t in ids[0]] and sent[-1] == (None, 1)
