"""A third-party tool in a virtual environment of its own, made once and reused.

Tools whose pins clash with compactlm's (optimum-intel wants an older transformers, GuideLLM wants numpy 2) live in
their own venvs under $COMPACTLM_HOME/venvs. A venv is built in a temp folder and renamed into place, under a file
lock, and marked ready only once its check passed, so an interrupted or concurrent setup never leaves a broken one.
The console scripts pip writes name the temp folder's python in their first line; they are pointed at the final
folder's once it is renamed (still, prefer `python -m TOOL` with the venv's python).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compactlm.core import procs
from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class ToolVenv:
    """What a tool's venv holds: pip installs run in order, packages removed after them, and a check that must pass."""

    name: str
    """What the tool is, for messages ("the OpenVINO exporter")."""
    installs: tuple[tuple[str, ...], ...]
    """pip install arguments, one tuple per `pip install` call (in order: torch first keeps its CPU wheel)."""
    check: str
    """Python code run in the venv once installed (an import of what the tool needs); its failure fails the setup."""
    remove: tuple[str, ...] = ()
    """Packages uninstalled after the installs (pulled in by a dependency, harmful to the tool)."""
    minutes: float = 1.0
    """About how long a first setup takes (shown to the user)."""

    def __post_init__(self) -> None:
        if not self.installs or not all(self.installs):
            raise ValueError(f"{self.name}: a tool venv needs at least one non-empty pip install")

    @property
    def requirements(self) -> list[str]:
        return [r for step in self.installs for r in step]


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path) -> bool:
    return (venv / ".ready").is_file() and python_of(venv).exists()


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str) -> subprocess.CompletedProcess:
    result = procs.run(list(cmd), capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise CompactLMError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result


def ensure(tool: ToolVenv, venv: Path, quiet: bool = False) -> Path:
    """The python of TOOL's venv at VENV, making the venv first if needed (once; needs the package registry)."""
    if is_ready(venv):
        return python_of(venv)
    with _locked(venv.parent / f".{venv.name}.lock"):
        if is_ready(venv):  # made by another process while we waited
            return python_of(venv)
        if not quiet:
            from compactlm.core.console import console

            console.print(f"[dim]one-time setup: {tool.name}'s own venv in {venv} (~{tool.minutes:g} min)[/]")
        tmp = venv.parent / f".{venv.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _run([sys.executable, "-m", "venv", str(tmp)], f"creating {tool.name}'s venv")
            pip = [str(python_of(tmp)), "-m", "pip", "--disable-pip-version-check"]
            for step in tool.installs:
                _run([*pip, "install", "-q", *step], f"installing {' '.join(step)} into {tool.name}'s venv")
            if tool.remove:
                procs.run([*pip, "uninstall", "-y", "-q", *tool.remove], capture_output=True)
            _run([str(python_of(tmp)), "-c", tool.check], f"checking {tool.name}'s venv")
            (tmp / ".ready").write_text("\n".join(tool.requirements) + "\n")
            shutil.rmtree(venv, ignore_errors=True)
            tmp.rename(venv)
            _repoint_scripts(venv, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python_of(venv)


def _repoint_scripts(venv: Path, built_in: Path) -> None:
    """Point the scripts in VENV/bin whose first line names BUILT_IN's interpreter at VENV's."""
    old, new = f"#!{built_in}/".encode(), f"#!{venv}/".encode()
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        with open(script, "rb") as handle:
            head = handle.read(len(old))
        if head == old:
            data = script.read_bytes()
            script.write_bytes(new + data[len(old) :])
