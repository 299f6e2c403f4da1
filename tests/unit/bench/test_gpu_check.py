"""The prepared GPU check (bench/gpu/check.sh): its dry run really runs the four steps on CPU and reports them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

STEPS = ("torch-cuda-bf16", "distill-step-bf16", "fsdp-torchrun-1proc", "modelopt-fp8-ptq")
SCRIPT, CHECK = REPO / "bench" / "gpu" / "check.sh", REPO / "bench" / "gpu" / "check.py"


def test_the_help_lists_the_dry_run():
    done = subprocess.run([sys.executable, str(CHECK), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--out" in done.stdout


@pytest.mark.slow
def test_the_dry_run_passes_every_step_and_writes_their_numbers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for name in STEPS:
        results = [line for line in lines if line.split(":")[0].split()[-1:] == [name]]
        assert len(results) == 1, (name, lines)
        assert results[0].startswith(f"PASS {name}: DRY-RUN (CPU) "), results[0]
    assert lines[-1].startswith("SUMMARY DRY-RUN (CPU): 4 PASS, 0 FAIL, 0 SKIP"), lines[-1]
    assert "Warning" not in done.stdout + done.stderr  # library notices go to the JSON, not the terminal

    (path,) = tmp_path.glob("check-*.json")
    report = json.loads(path.read_text())
    assert report["host"]["torch"] and report["host"]["dry_run"] is True
    assert report["counts"] == {"PASS": 4, "FAIL": 0, "SKIP": 0}
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == list(STEPS) and all(r["status"] == "PASS" for r in results.values())

    torch_step = results["torch-cuda-bf16"]["numbers"]
    assert torch_step["dtype"] == "bfloat16" and torch_step["tokens_generated"] == 4 * 16
    assert torch_step["top1_agree_all_positions"] >= 0.9 and 0 < torch_step["rel_dlogit"] < 0.05
    assert torch_step["tokens_per_s"] > 0

    distill = results["distill-step-bf16"]["numbers"]
    assert distill["autocast_dtypes"] == ["bfloat16"] and distill["loss_after"] < distill["loss_before"]
    assert len(distill["losses"]) == distill["steps"] + 1

    fsdp = results["fsdp-torchrun-1proc"]["numbers"]
    assert fsdp["rc"] == 0 and fsdp["weights"] and fsdp["world_size"] == 1 and fsdp["steps"] == 3
    assert fsdp["wrap"]["parallel"] == "fsdp" and fsdp["wrap"]["precision"] == "bf16"

    fp8 = results["modelopt-fp8-ptq"]["numbers"]
    assert fp8["quant_algo"] == "FP8" and fp8["hooked_linears"] > 0 and "hf_quant_config.json" in fp8["files"]
    assert 0 < fp8["rel_unified_vs_fake"] < 1.5 * fp8["rel_fake_vs_fp32"] < 0.45
