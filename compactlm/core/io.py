"""Atomic file I/O: a crash or a kill leaves the previous file or folder (or none), never half of one; an existing
output is replaced only when asked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from compactlm.core.errors import CompactLMError


def _temp_name(path: Path, kind: str) -> Path:
    """A hidden name beside `path`, unique per call (two writers never share a temp file)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any heavy work, unless asked to overwrite."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CompactLMError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise CompactLMError(f"the parent folder of {out} does not exist")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` to write to; on success it is renamed to `path`, on failure removed."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically (indented, with a final newline; unknown types as their str())."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON file that compactlm wrote; a corrupt one is an error naming it, not a traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CompactLMError(f"{what} {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompactLMError(f"{what} {path} is not valid JSON ({exc}): remove it, or restore it") from exc


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success rename it to `out`, on failure remove it.

    An interrupted run leaves no half-written `out`, and an existing `out` is replaced only at the very end.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, overwrite)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = _temp_name(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
