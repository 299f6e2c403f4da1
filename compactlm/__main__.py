"""`python -m compactlm` runs the CLI."""

from compactlm.cli.root import main

main()
