"""The record written beside the weights (`compactlm.json`): the parent checkpoint and the history of what was
done to the model (pull, prune, distill, quantize, ...), read from there, never inferred from a path."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from compactlm.core.host import package_version
from compactlm.core.io import read_json

RECORD_FILE = "compactlm.json"
FORMAT = "compactlm/1"


def read_record(path: str | os.PathLike) -> dict | None:
    """The record of a checkpoint folder, or None for a plain Hugging Face checkpoint."""
    record = Path(path) / RECORD_FILE
    return read_json(record, "checkpoint record") if record.is_file() else None


def new_record(source: str | os.PathLike | None, operation: dict) -> dict:
    """The record of a checkpoint made from `source` by `operation`: the parent's history with it appended."""
    parent = read_record(source) if source else None
    return {
        "format": FORMAT,
        "compactlm_version": package_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parent": str(Path(source).resolve()) if source else None,
        "history": [*(parent["history"] if parent else []), operation],
    }
