"""The results table: one tidy row per measured point (target, shape, load, repeat), appended to Parquet or CSV
as soon as the point finishes, so a crash loses one point, not a run. Environment columns (versions, CPU/GPU,
git commit) ride on every row, so files from several machines or runs can be concatenated and still compared.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_file

SUFFIXES = (".parquet", ".csv")


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class ResultsFile:
    """A results table on disk that grows a row at a time (`.parquet`: rewritten atomically; `.csv`: appended)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if self.path.suffix not in SUFFIXES:
            raise CompactLMError(f"results file {self.path} must end in .parquet or .csv")
        if self.path.exists() and not self.path.is_file():
            raise CompactLMError(f"results file {self.path} exists and is not a file")

    def append(self, rows: dict | Sequence[dict]) -> None:
        frame = pd.DataFrame([rows] if isinstance(rows, dict) else list(rows))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix == ".csv" and self._csv_header_matches(frame):
            frame.to_csv(self.path, mode="a", header=False, index=False)
            return
        if self.path.exists():
            frame = pd.concat([read_table(self.path), frame], ignore_index=True)
        with atomic_file(self.path) as tmp:  # a crash leaves the previous table, never half a file
            if self.path.suffix == ".parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False)

    def _csv_header_matches(self, frame: pd.DataFrame) -> bool:
        if not self.path.exists():
            return False
        with self.path.open() as f:
            header = f.readline().rstrip("\n")
        return header == ",".join(frame.columns)

    def read(self) -> pd.DataFrame:
        return read_table(self.path)


REQUIRED = ("target", "isl", "osl", "request_throughput")
"""Columns every results table has (what tells one from any other table)."""


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A results file as written (Parquet or CSV); a file that is neither is an error naming it."""
    path = Path(path)
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        kind = "Parquet" if path.suffix == ".parquet" else "CSV"
        reason = " ".join(str(exc).split())[:200]
        raise CompactLMError(f"{path} is not a readable {kind} file ({reason})") from exc


def read_results(paths: Sequence[str | os.PathLike], required: Sequence[str] = ()) -> pd.DataFrame:
    """Several results files as one table (columns missing in some files are NaN); each must have `required`
    (REQUIRED: what a report reads)."""
    frames = []
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CompactLMError(f"results file {path} does not exist")
        if path.suffix not in SUFFIXES:
            raise CompactLMError(f"results file {path} must end in .parquet or .csv")
        frame = read_table(path)
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise CompactLMError(
                f"{path} is not a compactlm results table (no {', '.join(missing)} column): give the file that "
                "`compactlm bench measure` or `bench sweep` wrote"
            )
        frames.append(frame)
    if not frames or all(f.empty for f in frames):
        raise CompactLMError("the results files hold no rows")
    return pd.concat(frames, ignore_index=True)
