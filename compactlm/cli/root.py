"""The `compactlm` command: one typer app, a sub-app per package."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from compactlm.cli.bench import app as bench_app
from compactlm.cli.compress import app as compress_app
from compactlm.cli.engines import app as engines_app
from compactlm.cli.models import app as models_app
from compactlm.cli.serve import app as serve_app
from compactlm.core.errors import CompactLMError

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
    """One-shot pruning only: SmolLM2-135M -> importance -> width and depth students -> held-out perplexity
    (importance-guided and random pruning side by side; no retraining). The whole job is `compactlm run`."""
    from compactlm.job.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(out=out, samples=samples, seq_len=seq_len, eval_samples=eval_samples, eval_seq_len=eval_seq_len)
    )


@app.command("run")
def run(
    recipe: Annotated[Path, typer.Argument(help="The job recipe (YAML), e.g. recipes/smollm2-minitron.yaml.")],
    budget: Annotated[
        str, typer.Option(help="small (the recipe as written) or a budget the recipe defines under `budgets:`.")
    ] = "small",
    out: Annotated[Path | None, typer.Option(help="Run folder (default: the recipe's, or runs/NAME-BUDGET).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override one recipe value: section.key=value (repeatable), e.g. distill.tokens=8192."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Check the recipe and print the stages with estimates; run nothing.")
    ] = False,
) -> None:
    """The main job: teacher correction -> importance -> width/depth students -> distillation -> evaluation ->
    engines -> throughput sweep -> report. Resumable: killed, it continues; re-run, it redoes nothing."""
    from compactlm.job.pipeline import estimates, run_job
    from compactlm.job.recipe import load_job_recipe

    job = load_job_recipe(recipe, budget, set_)
    if dry_run:
        from compactlm.compress.models import is_cached
        from compactlm.core.console import console
        from compactlm.job.pipeline import check_job

        cached = is_cached(job.teacher)
        check_job(job)  # the students and lengths against the teacher (a bundled one is pulled once)
        plan = estimates(job, cached)
        for name, seconds in plan.items():
            console.print(f"  {name:<36} ~{seconds:>5.0f} s")
        console.print(
            f"{len(plan)} stages, ~{sum(plan.values()) / 60:.0f} min on a 2-core CPU -> {out or job.default_out()}"
        )
        return
    try:
        run_job(job, out)
    except KeyboardInterrupt:
        from compactlm.core.console import console
        from compactlm.job.recipe import command_line

        console.print(
            Text.assemble(
                ("interrupted", "yellow"), f": run `{command_line(job, out)}` again to continue where it stopped"
            )
        )
        raise typer.Exit(130) from None


def report_error(message: str) -> None:
    """`error: MESSAGE` on stderr, the message as plain text (a `[` in a path or a value is not markup)."""
    from compactlm.core.console import console

    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: an expected failure (bad input, a missing file, a full disk) prints one line and exits
    with status 2, no traceback; COMPACTLM_DEBUG=1 shows the traceback too."""
    debug = bool(os.environ.get("COMPACTLM_DEBUG"))
    try:
        app()
    except CompactLMError as exc:
        if debug:
            raise
        report_error(str(exc))
        sys.exit(2)
    except OSError as exc:  # the machine, not the code: permissions, a full disk, a vanished file
        if debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        report_error(f"{exc.strerror or exc}{where}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
