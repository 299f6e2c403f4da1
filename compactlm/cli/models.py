"""`compactlm models ...`: the bundled real models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from compactlm.core.console import console

app = typer.Typer(help="Bundled real models: list them, pull them into the cache.", no_args_is_help=True)


@app.command("list")
def models_list() -> None:
    """Show the bundled models, whether their package is installed and whether they are cached."""
    from compactlm.compress.models import compactlm_home, list_models

    table = Table(title=f"bundled models (cache: {compactlm_home()})")
    for column in ("name", "package", "installed", "cached", "description"):
        table.add_column(column)
    for row in list_models():
        table.add_row(row["name"], row["package"], _yes(row["installed"]), _yes(row["cached"]), row["description"])
    console.print(table)


@app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="The bundled model to materialize, e.g. smollm2-135m.")],
    force: Annotated[bool, typer.Option("--force", help="Convert again even if cached.")] = False,
) -> None:
    """Materialize a bundled model as an fp32 safetensors checkpoint (with tokenizer) in the cache, once."""
    from compactlm.compress.models import pull

    path = pull(name, force=force)
    console.print(f"[green]{name}[/] ready at {path}")
    typer.echo(path)


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"
