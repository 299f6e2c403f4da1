"""The prepared GPU check (check.sh / check.py): run on a lent GPU machine, or with --dry-run on CPU."""
