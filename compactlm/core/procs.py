"""Child processes that die with their parent: a killed compactlm (kill -9 included) leaves no exporter, build or
download running on behind it."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
"""Resolved once in the parent: between fork and exec the child only calls it (no library loading there)."""


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run`, the child told by the kernel to stop (SIGTERM) when this process dies (Linux; elsewhere a
    plain run)."""
    if _PRCTL is not None:
        kwargs.setdefault("preexec_fn", _die_with_parent)
    return subprocess.run(cmd, **kwargs)  # noqa: S603 (argument lists, no shell)
