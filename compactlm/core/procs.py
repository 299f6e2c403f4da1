"""Child processes that die with their parent: a killed compactlm (kill -9 included) leaves no exporter, build or
download running on behind it."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run`, the child told by the kernel to stop (SIGTERM) when this process dies (Linux; elsewhere a
    plain run)."""
    if sys.platform.startswith("linux"):
        kwargs.setdefault("preexec_fn", _die_with_parent)
    return subprocess.run(cmd, **kwargs)  # noqa: S603 (argument lists, no shell)
