"""The `compactlm` command: the root typer app (root.py) and one module per command group, wiring only."""

from compactlm.cli.root import app, main

__all__ = ["app", "main"]
