"""The Triton model repository of TensorRT-LLM's legacy engine flow, written from a `trtllm-engine` folder (for
TensorRT-LLM <= 1.2 containers); a current-flow `trtllm` folder gets the llmapi repository (serve/triton_llmapi.py).

The layout of tensorrtllm_backend's `all_models/inflight_batcher_llm`: `preprocessing` (text -> token ids, Python),
`tensorrt_llm` (the engine, in-flight batching), `postprocessing` (token ids -> text, Python), `ensemble` (the three
chained: text in, text out) and, on request, `tensorrt_llm_bls` (the same chain as one decoupled Python model).
Every config.pbtxt is built as Triton's ModelConfig protobuf (the one tritonclient ships), filled from the engine's
manifest, parsed back and cross-checked (`check_repository`) before anything is written. The Python models are
compactlm's own, small, in serve/triton_repo_models/; they run inside NVIDIA's Triton + TensorRT-LLM container.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.serve.triton_protobuf import (  # noqa: F401 - parse_config and TritonRepo are used from here too
    TritonRepo,
    add_inputs,
    add_outputs,
    cpu_instances,
    make_tensor,
    parse_config,
    protobufs,
    set_params,
)

PREPROCESSING, LLM, POSTPROCESSING, ENSEMBLE, BLS = (
    "preprocessing",
    "tensorrt_llm",
    "postprocessing",
    "ensemble",
    "tensorrt_llm_bls",
)
BATCHING_STRATEGIES = ("inflight_fused_batching", "V1")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
MODELS_SOURCE = Path(__file__).parent / "triton_repo_models"
TRITONSERVER = "tritonserver"


@dataclass(frozen=True)
class TritonRepoConfig:
    engine_path: str | None = None
    """The TensorRT-LLM engine folder as the server sees it (default: ENGINE_DIR/engine, absolute)."""
    tokenizer_dir: str | None = None
    """The tokenizer folder as the server sees it (default: ENGINE_DIR/tokenizer, absolute)."""
    max_batch_size: int | None = None
    """Triton's max_batch_size for every model (default and maximum: the engine's)."""
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    """Share of the GPU memory left after loading the engine that the KV cache takes."""
    decoupled: bool = True
    """Stream tokens as they are made (gRPC streaming, HTTP generate_stream)."""
    max_queue_delay_us: int = 100
    enable_kv_cache_reuse: bool = False
    enable_chunked_context: bool = False
    bls: bool = False
    """Also write tensorrt_llm_bls (the chain as one Python model)."""
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def __post_init__(self):
        if self.batching_strategy not in BATCHING_STRATEGIES:
            raise CompactLMError(f"batching strategy must be one of {', '.join(BATCHING_STRATEGIES)}")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise CompactLMError(f"batch scheduler policy must be one of {', '.join(SCHEDULER_POLICIES)}")
        if not 0 < self.kv_cache_free_gpu_mem_fraction <= 1:
            fraction = self.kv_cache_free_gpu_mem_fraction
            raise CompactLMError(f"the KV-cache fraction is a share of free GPU memory in (0, 1], got {fraction}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise CompactLMError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise CompactLMError("max_queue_delay_us must be >= 0")


# -- the models


def _preprocessing(pb, batch: int, tokenizer_dir: str):
    config = pb.ModelConfig(name=PREPROCESSING, backend="python", max_batch_size=batch)
    optional = {"optional": True}
    add_inputs(
        pb,
        config,
        [
            ("QUERY", "STRING", [1]),
            ("REQUEST_OUTPUT_LEN", "INT32", [1]),
            ("END_ID", "INT32", [1], optional),
            ("PAD_ID", "INT32", [1], optional),
        ],
    )
    add_outputs(
        pb,
        config,
        [
            ("INPUT_ID", "INT32", [-1]),
            ("REQUEST_INPUT_LEN", "INT32", [1]),
            ("REQUEST_OUTPUT_LEN", "INT32", [1]),
            ("OUT_END_ID", "INT32", [1]),
            ("OUT_PAD_ID", "INT32", [1]),
        ],
    )
    set_params(config, {"tokenizer_dir": tokenizer_dir, "add_special_tokens": True})
    cpu_instances(pb, config)
    return config


def _llm(pb, batch: int, cfg: TritonRepoConfig, engine_path: str):
    config = pb.ModelConfig(name=LLM, backend="tensorrtllm", max_batch_size=batch)
    config.model_transaction_policy.decoupled = cfg.decoupled
    config.dynamic_batching.preferred_batch_size.append(batch)
    config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    opt = {"optional": True}
    scalar = {"scalar": True}
    opt_scalar = {"optional": True, "scalar": True}
    add_inputs(
        pb,
        config,
        [
            ("input_ids", "INT32", [-1], {"ragged": True}),
            ("input_lengths", "INT32", [1], scalar),
            ("request_output_len", "INT32", [1]),
            ("end_id", "INT32", [1], opt_scalar),
            ("pad_id", "INT32", [1], opt_scalar),
            ("streaming", "BOOL", [1], opt),
            ("beam_width", "INT32", [1], opt_scalar),
            ("temperature", "FP32", [1], opt_scalar),
            ("runtime_top_k", "INT32", [1], opt_scalar),
            ("runtime_top_p", "FP32", [1], opt_scalar),
            ("random_seed", "UINT64", [1], opt_scalar),
            ("stop", "BOOL", [1], opt),
        ],
    )
    add_outputs(pb, config, [("output_ids", "INT32", [-1, -1]), ("sequence_length", "INT32", [-1])])
    cpu_instances(pb, config)  # the backend places the engine on its GPUs itself (as NVIDIA's template does)
    set_params(
        config,
        {
            "gpt_model_type": cfg.batching_strategy,
            "gpt_model_path": engine_path,
            "max_beam_width": 1,
            "batch_scheduler_policy": cfg.batch_scheduler_policy,
            "kv_cache_free_gpu_mem_fraction": cfg.kv_cache_free_gpu_mem_fraction,
            "exclude_input_in_output": True,
            "enable_kv_cache_reuse": cfg.enable_kv_cache_reuse,
            "enable_chunked_context": cfg.enable_chunked_context,
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        },
    )
    return config


def _postprocessing(pb, batch: int, tokenizer_dir: str):
    config = pb.ModelConfig(name=POSTPROCESSING, backend="python", max_batch_size=batch)
    add_inputs(pb, config, [("TOKENS_BATCH", "INT32", [-1, -1]), ("SEQUENCE_LENGTH", "INT32", [-1])])
    add_outputs(pb, config, [("OUTPUT", "STRING", [-1])])
    set_params(config, {"tokenizer_dir": tokenizer_dir, "skip_special_tokens": True})
    cpu_instances(pb, config)
    return config


ENSEMBLE_OPTIONAL = [("end_id", "INT32"), ("pad_id", "INT32"), ("stream", "BOOL"), ("temperature", "FP32")]
ENSEMBLE_OPTIONAL += [("top_k", "INT32"), ("top_p", "FP32"), ("random_seed", "UINT64")]
LLM_NAME_OF = {"stream": "streaming", "top_k": "runtime_top_k", "top_p": "runtime_top_p"}


def _ensemble(pb, batch: int, decoupled: bool):
    config = pb.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=batch)
    if decoupled:
        config.model_transaction_policy.decoupled = True
    add_inputs(pb, config, [("text_input", "STRING", [1]), ("max_tokens", "INT32", [1])])
    add_inputs(pb, config, [(name, dtype, [1], {"optional": True}) for name, dtype in ENSEMBLE_OPTIONAL])
    add_outputs(pb, config, [("text_output", "STRING", [-1])])
    steps = config.ensemble_scheduling.step
    pre = steps.add(model_name=PREPROCESSING, model_version=-1)
    pre.input_map.update({"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens"})
    pre.input_map.update({"END_ID": "end_id", "PAD_ID": "pad_id"})
    pre.output_map.update(
        {
            "INPUT_ID": "_INPUT_ID",
            "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
            "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
            "OUT_END_ID": "_END_ID",
            "OUT_PAD_ID": "_PAD_ID",
        }
    )
    llm = steps.add(model_name=LLM, model_version=-1)
    llm.input_map.update(
        {
            "input_ids": "_INPUT_ID",
            "input_lengths": "_REQUEST_INPUT_LEN",
            "request_output_len": "_REQUEST_OUTPUT_LEN",
            "end_id": "_END_ID",
            "pad_id": "_PAD_ID",
        }
    )
    for name, _ in ENSEMBLE_OPTIONAL:
        if name not in ("end_id", "pad_id"):
            llm.input_map[LLM_NAME_OF.get(name, name)] = name
    llm.output_map.update({"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"})
    post = steps.add(model_name=POSTPROCESSING, model_version=-1)
    post.input_map.update({"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"})
    post.output_map["OUTPUT"] = "text_output"
    return config


def _bls(pb, batch: int, decoupled: bool):
    config = pb.ModelConfig(name=BLS, backend="python", max_batch_size=batch)
    config.model_transaction_policy.decoupled = True  # it streams when asked (stream=true)
    add_inputs(pb, config, [("text_input", "STRING", [1]), ("max_tokens", "INT32", [1])])
    add_inputs(pb, config, [(name, dtype, [1], {"optional": True}) for name, dtype in ENSEMBLE_OPTIONAL])
    add_outputs(pb, config, [("text_output", "STRING", [-1])])
    set_params(
        config,
        {
            "tensorrt_llm_model_name": LLM,
            "tensorrt_llm_decoupled": decoupled,
            "accumulate_tokens": False,
        },
    )
    cpu_instances(pb, config)
    return config


# -- checks


def check_repository(configs: dict) -> None:
    """Cross-check parsed configs: names, batch sizes, and that every ensemble step names real models and
    tensors (an input map's keys are the step model's inputs, its values ensemble inputs or earlier outputs)."""
    for name, config in configs.items():
        if config.name != name:
            raise CompactLMError(f"{name}/config.pbtxt names the model {config.name!r}")
    sizes = {config.max_batch_size for config in configs.values()}
    if len(sizes) != 1:
        raise CompactLMError(f"the models' max_batch_size differ: {sorted(sizes)}")
    for name, config in configs.items():
        if config.platform != "ensemble":
            continue
        known = {t.name for t in config.input}
        for step in config.ensemble_scheduling.step:
            model = configs.get(step.model_name)
            if model is None:
                raise CompactLMError(f"{name} calls {step.model_name!r}, which the repository lacks")
            inputs, outputs = {t.name for t in model.input}, {t.name for t in model.output}
            for key, value in step.input_map.items():
                if key not in inputs:
                    raise CompactLMError(f"{name}: {step.model_name} has no input {key!r}")
                if value not in known:
                    raise CompactLMError(f"{name}: {value!r} (for {step.model_name}.{key}) is not produced before")
            for key, value in step.output_map.items():
                if key not in outputs:
                    raise CompactLMError(f"{name}: {step.model_name} has no output {key!r}")
                known.add(value)
            missing = {t.name for t in model.input if not t.optional} - set(step.input_map)
            if missing:
                raise CompactLMError(f"{name}: {step.model_name}'s required inputs {sorted(missing)} are not fed")
        for output in config.output:
            if output.name not in known:
                raise CompactLMError(f"{name}: its output {output.name!r} is produced by no step")


# -- the writer


def server_command(repo: Path, cfg: TritonRepoConfig, tp_size: int) -> list[str]:
    """tritonserver for the repository; with tp > 1, one MPI rank per GPU (the backend's leader mode)."""
    ports = [f"--http-port={cfg.http_port}", f"--grpc-port={cfg.grpc_port}", f"--metrics-port={cfg.metrics_port}"]
    if tp_size == 1:
        return [TRITONSERVER, f"--model-repository={repo}", *ports]
    command = ["mpirun", "--allow-run-as-root"]
    for rank in range(tp_size):
        if rank:
            command.append(":")
        command += ["-n", "1", TRITONSERVER, f"--model-repository={repo}", "--disable-auto-complete-config"]
        command.append(f"--backend-config=python,shm-region-prefix-name=prefix{rank}_")
        command += ports if rank == 0 else ["--model-control-mode=explicit", f"--load-model={LLM}"]
    return command


def is_legacy(manifest) -> bool:
    """A TensorRT-engine folder: `trtllm-engine`, or `trtllm` as compactlm wrote it before the current flow."""
    return manifest.backend == "trtllm-engine" or (
        manifest.backend == "trtllm" and "trtllm_build_command" in manifest.backend_info
    )


def build_configs(engine_dir: Path, cfg: TritonRepoConfig) -> tuple[dict, list[str], int]:
    """The repository's ModelConfigs from the engine's manifest (checked), with notices and its tp size."""
    from compactlm.engines.manifest import read_manifest

    manifest = read_manifest(engine_dir)
    if not is_legacy(manifest):
        raise CompactLMError(
            f"{engine_dir} is a {manifest.backend} engine; Triton's TensorRT-LLM backend serves trtllm engines: "
            f"build one with `compactlm engines build CHECKPOINT OUT --backend trtllm`, or serve this one with "
            f"`compactlm serve {engine_dir}`"
        )
    limit = manifest.limits.max_batch_size
    batch = cfg.max_batch_size or limit
    if batch > limit:
        raise CompactLMError(f"max batch size {batch} exceeds the engine's max_batch_size {limit}")
    engine_dir = engine_dir.resolve()
    engine_path = cfg.engine_path or str(engine_dir / manifest.backend_info.get("engine_dir", "engine"))
    tokenizer_dir = cfg.tokenizer_dir or str(engine_dir / "tokenizer")
    notices = []
    if cfg.tokenizer_dir is None and not (engine_dir / "tokenizer").is_dir():
        raise CompactLMError(
            f"{engine_dir} has no tokenizer (its checkpoint shipped none); pre/postprocessing need one: "
            "give --tokenizer-dir"
        )
    if manifest.backend_info.get("engine_built") is False:
        command = manifest.backend_info.get("trtllm_build_command", "trtllm-build ...")
        notices.append(f"the engine is not built yet: first run `cd {engine_dir} && {command}` on the GPU host")
    pb, text_format = protobufs()
    configs = {
        PREPROCESSING: _preprocessing(pb, batch, tokenizer_dir),
        LLM: _llm(pb, batch, cfg, engine_path),
        POSTPROCESSING: _postprocessing(pb, batch, tokenizer_dir),
        ENSEMBLE: _ensemble(pb, batch, cfg.decoupled),
    }
    if cfg.bls:
        configs[BLS] = _bls(pb, batch, cfg.decoupled)
    # what is written is what Triton will read: parse the text back and check that
    parsed = {name: parse_config(text_format.MessageToString(c), f"{name}/config.pbtxt") for name, c in configs.items()}
    check_repository(parsed)
    return parsed, notices, manifest.tp_size


def write_triton_repo(
    engine_dir: str | Path,
    out: str | Path,
    config: TritonRepoConfig | None = None,
    overwrite: bool = False,
    llmapi_source: str | Path | None = None,
) -> TritonRepo:
    """Write the model repository for a trtllm engine into OUT (atomically); returns it with its command line:
    the llmapi repository for the current flow, the inflight_batcher_llm one for a legacy engine folder."""
    from compactlm.engines.manifest import read_manifest

    cfg = config or TritonRepoConfig()
    engine_dir, out = Path(engine_dir).expanduser(), Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CompactLMError(f"{out} exists; give --overwrite to replace it")
    manifest = read_manifest(engine_dir)
    if manifest.backend == "trtllm" and not is_legacy(manifest):
        from compactlm.serve.triton_llmapi import write_llmapi_repo

        return write_llmapi_repo(
            engine_dir, out, manifest, cfg, Path(llmapi_source) if llmapi_source else None, overwrite
        )
    if llmapi_source is not None:
        raise CompactLMError("--llmapi-source is for the current flow's llmapi repository (a trtllm engine folder)")
    configs, notices, tp_size = build_configs(engine_dir, cfg)
    _, text_format = protobufs()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, model in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(model))
            if model.backend == "python":
                shutil.copy(MODELS_SOURCE / f"{name}.py", tmp / name / "1" / "model.py")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    repo = TritonRepo(out.resolve(), list(configs), [], notices)
    repo.command = server_command(repo.path, cfg, tp_size)
    (out / "serve.sh").write_text(
        f"#!/bin/sh\n# Serve this repository (written by compactlm).\nexec {repo.command_line}\n"
    )
    (out / "serve.sh").chmod(0o755)
    return repo
