"""core/toolvenv.py: a tool's venv is made once, marked ready only after its check, and a failed setup leaves
nothing behind (no venv, no temp folder) and says which step failed."""

from __future__ import annotations

import subprocess

import pytest

from compactlm.core import toolvenv
from compactlm.core.errors import CompactLMError
from compactlm.core.toolvenv import ToolVenv


def _package(root):
    """A one-module wheel pip installs offline (written by hand: a wheel is a zip with its metadata)."""
    import zipfile

    root.mkdir(parents=True)
    wheel = root / "tinytool-0.1-py3-none-any.whl"
    info = "tinytool-0.1.dist-info"
    files = {
        "tinytool/__init__.py": "ANSWER = 42\n\n\ndef main():\n    print(ANSWER)\n",
        "tinytool/__main__.py": "from tinytool import main\n\nmain()\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: tinytool\nVersion: 0.1\n",
        f"{info}/entry_points.txt": "[console_scripts]\ntinytool = tinytool:main\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def test_a_tool_venv_is_made_once_and_reused(tmp_path):
    source = _package(tmp_path / "src")
    tool = ToolVenv(
        "tinytool",
        installs=(("--no-index", str(source)),),
        check="import tinytool; assert tinytool.ANSWER == 42",
    )
    venv = tmp_path / "venvs" / "tinytool"
    python = toolvenv.ensure(tool, venv, quiet=True)
    assert python == venv / "bin" / "python" and toolvenv.is_ready(venv)
    ready = (venv / ".ready").stat().st_mtime_ns
    assert toolvenv.ensure(tool, venv, quiet=True) == python
    assert (venv / ".ready").stat().st_mtime_ns == ready  # not rebuilt
    assert [p.name for p in venv.parent.iterdir() if p.name.startswith(".tinytool.tmp")] == []
    # built in a temp folder and renamed: both the module and pip's console script run from the final folder
    assert subprocess.run([python, "-m", "tinytool"], capture_output=True, text=True).stdout == "42\n"
    assert subprocess.run([venv / "bin" / "tinytool"], capture_output=True, text=True).stdout == "42\n"


def test_a_failed_check_leaves_no_venv_and_names_the_step(tmp_path):
    source = _package(tmp_path / "src")
    tool = ToolVenv("tinytool", installs=(("--no-index", str(source)),), check="import not_installed")
    venv = tmp_path / "venvs" / "tinytool"
    with pytest.raises(CompactLMError, match="(?s)checking tinytool's venv failed.*not_installed"):
        toolvenv.ensure(tool, venv, quiet=True)
    assert not venv.exists()
    assert [p.name for p in venv.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_a_tool_needs_an_install():
    with pytest.raises(ValueError, match="at least one"):
        ToolVenv("empty", installs=(), check="pass")
    with pytest.raises(ValueError, match="at least one"):
        ToolVenv("empty", installs=((),), check="pass")
