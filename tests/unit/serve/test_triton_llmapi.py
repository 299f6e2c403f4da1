"""`compactlm serve triton-repo` for the current flow: TensorRT-LLM's llmapi repository, written from a trtllm engine
folder. config.pbtxt is parsed with Triton's ModelConfig protobuf; model.yaml is the engine's LLM arguments (checked
against TorchLlmArgs) and agrees with the manifest and with the trtllm-serve command."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from compactlm.core.errors import CompactLMError
from compactlm.engines.backends.trtllm.llm_args import check_llm_args
from compactlm.engines.build import build_engine
from compactlm.engines.config import BuildConfig, Limits
from compactlm.serve.triton_repo import TritonRepoConfig, write_triton_repo
from tests.helpers import cli

LIMITS = Limits(max_batch_size=6, max_input_len=32, max_seq_len=64, max_num_tokens=96)


@pytest.fixture
def engine(tiny_dir, tmp_path):
    return build_engine(tiny_dir, tmp_path / "engine", BuildConfig(backend="trtllm", tp_size=3, limits=LIMITS))


def test_the_llmapi_repository_agrees_with_the_manifest_and_trtllm_serve(engine, tmp_path):
    repo = write_triton_repo(engine, tmp_path / "repo")
    assert repo.models == ["tensorrt_llm"] and sorted(p.name for p in repo.path.iterdir()) == [
        "serve.sh",
        "tensorrt_llm",
    ]
    config = text_format.Parse((repo.path / "tensorrt_llm" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 0 and config.model_transaction_policy.decoupled
    inputs = {t.name: t for t in config.input}
    assert not inputs["text_input"].optional and inputs["text_input"].data_type == pb.TYPE_STRING
    assert inputs["sampling_param_max_tokens"].optional and inputs["streaming"].data_type == pb.TYPE_BOOL
    assert {"text_output", "finish_reason"} <= {t.name for t in config.output}

    model = yaml.safe_load((repo.path / "tensorrt_llm" / "1" / "model.yaml").read_text())
    triton = model.pop("triton_config")
    assert triton == {"max_batch_size": config.max_batch_size, "decoupled": True}
    check_llm_args(model)  # what the llmapi model hands to LLM(**args) is a valid TorchLlmArgs
    manifest = json.loads((engine / "engine.json").read_text())
    assert model["model"] == str((engine / "checkpoint").resolve()) and model["backend"] == "pytorch"
    assert (model["tensor_parallel_size"], model["max_batch_size"]) == (manifest["tp_size"], LIMITS.max_batch_size)
    assert (model["max_seq_len"], model["max_num_tokens"]) == (LIMITS.max_seq_len, LIMITS.max_num_tokens)
    served = yaml.safe_load((engine / "llm_args.yaml").read_text())  # what `trtllm-serve --config` reads
    assert {k: v for k, v in model.items() if k not in ("model", "backend")} == served
    serve = shlex.split(manifest["backend_info"]["commands"]["trtllm_serve"])
    assert serve[serve.index("--config") + 1] == "llm_args.yaml" and serve[1] == "checkpoint"
    assert "--world_size=3" in repo.command_line and "launch_triton_server.py" in repo.command_line  # tp 3
    assert "TRTLLM_LLMAPI_DIR" in (repo.path / "serve.sh").read_text() and "model.py" in repo.notices[0]


def test_llmapi_source_files_are_copied_and_the_single_gpu_command_is_tritonserver(tiny_dir, tmp_path):
    engine = build_engine(tiny_dir, tmp_path / "e1", BuildConfig(backend="trtllm", limits=LIMITS))
    source = tmp_path / "llmapi"
    source.mkdir()
    for name in ("model.py", "helpers.py"):
        (source / name).write_text(f"# {name} of TensorRT-LLM's llmapi model\n")
    config = TritonRepoConfig(engine_path="/models/student/checkpoint", decoupled=False, http_port=9000)
    repo = write_triton_repo(engine, tmp_path / "repo", config, llmapi_source=source)
    assert (repo.path / "tensorrt_llm" / "1" / "helpers.py").read_text().startswith("# helpers.py")
    assert repo.command[0] == "tritonserver" and "--http-port=9000" in repo.command and not repo.notices
    model = yaml.safe_load((repo.path / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert model["model"] == "/models/student/checkpoint" and model["triton_config"]["decoupled"] is False
    result = subprocess.run(["sh", "-n", str(repo.path / "serve.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_refusals_leave_nothing_behind(engine, tmp_path):
    with pytest.raises(CompactLMError, match="must hold TensorRT-LLM's llmapi model.py and helpers.py"):
        write_triton_repo(engine, tmp_path / "repo", llmapi_source=tmp_path)
    (engine / "llm_args.yaml").write_text("tensor_parallel_size: 3\nmax_batch_size: 6\ntp_size: 2\n")
    with pytest.raises(CompactLMError, match="'tp_size' is not a field of TensorRT-LLM's TorchLlmArgs"):
        write_triton_repo(engine, tmp_path / "repo")
    (engine / "llm_args.yaml").write_text("tensor_parallel_size: 1\nmax_batch_size: 6\n")
    with pytest.raises(CompactLMError, match="disagrees with its manifest"):
        write_triton_repo(engine, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_cli_writes_the_llmapi_repository(engine, tmp_path):
    result = cli("serve", "triton-repo", engine, tmp_path / "repo")
    assert result.exit_code == 0, result.output
    assert "tensorrt_llm" in result.output and "launch_triton_server.py" in result.output
    assert (tmp_path / "repo" / "tensorrt_llm" / "1" / "model.yaml").is_file()
