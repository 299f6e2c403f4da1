"""Atomic file I/O: a crash or a kill leaves the previous file or folder (or none), never half of one; an existing
output is replaced only when asked."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from compactlm.core.errors import CompactLMError


def _temp_name(path: Path, kind: str) -> Path:
    """A hidden name beside `path`, unique per call (two writers never share a temp file), holding the writer's
    process id, so that what a killed writer left behind can be told from what a live one is writing."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders beside `path` that a killed writer left (its process is gone); a live
    writer's are kept. Returns what was removed."""
    path = Path(path).expanduser()
    removed = []
    if not path.parent.is_dir():
        return removed
    for item in path.parent.glob(f".{glob.escape(path.name)}.*-*-*"):
        kind, _, rest = item.name[len(path.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        removed.append(item)
    return removed


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
    remove_leftovers(path)
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
    remove_leftovers(out)  # a killed earlier attempt's half-written folder
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
