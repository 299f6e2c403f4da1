"""`compactlm serve ...`: serve an engine on a Triton server, or write the Triton repository of a trtllm engine.

    compactlm serve ENGINE_DIR [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--max-batch-size N]
    compactlm serve triton-repo ENGINE_DIR OUT

`serve ENGINE_DIR` is short for `serve start ENGINE_DIR`: the group runs `start` when its first word is not one
of its commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from compactlm.core.console import console


class _RunByDefault(TyperGroup):
    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Serve an engine on a Triton Inference Server (HTTP, gRPC streaming, metrics) with an OpenAI-compatible "
    "route; or write the Triton model repository of a TensorRT-LLM engine. `compactlm serve ENGINE_DIR` runs `start`.",
    no_args_is_help=True,
)

EngineArg = Annotated[Path, typer.Argument(help="An engine folder (engine.json), from `compactlm engines build`.")]
HttpPort = Annotated[int, typer.Option(help="Triton's HTTP port (KServe v2 API, generate_stream).")]
GrpcPort = Annotated[int, typer.Option(help="Triton's gRPC port (streaming).")]
MetricsPort = Annotated[int, typer.Option(help="Triton's Prometheus metrics port (/metrics).")]


@app.command("start")
def start(
    engine: EngineArg,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    http_port: HttpPort = 8000,
    grpc_port: GrpcPort = 8001,
    metrics_port: MetricsPort = 8002,
    openai_port: Annotated[int, typer.Option(help="The OpenAI-compatible route's port; 0 turns it off.")] = 8080,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Largest batch of Triton's dynamic batcher (default: the engine's limit).")
    ] = None,
    max_queue_delay_us: Annotated[int, typer.Option(help="How long the batcher waits to fill a batch (us).")] = 2000,
    stream_instances: Annotated[
        int | None,
        typer.Option(help="Instances of the streaming model, each a process carrying responses [engine batch / 8]."),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model name on the OpenAI route (default: the engine folder's name).")
    ] = None,
    log_file: Annotated[Path | None, typer.Option(help="tritonserver's log (default: a temporary file).")] = None,
    triton: Annotated[
        bool, typer.Option(help="Serve Triton too; --no-triton serves the OpenAI API alone (starts in seconds).")
    ] = True,
    max_queue: Annotated[
        int | None,
        typer.Option(help="OpenAI API: requests in flight beyond which it answers 429 [16x max batch, >= 256]."),
    ] = None,
    body_timeout: Annotated[
        float, typer.Option(help="OpenAI API: seconds a request body may take to arrive before a 408.")
    ] = 30.0,
    recycle: Annotated[
        bool,
        typer.Option(
            help="cpu engines: run the pipeline in a worker process, replaced once it has grown past model + KV "
            "cache + 256 MB (idle: at once; busy: a new worker takes over beside it) (--no-recycle: in the server's "
            "own process, where the pipeline's step holds the GIL and the fronts answer only between steps)."
        ),
    ] = True,
    draft_tokens: Annotated[
        int | None,
        typer.Option(
            help="cpu engines built with --draft: tokens the draft proposes per step (0: the model alone) [as built]."
        ),
    ] = None,
    max_num_tokens: Annotated[
        int | None,
        typer.Option(
            help="cpu engines: tokens per engine step to serve with; smaller gives earlier first tokens to requests "
            "that arrive together (256 for interactive use) [as built]."
        ),
    ] = None,
) -> None:
    """Serve ENGINE on a real Triton server until Ctrl-C or SIGTERM: models `compactlm` (streaming) and
    `compactlm_full` (whole completion, dynamic batching), plus an OpenAI-compatible API (/v1/completions,
    /v1/chat/completions, /v1/models, /health, Prometheus /metrics)."""
    from compactlm.serve.server import ServeConfig, serve

    config = ServeConfig(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        openai_port=openai_port or None,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        stream_instances=stream_instances,
        model_name=model_name,
        log_file=log_file,
        triton=triton,
        max_queue=max_queue,
        body_timeout_s=body_timeout,
        recycle=recycle,
        draft_tokens=draft_tokens,
        max_num_tokens=max_num_tokens,
    )

    def ready(server) -> None:
        manifest = server.engine.manifest
        console.print(f"[green]serving[/] {engine} ({manifest.describe()})", highlight=False, soft_wrap=True)
        for name, url in server.endpoints().items():
            console.print(f"  {name:12s} {url}", highlight=False)
        where = f"tritonserver log: {server.log_file}; " if server.log_file else ""
        console.print(f"  {where}stop with Ctrl-C or SIGTERM", highlight=False, soft_wrap=True, markup=False)

    from compactlm.engines.manifest import read_manifest

    read_manifest(engine)  # an engine folder, before anything starts
    what = "Triton and the OpenAI API" if triton else "the OpenAI API"
    console.print(f"starting {what} for {engine} ...", highlight=False, soft_wrap=True, markup=False)
    summary = serve(engine, config, on_ready=ready)
    console.print(summary, highlight=False, soft_wrap=True)


@app.command("triton-repo")
def triton_repo(
    engine: EngineArg,
    out: Annotated[Path, typer.Argument(help="The model repository folder to write.")],
    engine_path: Annotated[
        str | None, typer.Option(help="The engine folder as the server sees it (default: ENGINE/engine).")
    ] = None,
    tokenizer_dir: Annotated[
        str | None, typer.Option(help="The tokenizer folder as the server sees it (default: ENGINE/tokenizer).")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Triton's max batch size (default: the engine's).")] = None,
    batching_strategy: Annotated[str, typer.Option(help="inflight_fused_batching or V1.")] = "inflight_fused_batching",
    scheduler_policy: Annotated[
        str, typer.Option(help="guaranteed_no_evict or max_utilization.")
    ] = "guaranteed_no_evict",
    kv_cache_fraction: Annotated[float, typer.Option(help="Share of free GPU memory for the KV cache (0-1].")] = 0.9,
    decoupled: Annotated[bool, typer.Option(help="Stream tokens (decoupled models).")] = True,
    max_queue_delay_us: Annotated[int, typer.Option(help="Dynamic batcher delay of tensorrt_llm (us).")] = 100,
    kv_cache_reuse: Annotated[bool, typer.Option(help="Reuse KV cache across requests (prefix caching).")] = False,
    chunked_context: Annotated[bool, typer.Option(help="Chunk long prompts (needs paged context FMHA).")] = False,
    bls: Annotated[bool, typer.Option("--bls", help="Also write tensorrt_llm_bls (the chain as one model).")] = False,
    http_port: HttpPort = 8000,
    grpc_port: GrpcPort = 8001,
    metrics_port: MetricsPort = 8002,
    llmapi_source: Annotated[
        Path | None,
        typer.Option(
            help="trtllm: TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1 to copy model.py from."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Write the Triton model repository for a TensorRT-LLM ENGINE into OUT and print the command that serves it:
    for a trtllm folder (current flow) TensorRT-LLM's llmapi model (config.pbtxt + model.yaml from the engine's LLM
    arguments; --engine-path is then the checkpoint as the server sees it); for a trtllm-engine folder (legacy) the
    inflight_batcher_llm models (preprocessing, tensorrt_llm, postprocessing, ensemble; --bls adds tensorrt_llm_bls)."""
    from compactlm.serve.triton_repo import TritonRepoConfig, write_triton_repo

    config = TritonRepoConfig(
        engine_path=engine_path,
        tokenizer_dir=tokenizer_dir,
        max_batch_size=max_batch_size,
        batching_strategy=batching_strategy,
        batch_scheduler_policy=scheduler_policy,
        kv_cache_free_gpu_mem_fraction=kv_cache_fraction,
        decoupled=decoupled,
        max_queue_delay_us=max_queue_delay_us,
        enable_kv_cache_reuse=kv_cache_reuse,
        enable_chunked_context=chunked_context,
        bls=bls,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
    )
    repo = write_triton_repo(engine, out, config, overwrite=overwrite, llmapi_source=llmapi_source)
    console.print(f"[green]wrote[/] {repo.path}: {', '.join(repo.models)}", highlight=False)
    for notice in repo.notices:
        console.print(f"[yellow]note:[/] {notice}", highlight=False, soft_wrap=True)
    console.print("serve it (inside NVIDIA's Triton + TensorRT-LLM container, also in serve.sh):", highlight=False)
    console.print(repo.command_line, highlight=False, soft_wrap=True, markup=False)
