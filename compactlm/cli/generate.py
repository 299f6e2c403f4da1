"""`compactlm compress generate-data`: distillation text sampled from the teacher (engines/generate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compactlm.cli.options import OverwriteOpt, config_options
from compactlm.core.console import console
from compactlm.engines.generate import GenerateConfig


def register(app: typer.Typer) -> None:
    @app.command("generate-data")
    @config_options(GenerateConfig)
    def generate_cmd(
        teacher: Annotated[
            str, typer.Argument(help="The teacher: a checkpoint, a bundled model's name, or an engine.")
        ],
        out: Annotated[Path, typer.Argument(help="The corpus folder to write (then: --data OUT, or in a mix).")],
        prompts: Annotated[
            Path | None,
            typer.Option(help='Seed prompts: a text file (one per line) or .jsonl of {"text"}; default: built-in.'),
        ] = None,
        precision: Annotated[
            str, typer.Option(help="The cpu engine's precision when TEACHER is a checkpoint.")
        ] = "bf16",
        overwrite: OverwriteOpt = False,
        **options,
    ) -> None:
        """Sample distillation text from the teacher on the cpu engine: seeded, filtered (short, degenerate and
        near-duplicate samples dropped), written as a corpus with its own fixed held-out split and a record of how
        it was made (generation.json)."""
        from compactlm.engines.generate import generate_corpus

        cfg = GenerateConfig(**{k: v for k, v in options.items() if v is not None})
        record = generate_corpus(teacher, out, cfg, prompts_file=prompts, precision=precision, overwrite=overwrite)
        samples, tokens = record["samples"], record["tokens"]
        console.print(
            f"[green]generated[/] {tokens['kept']:,} tokens in {samples['kept']:,} samples -> [bold]{out}[/] "
            f"({samples['submitted']:,} sampled, dropped {samples['dropped']}); {record['seconds']:.0f} s, "
            f"{record['generated_tokens_per_second']:,.0f} generated tokens/s",
            highlight=False,
        )
