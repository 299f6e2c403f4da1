"""Rich progress for long compression jobs: a callback the library functions call, a bar the user sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_bar(*fields: str) -> Progress:
    """The house progress bar: description, bar, done/total, any `fields` (rich format strings), elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(field) for field in fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


@contextlib.contextmanager
def stage_progress() -> Iterator:
    """Yield `update(stage, done, total)`; each new stage name gets its own bar with an ETA."""
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


def download_progress() -> Progress:
    """Spinner, description, bar, bytes, elapsed: for downloads and extraction."""
    from rich.progress import DownloadColumn, SpinnerColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)
