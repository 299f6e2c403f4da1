"""Data-parallel training on CPU (gloo): 2 processes under torchrun equal 1 process with 2-fold accumulation."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compactlm.core.errors import CompactLMError
from tests.helpers import REPO

WORKER = textwrap.dedent(
    '''
    """Runs under torchrun (2 processes) or imported by the test (1 process): the same runs either way."""
    import json
    import os
    import sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)

    from compactlm.compress.distill import Distillation, Lineage
    from compactlm.compress.train_config import DistillConfig
    from compactlm.compress.importance import random_scores
    from compactlm.compress.prune import PruneTarget, prune
    from compactlm.compress.train import CrossEntropy, TrainingData, distributed_from_env, train
    from compactlm.compress.train_config import TrainConfig
    from tests.helpers import random_tokens, tiny_model


    def data():
        return TrainingData(random_tokens(8, 16, seed=3), seed=0)


    def config(grad_accum, steps=4):
        # fp32 always: `precision: auto` would pick bf16 on CPUs with bf16 units, where the exact comparisons
        # of one process against two mean less (the suite's own fixture pins it, but not inside torchrun)
        return TrainConfig(
            steps=steps, batch_size=2, grad_accum=grad_accum, lr=1e-3, min_lr=1e-4, warmup_steps=1, save_every=0,
            precision="fp32",
        )


    def run_ce(grad_accum, work):
        model = tiny_model("llama", num_hidden_layers=2)
        result = train(model, CrossEntropy(), data(), config(grad_accum), work)
        return model, result


    def run_logit(grad_accum, work):
        student = tiny_model("llama", seed=2, num_hidden_layers=2)
        teacher = tiny_model("llama", seed=1, num_hidden_layers=2)
        objective = Distillation(DistillConfig(loss="logit"), "logit", teacher=teacher)
        result = train(student, objective, data(), config(grad_accum, steps=2), work)
        return student, result


    def run_hidden(grad_accum, work):
        teacher = tiny_model("llama", seed=1, num_hidden_layers=2)
        student, _, kept = prune(teacher, random_scores(teacher.config), PruneTarget(hidden_size=36))
        lineage = Lineage(layers=kept.layers.tolist(), hidden=kept.hidden)
        objective = Distillation(
            DistillConfig(loss="logit+hidden"), "logit+hidden", teacher=teacher, lineage=lineage,
            student_width=36, teacher_width=48,
        )
        result = train(student, objective, data(), config(grad_accum), work)
        return student, objective.hidden_map, result


    def main(out):
        dist = distributed_from_env()
        assert dist.world_size == 2, dist
        rank = dist.rank
        model, result = run_ce(1, out / "work-ce")
        if rank == 0:
            torch.save(model.state_dict(), out / "ce.pt")
            (out / "ce.json").write_text(json.dumps(result.history))
        student, result = run_logit(1, out / "work-logit")
        if rank == 0:
            (out / "logit.json").write_text(json.dumps(result.history))
        student, hidden_map, result = run_hidden(1, out / "work-hidden")
        torch.save(hidden_map.state_dict(), out / f"hidden-map-rank{rank}.pt")
        if rank == 0:
            torch.save(student.state_dict(), out / "hidden.pt")
        (out / f"done-rank{rank}").write_text("ok")


    if __name__ == "__main__":
        main(Path(sys.argv[1]))
    '''
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, dict]:
    """One torchrun launch of 2 CPU processes doing every run; returns its output folder and the worker module."""
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "ddp_worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    port = _free_port()
    env |= {
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(folder)]
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert (folder / "done-rank0").exists() and (folder / "done-rank1").exists()
    return folder, runpy.run_path(str(script), run_name="ddp_worker")


def test_two_processes_equal_one_process_with_accumulation(ddp_run, tmp_path):
    folder, worker = ddp_run
    single, single_result = worker["run_ce"](2, tmp_path)
    parallel = torch.load(folder / "ce.pt", weights_only=True)
    initial = worker["tiny_model"]("llama", num_hidden_layers=2).state_dict()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(parallel[name], value, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(parallel[name], initial[name]) for name in initial)  # they trained
    history = json.loads((folder / "ce.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    # The loss logged under DDP is the mean over ranks: the single process's loss of the same global batch.
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in single_result.history], rel=1e-5)
    assert history[-1]["tokens"] == 4 * 2 * 2 * 16


def test_logit_distillation_runs_data_parallel(ddp_run, tmp_path):
    folder, worker = ddp_run
    history = json.loads((folder / "logit.json").read_text())
    assert [row["step"] for row in history] == [1, 2]
    _, single = worker["run_logit"](2, tmp_path)
    assert [row["kd"] for row in history] == pytest.approx([row["kd"] for row in single.history], rel=1e-5)


def test_the_hidden_state_map_is_trained_data_parallel_too(ddp_run, tmp_path):
    folder, worker = ddp_run
    maps = [torch.load(folder / f"hidden-map-rank{r}.pt", weights_only=True) for r in (0, 1)]
    student, hidden_map, _ = worker["run_hidden"](2, tmp_path)
    torch.testing.assert_close(maps[1]["proj.weight"], maps[0]["proj.weight"], rtol=0, atol=1e-5)
    torch.testing.assert_close(maps[0]["proj.weight"], hidden_map.proj.weight, rtol=0, atol=1e-5)
    parallel = torch.load(folder / "hidden.pt", weights_only=True)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(parallel[name], value, rtol=0, atol=1e-5, msg=name)


def test_the_distill_command_runs_under_torchrun(retrain_checkpoints, tmp_path):
    """The CLI itself on 2 processes: one work folder, one output, one report, world size 2 recorded."""
    ckpts = retrain_checkpoints
    out = tmp_path / "ddp-distilled"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += [
        "--master_port",
        str(port),
        "-m",
        "compactlm",
        "compress",
        "distill",
        "--teacher",
        str(ckpts["teacher"]),
    ]
    command += ["--student", str(ckpts["student"]), "--out", str(out), "--data", str(ckpts["corpus"])]
    command += ["--steps", "2", "--batch-size", "1", "--seq-len", "16", "--loss", "logit+hidden", "--eval-samples", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    step = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert step["world_size"] == 2 and step["steps"] == 2 and step["tokens"] == 2 * 2 * 16
    assert not (tmp_path / ".ddp-distilled.work").exists()
    assert (done.stdout + done.stderr).count("done:") == 1


def test_only_rank_0_judges_and_creates_the_work_folder(tmp_path):
    """Under torchrun, rank 1 must not see rank 0's fresh work folder as an earlier run's leftovers."""
    from compactlm.compress.retrain import _prepare_work_dir, work_dir_for
    from compactlm.compress.train import Distributed

    out = tmp_path / "out"
    work_dir_for(out).mkdir()  # as rank 0 has just made it
    assert _prepare_work_dir(out, resume=False, overwrite=False, dist=Distributed(rank=1)) == work_dir_for(out)
    (work_dir_for(out) / "checkpoints" / "step-0000001").mkdir(parents=True)  # an earlier run's leftovers
    with pytest.raises(CompactLMError, match="--resume"):
        _prepare_work_dir(out, resume=False, overwrite=False, dist=Distributed(rank=0))
    # a folder left before any checkpoint holds nothing to resume: rank 0 clears it and goes on
    (work_dir_for(out) / "checkpoints" / "step-0000001").rmdir()
    assert _prepare_work_dir(out, resume=False, overwrite=False, dist=Distributed(rank=0)) == work_dir_for(out)
