"""The `compactlm` command: one typer app, a sub-app per package."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from bench.cli import app as bench_app
from compress.cli import app as compress_app
from compress.cli import models_app
from compress.errors import CompactLMError
from engines.cli import app as engines_app
from engines.serve_cli import app as serve_app

app = typer.Typer(
    help="compactlm: prune and distill Hugging Face LLMs (Minitron), build engines, benchmark them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")
app.add_typer(compress_app, name="compress")
app.add_typer(engines_app, name="engines")
app.add_typer(bench_app, name="bench")
app.add_typer(serve_app, name="serve")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Run folder (resumable: finished steps are reused).")] = Path("runs/demo"),
    samples: Annotated[int, typer.Option(help="Calibration sequences for importance.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    eval_samples: Annotated[int, typer.Option(help="Held-out sequences for perplexity.")] = 16,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per held-out sequence.")] = 512,
) -> None:
    """The main job on the embedded default: SmolLM2-135M -> importance -> width and depth students ->
    held-out perplexity table (importance-guided and random pruning side by side)."""
    from compactlm.pipeline import DemoConfig, run_demo

    run_demo(
        DemoConfig(out=out, samples=samples, seq_len=seq_len, eval_samples=eval_samples, eval_seq_len=eval_seq_len)
    )


def main() -> None:
    """Console entry point: user errors print one line and exit with status 2, no traceback."""
    try:
        app()
    except CompactLMError as exc:
        from compress.progress import console

        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
