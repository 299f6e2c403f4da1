"""`compactlm compress search`: architecture search to a parameter budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compactlm.core.console import console, stage_progress
from compactlm.core.errors import CompactLMError

Percent = Annotated[str, typer.Option(help="A percentage (5%) or a fraction (0.05).")]


def _fraction(text: str, what: str) -> float:
    from compactlm.compress.search_space import parse_budget

    value = parse_budget(text)
    if value >= 1 and not str(text).strip().endswith("%"):
        raise CompactLMError(f"{what} must be a percentage or a fraction below 1, not {text!r}")
    return value


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        model: Annotated[str, typer.Argument(help="A checkpoint directory or a bundled model's name.")],
        out: Annotated[Path, typer.Option(help="The search folder (resumable: a re-run skips finished work).")],
        params: Annotated[str, typer.Option(help="Parameter budget: 50%, 0.5, or a count such as 67M.")],
        tolerance: Percent = "5%",
        axes: Annotated[str, typer.Option(help="Sizes that may change: depth,width,heads,ffn (any subset).")] = (
            "depth,width,heads,ffn"
        ),
        candidates: Annotated[int, typer.Option(help="How many candidates to retrain and rank (K).")] = 4,
        retrain_tokens: Annotated[int, typer.Option(help="Distillation tokens per candidate.")] = 16384,
        rank_by: Annotated[
            str, typer.Option(help="loss, or loss+throughput (builds each candidate's cpu engine and times it).")
        ] = "loss",
        teacher: Annotated[
            str | None, typer.Option(help="Distillation teacher (default: MODEL; a corrected teacher is better).")
        ] = None,
        data: Annotated[str, typer.Option(help="Calibration, training and held-out text.")] = "python-docs",
        step: Percent = "12.5%",
        min_fraction: Percent = "25%",
        multiple_of: Annotated[int, typer.Option(help="Hidden and MLP sizes are multiples of this.")] = 16,
        seq_len: Annotated[int, typer.Option()] = 256,
        batch_size: Annotated[int, typer.Option(help="Sequences per training step.")] = 4,
        loss: Annotated[str, typer.Option(help="Distillation loss for every candidate: logit, logit+hidden, ce.")] = (
            "logit"
        ),
        eval_samples: Annotated[int, typer.Option(help="Held-out sequences the ranking loss is measured on.")] = 16,
        isl: Annotated[int, typer.Option(help="Throughput: input tokens per request.")] = 128,
        osl: Annotated[int, typer.Option(help="Throughput: output tokens per request.")] = 128,
        batch: Annotated[int, typer.Option(help="Throughput: requests submitted at once.")] = 8,
        repeats: Annotated[int, typer.Option(help="Throughput: repeats (median reported).")] = 3,
        engine_precision: Annotated[str, typer.Option(help="Throughput: cpu engine precision.")] = "fp32",
        loss_slack: Annotated[
            float, typer.Option(help="loss+throughput: the winner is the fastest within this many nats of the best.")
        ] = 0.02,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the candidate table and stop.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier search in OUT.")] = False,
    ) -> None:
        """Find the best architecture within a parameter budget: enumerate, prune from one importance pass, retrain
        each briefly by distillation, rank by held-out loss (and measured engine throughput)."""
        from compactlm.compress.search import SearchConfig, candidates_frame, plan_search, run_search
        from compactlm.compress.tables import LEADERBOARD_COLUMNS, candidates_table

        cfg = SearchConfig(
            params=_budget(params),
            tolerance=_fraction(tolerance, "--tolerance"),
            axes=axes,
            candidates=candidates,
            retrain_tokens=retrain_tokens,
            rank_by=rank_by,
            step=_fraction(step, "--step"),
            min_fraction=_fraction(min_fraction, "--min-fraction"),
            multiple_of=multiple_of,
            teacher=teacher,
            data=data,
            seq_len=seq_len,
            batch_size=batch_size,
            loss=loss,
            eval_samples=eval_samples,
            isl=isl,
            osl=osl,
            batch=batch,
            repeats=repeats,
            engine_precision=engine_precision,
            loss_slack=loss_slack,
        )
        source, found = plan_search(model, cfg)
        frame = candidates_frame(found)
        shown = frame.head(40)
        title = f"{len(found)} candidates within {params} +-{cfg.tolerance:.0%} of {source.name} (closest first)"
        console.print(candidates_table(shown, title + ("; first 40 shown" if len(found) > 40 else "")))
        work = min(len(found), cfg.candidates)
        console.print(
            f"plan: {'zero-shot screen of all, then ' if len(found) > work else ''}{work} x {cfg.retrain_tokens:,} "
            f"distillation tokens ({cfg.loss}){' + engine throughput' if cfg.rank_by != 'loss' else ''}"
        )
        if dry_run:
            return
        measure = None
        if cfg.rank_by == "loss+throughput":
            # The CLI is where the layers meet: compactlm.compress.search takes a measure function, and the
            # benchmark harness (bench -> engines -> compress) provides it, so compress never imports bench.
            from compactlm.bench.candidates import ThroughputSpec, measure_throughput

            spec = ThroughputSpec(isl=isl, osl=osl, batch=batch, repeats=repeats, precision=engine_precision)
            measure = lambda models: measure_throughput(models, spec)  # noqa: E731
        with stage_progress() as update:
            result = run_search(model, out, cfg, measure=measure, overwrite=overwrite, progress=update)
        board = result.leaderboard
        shown = [c for c in LEADERBOARD_COLUMNS if c in board]
        console.print(candidates_table(board[shown], f"leaderboard: {out}/leaderboard.csv (plot: {out}/search.png)"))
        name = board.loc[board["winner"].eq(True), "candidate"].iloc[0]
        console.print(f"[green]winner[/]: {name} -> [bold]{result.winner}[/] (the pruned checkpoint: distill it fully)")


def _budget(text: str) -> float:
    from compactlm.compress.search_space import parse_budget

    return parse_budget(text)
