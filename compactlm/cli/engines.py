"""`compactlm engines ...`: build, inspect and run engines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from compactlm.core.console import console
from compactlm.core.errors import CompactLMError

app = typer.Typer(
    help="Engines: build a checkpoint into an inference engine, inspect it, run it.", no_args_is_help=True
)


@app.command("build")
def build(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint directory or a bundled model's name.")],
    out: Annotated[Path, typer.Argument(help="The engine folder to write.")],
    backend: Annotated[
        str,
        typer.Option(
            help="cpu (OpenVINO, default), torch (transformers), trtllm (TensorRT-LLM's current flow: the checkpoint "
            "it loads + LLM arguments) or trtllm-engine (legacy trtllm-build flow, TensorRT-LLM <= 1.2)."
        ),
    ] = "cpu",
    precision: Annotated[
        str | None,
        typer.Option(
            help="cpu: fp32|bf16|int8|int4; torch: fp32|bf16|fp16; trtllm: fp16|bf16|fp8|int4-awq; "
            "trtllm-engine: fp16|bf16|fp8|int8-sq|int4-awq."
        ),
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Most sequences at once [32].")] = None,
    max_input_len: Annotated[int | None, typer.Option(help="Longest prompt, tokens [1024].")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Longest prompt + output, tokens [2048].")] = None,
    max_num_tokens: Annotated[int | None, typer.Option(help="Tokens per engine step [2048].")] = None,
    tp_size: Annotated[int, typer.Option(help="Tensor-parallel ranks (trtllm).")] = 1,
    for_sweep: Annotated[
        Path | None, typer.Option(help="Derive the limits from this benchmark sweep file (flags still win).")
    ] = None,
    checkpoint_only: Annotated[
        bool,
        typer.Option("--checkpoint-only", help="trtllm-engine: write and verify the checkpoint, skip trtllm-build."),
    ] = False,
    calib_data: Annotated[
        str, typer.Option(help="Calibration corpus (fp8 scales, int4 AWQ): a bundled corpus or your text.")
    ] = "python-docs",
    calib_samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 32,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    draft: Annotated[
        str | None,
        typer.Option(
            help="cpu: a smaller checkpoint with the same vocabulary (a student of CHECKPOINT) built beside it as "
            "its speculative-decoding draft."
        ),
    ] = None,
    draft_tokens: Annotated[int | None, typer.Option(help="cpu: tokens the draft proposes per step [3].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Compile CHECKPOINT into an engine folder OUT, with engine.json beside the engine files."""
    from compactlm.engines.build import build_engine
    from compactlm.engines.config import BuildConfig, Limits

    base, shapes, batches = Limits(), (), ()
    if for_sweep is not None:
        from compactlm.bench.sweep import load_sweep

        sweep = load_sweep(for_sweep)
        base = sweep.limits(max_num_tokens)
        shapes, batches = tuple(sweep.scaled_shapes()), tuple(sorted(set(sweep.batch_sizes)))
    flags = dict(
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
    )
    limits = Limits(**{**base.to_dict(), **{k: v for k, v in flags.items() if v is not None}})
    config = BuildConfig(
        backend=backend,
        precision=precision,
        limits=limits,
        tp_size=tp_size,
        checkpoint_only=checkpoint_only,
        calib_dataset=calib_data,
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
        draft=draft,
        **({"draft_tokens": draft_tokens} if draft_tokens is not None else {}),
        **({"bench_shapes": shapes, "bench_batches": batches} if backend == "trtllm" else {}),
    )
    start = time.perf_counter()
    with console.status(f"building a {backend} engine from {checkpoint}"):
        path = build_engine(checkpoint, out, config, overwrite=overwrite)
    from compactlm.engines.manifest import read_manifest

    manifest = read_manifest(path)
    console.print(
        f"[green]built[/] {manifest.describe()} in {time.perf_counter() - start:.1f} s -> {path}",
        highlight=False,
        soft_wrap=True,
    )
    notice = manifest.backend_info.get("notice")
    if notice:
        console.print(f"[yellow]note:[/] {notice}", highlight=False, soft_wrap=True)
    commands = manifest.backend_info.get("commands")
    if commands:  # trtllm: how to serve and benchmark the folder, from inside it
        console.print(f"in {path}:", highlight=False)
        lines = [commands["trtllm_serve"], commands["vllm_serve"]]
        for point in commands["trtllm_bench"]:
            lines += [point["prepare"], *point["throughput"]]
        for line in lines:
            console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)


@app.command("info")
def info(
    engine: Annotated[Path, typer.Argument(help="An engine folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print engine.json as is.")] = False,
) -> None:
    """Show what an engine was built from, for which shapes, with what."""
    from compactlm.engines.manifest import read_manifest

    manifest = read_manifest(engine)
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    table = Table(title=f"{engine}: {manifest.describe()}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    source = manifest.source
    record = source.get("record") or {}
    steps = ", ".join(step.get("step", "?") for step in record.get("history", [])) or "none (a plain checkpoint)"
    rows = [
        ("backend / precision", f"{manifest.backend} / {manifest.precision}"),
        ("source", source.get("path", "?")),
        ("source sha256", source.get("sha256", "?")[:16] + "..."),
        ("compactlm history", steps),
        ("model", _model_line(manifest.model)),
        ("limits", ", ".join(f"{k} {v}" for k, v in manifest.limits.to_dict().items())),
        ("tp size", str(manifest.tp_size)),
        ("built", f"{manifest.created} in {manifest.build_seconds:.1f} s on {manifest.host.get('hostname', '?')}"),
        ("host", f"{manifest.host.get('cpu', '?')}; GPU: {manifest.host.get('gpu') or 'none'}"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in manifest.libraries.items())),
    ]
    for key, value in manifest.backend_info.items():
        if key not in ("eos_token_ids",):
            rows.append((key, json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _model_line(model: dict) -> str:
    params = model.get("params")
    return (
        f"{model.get('family')}: {model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
        f"MLP {model.get('ffn_hidden_size')}, {model.get('num_attention_heads')} heads / "
        f"{model.get('num_query_groups')} KV, head_dim {model.get('head_dim')}"
        + (f", {params / 1e6:.1f}M params" if params else "")
    )


@app.command("generate")
def generate(
    engine: Annotated[Path, typer.Argument(help="An engine folder.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at end-of-sequence.")] = False,
) -> None:
    """Generate text for a person: stream the continuation of PROMPT (greedy)."""
    from compactlm.engines.registry import load_engine
    from compactlm.engines.runtime import Request

    with load_engine(engine) as loaded:
        tokenizer = loaded.tokenizer
        if chat:
            if not tokenizer.chat_template:
                raise CompactLMError(f"{engine}'s tokenizer has no chat template: drop --chat")
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding or a plain list
        else:
            ids = tokenizer(prompt)["input_ids"]
        stream = loaded.submit(Request(tuple(ids), max_new_tokens, ignore_eos))
        tokens: list[int] = []
        shown = ""
        for chunk, _ in stream:
            tokens += chunk
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            typer.echo(text[len(shown) :], nl=False)
            shown = text
        typer.echo()
        done = stream.result()
        if done.error:
            raise CompactLMError(f"generation failed: {done.error}")
        rate = (len(done.tokens) - 1) / (done.e2e - done.ttft) if len(done.tokens) > 1 and done.e2e > done.ttft else 0
        console.print(
            f"[dim]{len(done.tokens)} tokens ({done.finish_reason}); first token {done.ttft * 1e3:.0f} ms, "
            f"then {rate:.1f} tok/s[/]",
            highlight=False,
        )


@app.command("backends")
def backends() -> None:
    """List the backends, their precisions, and whether each can build here."""
    from compactlm.engines.config import BuildConfig
    from compactlm.engines.registry import list_backends

    table = Table(title="engine backends")
    for column in ("backend", "precisions (default first)", "builds here", "description"):
        table.add_column(column)
    for backend in list_backends():
        try:
            backend.check_available(BuildConfig(backend=backend.name))
            ready = "[green]yes[/]"
        except CompactLMError as exc:
            ready = f"[yellow]{exc}[/]"
        precisions = [backend.default_precision] + [p for p in backend.precisions if p != backend.default_precision]
        table.add_row(backend.name, ", ".join(precisions), ready, backend.description)
    console.print(table)


@app.command("setup")
def setup() -> None:
    """Make the CPU engine's exporter environment now (it is otherwise made on the first cpu build)."""
    from compactlm.engines.backends.openvino.export import ensure_exporter, venv_dir

    with console.status("setting up the OpenVINO exporter venv"):
        python = ensure_exporter(quiet=True)
    console.print(f"[green]ready[/]: {venv_dir()} ({python})")
