"""`python -m compactlm` runs the CLI."""

from compactlm.cli import main

main()
