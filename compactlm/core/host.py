"""Where and with what compactlm runs: host, CPU/GPU, library versions, the checkout's commit. Engine manifests,
benchmark rows and run records all take it from here."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = (
    "compactlm",
    "torch",
    "transformers",
    "openvino",
    "openvino-genai",
    "nvidia-modelopt",
    "tensorrt-llm",
    "tensorrt",
)


def package_version() -> str:
    """compactlm's own version (`unknown` when it runs from a tree that was never installed)."""
    try:
        return metadata.version("compactlm")
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict:
    """The installed version of each library that shapes a result (missing ones left out)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16() -> str | None:
    """The CPU's native bf16 matrix units, strongest first ("amx_bf16", "avx512_bf16"), or None: without them
    bf16 math on a CPU is emulated and slower than fp32."""
    flags = cpu_flags()
    return next((name for name in ("amx_bf16", "avx512_bf16") if name in flags), None)


VECTOR_EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
"""The CPU flags that decide which kernels the engines can run (and so their speed), in the order reported."""


def cpu_extensions() -> str:
    """The CPU's vector and matrix extensions among VECTOR_EXTENSIONS, e.g. "avx2 avx512f avx512_bf16" ("none"
    where it has none of them, or no /proc/cpuinfo): the same CPU name covers machines with and without some."""
    flags = cpu_flags()
    return " ".join(name for name in VECTOR_EXTENSIONS if name in flags) or "none"


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux /proc; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def gpu_model() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA setup must not stop a CPU run
        return None
    return None


def host_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_model(),
    }


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the compactlm checkout that runs, `+dirty` when it has local changes (None outside git)."""
    folder = folder or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


@functools.cache
def environment() -> dict:
    """Flat environment columns for result tables: host, CPU/GPU, library versions, git commit."""
    host = host_info()
    env = {
        "host": host["hostname"],
        "cpu": host["cpu"],
        "cpu_extensions": cpu_extensions(),
        "cpu_count": host["cpu_count"],
        "gpu": host["gpu"],
        "os": host["os"],
        "python": host["python"],
        "git_commit": git_commit(),
    }
    env.update({f"version_{name.replace('-', '_')}": v for name, v in library_versions().items()})
    return env
