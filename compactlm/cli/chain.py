"""`compactlm compress chain FILE`: iterative compression, prune -> distill -> prune -> distill ..."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compactlm.core.console import console, stage_progress
from compactlm.core.errors import CompactLMError


def register(app: typer.Typer) -> None:
    @app.command("chain")
    def chain_cmd(
        chain_file: Annotated[Path, typer.Argument(help="A chain file (YAML): teacher, stages of prune + distill.")],
        out: Annotated[Path | None, typer.Option(help="The chain's run folder (default: the file's out:).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier run in OUT.")] = False,
    ) -> None:
        """Iterative compression: prune -> distill -> prune -> distill ..., each student the next teacher; resumes
        a stopped run and prints the family table (parameters, perplexity, task accuracy per stage)."""
        from compactlm.compress.chain import load_chain, run_chain
        from compactlm.compress.tables import candidates_table

        chain = load_chain(chain_file)
        folder = out or (Path(chain.out) if chain.out else None)
        if folder is None:
            raise CompactLMError("give --out DIR (or out: in the chain file)")
        with stage_progress() as update:
            family = run_chain(chain, folder, overwrite=overwrite, progress=update)
        console.print(candidates_table(family.drop(columns=["path"]), f"family: {folder}/family.csv"))
