"""kill -9 at four points of the main job (in a distillation, in an engine build with its exporter subprocess, in a
sweep, at the report): each time the re-run completes, redoes no finished stage, and nothing is left behind (no
exporter process, no half-written folder). The fifth point, the pull of a bundled model, leaves at most a temp
folder in the cache, which the next pull removes (tests/unit/core/test_io.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import REPO

POINTS = ("distill/small", "engine/small-fp32", "sweep/small-fp32", "report")


def _recipe(folder: Path, teacher: Path, corpus: Path) -> Path:
    recipe = {
        "name": "tiny-kill",
        "teacher": str(teacher),
        "data": str(corpus),
        "correction": {"tokens": 0},
        "importance": {"samples": 4, "seq_len": 16},
        "students": {"small": {"num_layers": 2, "ffn_hidden_size": 64}},
        "distill": {"steps": 40, "seq_len": 16, "batch_size": 2, "top_k": 8, "save_every": 5},
        "evaluate": {"samples": 2, "seq_len": 16, "tasks": []},
        "engines": {"backend": "cpu", "precisions": ["fp32"]},
        "sweep": {"shapes": [[8, 4]], "batch_sizes": [1, 2], "requests": 8, "warmup": 0, "repeats": 2},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _records(out: Path) -> dict[str, str]:
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text())["finished"] for p in out.glob("stages/*.json")}


def _reached(out: Path, point: str) -> bool:
    if point == "report":  # the last stage is recorded: the report is being written
        return (out / "stages" / "sweep--small-fp32.json").is_file()
    return (out / "stages" / f".{point.replace('/', '--')}.started").is_file()


def _strays(out: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(out) in part for part in proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"]))
    return found


@pytest.mark.slow
def test_kill_9_anywhere_then_a_rerun_completes_redoing_nothing_finished(retrain_checkpoints, tmp_path):
    recipe = _recipe(tmp_path, retrain_checkpoints["teacher"], retrain_checkpoints["corpus"])
    out = tmp_path / "run"
    command = [sys.executable, "-m", "compactlm", "run", str(recipe), "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for point in POINTS:
        before = _records(out) if out.exists() else {}
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not _reached(out, point) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, f"the job ended before {point}"
        if point == "engine/small-fp32":  # kill while the exporter subprocess works
            while not _strays(out) and time.monotonic() < deadline:
                time.sleep(0.05)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        time.sleep(0.5)  # SIGTERM from the kernel at the parent's death: the exporter is gone in well under that
        assert _strays(out) == [], f"left running after kill -9 at {point}"
        after = _records(out)
        assert {k: after[k] for k in before} == before  # what was done stays done
    final = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    records = _records(out)
    assert (out / "report" / "index.html").is_file() and "sweep/small-fp32" in records
    leftovers = [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".started")]
    assert leftovers == []
    distilled = json.loads((out / "stages" / "distill--small.json").read_text())["outputs"]
    assert distilled["steps"] == 40  # resumed from its checkpoint to the planned length
