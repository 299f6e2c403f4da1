"""The Triton model repository of TensorRT-LLM's current flow, written from a `trtllm` engine folder: one Python
model, `tensorrt_llm`, that runs `tensorrt_llm.LLM` (TensorRT-LLM's triton_backend/all_models/llmapi).

    OUT/tensorrt_llm/config.pbtxt    Triton's ModelConfig (built as tritonclient's protobuf, parsed back): the
                                     llmapi model's inputs (text_input, streaming, sampling_param_*) and outputs
                                     (text_output, finish_reason, ...); Triton's own batching off (max_batch_size 0),
                                     the LLM batches in flight; decoupled to stream
    OUT/tensorrt_llm/1/model.yaml    the LLM arguments of the engine folder (llm_args.yaml, checked against
                                     TorchLlmArgs), `model` pointing at its checkpoint, `triton_config` for Triton
    OUT/tensorrt_llm/1/model.py      TensorRT-LLM's own llmapi model.py and helpers.py, copied from `llmapi_source`
                                     (a TensorRT-LLM checkout of the container's version) when given; otherwise
                                     serve.sh copies them in from $TRTLLM_LLMAPI_DIR at start (the Dockerfile's image
                                     has them there). compactlm does not ship NVIDIA's code.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_dir

MODEL = "tensorrt_llm"
LLMAPI_FILES = ("model.py", "helpers.py")
LLMAPI_DIR_DEFAULT = "/opt/tensorrt_llm/triton_backend/all_models/llmapi/tensorrt_llm/1"
"""Where the Dockerfile's image keeps TensorRT-LLM's llmapi model files (a sparse checkout of its release tag)."""
LAUNCHER = "/opt/tensorrt_llm/triton_backend/scripts/launch_triton_server.py"

INPUTS = [
    ("text_input", "STRING", [-1], False),
    ("streaming", "BOOL", [1], True),
    ("sampling_param_best_of", "INT32", [1], True),
    ("sampling_param_temperature", "FP32", [1], True),
    ("sampling_param_top_k", "INT32", [1], True),
    ("sampling_param_top_p", "FP32", [1], True),
    ("sampling_param_frequency_penalty", "FP32", [1], True),
    ("sampling_param_presence_penalty", "FP32", [1], True),
    ("sampling_param_max_tokens", "INT32", [1], True),
    ("sampling_param_stop", "STRING", [-1], True),
    ("sampling_param_seed", "UINT64", [1], True),
    ("sampling_param_exclude_input_from_output", "BOOL", [1], True),
    ("sampling_param_return_perf_metrics", "BOOL", [1], True),
    ("return_finish_reason", "BOOL", [1], True),
    ("return_stop_reason", "BOOL", [1], True),
    ("return_cumulative_logprob", "BOOL", [1], True),
    ("stop", "BOOL", [1], True),
]
"""The llmapi model's inputs (triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt): name, type, dims,
optional."""
OUTPUTS = [
    ("text_output", "STRING", [-1]),
    ("finish_reason", "STRING", [-1]),
    ("stop_reason", "STRING", [-1]),
    ("cumulative_logprob", "FP32", [-1]),
    ("kv_cache_reused_block", "INT32", [-1]),
    ("kv_cache_missed_block", "INT32", [-1]),
    ("kv_cache_alloc_new_blocks", "INT32", [-1]),
    ("kv_cache_alloc_total_blocks", "INT32", [-1]),
    ("kv_cache_hit_rate", "FP32", [-1]),
    ("arrival_time_ns", "INT64", [1]),
    ("first_scheduled_time_ns", "INT64", [1]),
    ("first_token_time_ns", "INT64", [1]),
    ("last_token_time_ns", "INT64", [1]),
]


def model_config(decoupled: bool):
    """The tensorrt_llm model's ModelConfig protobuf."""
    from compactlm.serve.triton_protobuf import cpu_instances, make_tensor, protobufs

    pb, _ = protobufs()
    config = pb.ModelConfig(name=MODEL, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = decoupled
    for name, dtype, dims, optional in INPUTS:
        config.input.append(make_tensor(pb, pb.ModelInput, name, dtype, dims, optional=optional))
    for name, dtype, dims in OUTPUTS:
        config.output.append(make_tensor(pb, pb.ModelOutput, name, dtype, dims))
    cpu_instances(pb, config)
    return config


def model_yaml(engine_dir: Path, manifest, checkpoint_path: str | None, decoupled: bool) -> dict:
    """model.yaml: the engine's LLM arguments (checked), its checkpoint, and Triton's settings."""
    from compactlm.engines.backends.trtllm.llm_args import check_llm_args, read_llm_args

    info = manifest.backend_info
    args = read_llm_args(engine_dir / info.get("llm_args", "llm_args.yaml"))
    model = {
        "model": checkpoint_path or str(engine_dir / info.get("checkpoint_dir", "checkpoint")),
        "backend": "pytorch",
    }
    model |= args
    check_llm_args(model)
    model["triton_config"] = {"max_batch_size": 0, "decoupled": decoupled}
    return model


def check_consistent(config, model: dict, manifest) -> None:
    """What Triton reads (config.pbtxt), what the llmapi model reads (model.yaml) and what the engine was built
    for (the manifest) agree: batching, streaming, parallelism, limits."""
    triton = model["triton_config"]
    if (
        config.max_batch_size != triton["max_batch_size"]
        or config.model_transaction_policy.decoupled != triton["decoupled"]
    ):
        raise CompactLMError("config.pbtxt and model.yaml disagree on max_batch_size or decoupled")
    from compactlm.engines.backends.trtllm.llm_args import shape_args

    expected = shape_args(manifest.tp_size, manifest.limits)
    wrong = {k: (model.get(k), v) for k, v in expected.items() if model.get(k) != v}
    if wrong:
        raise CompactLMError(f"the engine's llm_args.yaml disagrees with its manifest: {wrong} (rebuild the engine)")


def server_command(repo: Path, tp_size: int, ports: tuple[int, int, int]) -> list[str]:
    http, grpc, metrics = ports
    if tp_size == 1:
        return ["tritonserver", f"--model-repository={repo}", f"--http-port={http}", f"--grpc-port={grpc}",
                f"--metrics-port={metrics}"]  # fmt: skip
    # the llmapi model leads an MPI world of tp ranks: TensorRT-LLM's own launcher starts it
    return ["python3", LAUNCHER, f"--model_repo={repo}", f"--world_size={tp_size}", f"--http_port={http}",
            f"--grpc_port={grpc}", f"--metrics_port={metrics}"]  # fmt: skip


def write_llmapi_repo(engine_dir: Path, out: Path, manifest, cfg, llmapi_source: Path | None, overwrite: bool):
    """Write the llmapi repository for a current-flow trtllm engine; returns the TritonRepo."""
    import yaml
    from google.protobuf import text_format

    from compactlm.serve.triton_protobuf import TritonRepo, parse_config

    engine_dir = engine_dir.resolve()
    if not (engine_dir / manifest.backend_info.get("checkpoint_dir", "checkpoint")).is_dir():
        raise CompactLMError(f"{engine_dir} has no checkpoint folder: rebuild the engine")
    source_files = []
    if llmapi_source is not None:
        source_files = [Path(llmapi_source).expanduser() / name for name in LLMAPI_FILES]
        missing = [str(p) for p in source_files if not p.is_file()]
        if missing:
            raise CompactLMError(
                f"--llmapi-source must hold TensorRT-LLM's llmapi {' and '.join(LLMAPI_FILES)} "
                f"(triton_backend/all_models/llmapi/tensorrt_llm/1 of a TensorRT-LLM checkout): missing {missing}"
            )
    config = model_config(cfg.decoupled)
    parsed = parse_config(text_format.MessageToString(config), f"{MODEL}/config.pbtxt")
    model = model_yaml(engine_dir, manifest, cfg.engine_path, cfg.decoupled)
    check_consistent(parsed, model, manifest)
    notices = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / MODEL / "1").mkdir(parents=True)
        (tmp / MODEL / "config.pbtxt").write_text(text_format.MessageToString(parsed))
        (tmp / MODEL / "1" / "model.yaml").write_text(
            "# TensorRT-LLM llmapi model arguments (written by compactlm from the engine's llm_args.yaml)\n"
            + yaml.safe_dump(model, sort_keys=False)
        )
        for file in source_files:
            shutil.copyfile(file, tmp / MODEL / "1" / file.name)
        command = server_command(out.resolve(), manifest.tp_size, (cfg.http_port, cfg.grpc_port, cfg.metrics_port))
        copy = ""
        if not source_files:
            notices.append(
                "TensorRT-LLM's llmapi model.py/helpers.py are not in the repository: serve.sh copies them from "
                f"$TRTLLM_LLMAPI_DIR (default {LLMAPI_DIR_DEFAULT}, where the Dockerfile's image has them), or give "
                "--llmapi-source"
            )
            target = shlex.quote(str(out.resolve() / MODEL / "1"))
            copy = (
                f'LLMAPI_DIR="${{TRTLLM_LLMAPI_DIR:-{LLMAPI_DIR_DEFAULT}}}"\n'
                f'for f in {" ".join(LLMAPI_FILES)}; do [ -f {target}/"$f" ] || cp "$LLMAPI_DIR/$f" {target}/; done\n'
            )
        (tmp / "serve.sh").write_text(
            "#!/bin/sh\n# Serve this repository (written by compactlm).\nset -e\n"
            + copy
            + f"exec {shlex.join(command)}\n"
        )
        (tmp / "serve.sh").chmod(0o755)
    return TritonRepo(out.resolve(), [MODEL], command, notices)
