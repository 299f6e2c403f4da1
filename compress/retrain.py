"""Checkpoint-level retraining operations: distillation, teacher correction, CE training, teacher-logit caching.

Each takes checkpoints (paths or bundled names) and writes a checkpoint atomically, with what was done
appended to `compactlm.json`. Training state lives in a work folder beside OUT (`.OUT.work/`) until the run
finishes, so an interrupted run resumes with `resume=True` and a finished one leaves only OUT.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compactlm.compress.checkpoint import inspect_checkpoint, load_model, load_tokenizer, save_checkpoint
from compactlm.compress.data import describe, load_sequences
from compactlm.compress.distill import Distillation, check_compatible, lineage
from compactlm.compress.evaluate import perplexity
from compactlm.compress.teacher_cache import TeacherCache, cache_teacher_logits
from compactlm.compress.train import (
    CrossEntropy,
    TrainingData,
    distributed_from_env,
    gather_full_model,
    precision_used,
    train,
)
from compactlm.compress.train_config import DistillConfig, TrainConfig
from compactlm.core.console import console, stage_progress
from compactlm.core.errors import CompactLMError
from compactlm.core.io import check_output


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def training_sequences(tokenizer, data, cfg: TrainConfig, world_size: int = 1) -> torch.Tensor:
    """The rows a run of `cfg` trains on: one epoch of them if the corpus is large enough (else it cycles)."""
    rows = cfg.total_steps(world_size=world_size) * cfg.global_batch(world_size)
    return load_sequences(
        data, tokenizer, num_sequences=rows, seq_len=cfg.seq_len, split="train", seed=cfg.seed, allow_fewer=True
    )


def _untouched(work: Path) -> bool:
    """A work folder as a run leaves it before its first checkpoint: nothing in it but an empty checkpoints/."""
    items = list(work.iterdir())
    return all(p.name == "checkpoints" and p.is_dir() and not any(p.iterdir()) for p in items)


def _prepare_work_dir(out: Path, resume: bool, overwrite: bool, dist) -> Path:
    """Rank 0 checks and creates the work folder; under torchrun every rank learns the outcome."""
    work = work_dir_for(out)
    problem = ""
    if dist.main:
        if work.exists() and not resume and _untouched(work):
            shutil.rmtree(work)  # an attempt that stopped before its first checkpoint: nothing to resume
        if work.exists() and not resume:
            if overwrite:
                shutil.rmtree(work)
            else:
                problem = (
                    f"an earlier run left checkpoints in {work}: pass --resume to continue it, "
                    "or --overwrite to start over"
                )
        if not problem:
            work.mkdir(parents=True, exist_ok=True)
    if dist.world_size > 1:
        import torch.distributed as tdist

        shared = [problem]
        tdist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise CompactLMError(problem)
    return work


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _finish(model, out: Path, work: Path, source, record: dict, overwrite: bool, dist) -> Path:
    if dist.main and model is not None:
        save_checkpoint(model, out, source=source, operation=record, overwrite=overwrite)
        shutil.rmtree(work, ignore_errors=True)
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()
    return out


def _heldout(tokenizer, data, seq_len: int, samples: int):
    """The held-out rows the run is scored on at its end, read before training so that too few of them is an error
    before any step (a run that could not report its loss wastes its minutes)."""
    if samples <= 0:
        return None
    return load_sequences(data, tokenizer, num_sequences=samples, seq_len=seq_len, split="heldout")


def _heldout_loss(model, heldout) -> float | None:
    return None if heldout is None or model is None else perplexity(model.to("cpu"), heldout).loss


def _rounded(history: list[dict]) -> list[dict]:
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in history]


def distill_checkpoint(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data="python-docs",
    train_cfg: TrainConfig,
    distill_cfg: DistillConfig | None = None,
    teacher_cache: str | os.PathLike | None = None,
    from_scratch: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    eval_samples: int = 16,
    stop_after: int | None = None,
) -> dict:
    """Distill `student` from `teacher` (or train it with CE when loss='ce'); returns the record written."""
    distill_cfg = distill_cfg or DistillConfig()
    out = Path(out).expanduser()
    check_output(out, overwrite)
    teacher_ckpt, student_ckpt = inspect_checkpoint(teacher), inspect_checkpoint(student)
    teacher_path, teacher_config = teacher_ckpt.path, teacher_ckpt.config
    student_path, student_config = student_ckpt.path, student_ckpt.config
    for checkpoint in (teacher_ckpt, student_ckpt):
        checkpoint.check_length(train_cfg.seq_len, "--seq-len")
    check_compatible(teacher_config, student_config, teacher_path, student_path)
    loss = distill_cfg.resolved_loss(student_config.num_hidden_layers, teacher_config.num_hidden_layers)
    needs_teacher = loss != "ce" and (teacher_cache is None or "hidden" in loss or "embedding" in loss)
    if teacher_cache is not None and ("hidden" in loss or "embedding" in loss):
        raise CompactLMError(f"--loss {loss} needs the live teacher's hidden states: a logit cache cannot serve it")
    mapping = lineage(student_path, teacher_config, student_config) if "hidden" in loss or "embedding" in loss else None
    dist = distributed_from_env()
    tokenizer = load_tokenizer(student_ckpt)
    sequences = training_sequences(tokenizer, data, train_cfg, dist.world_size)
    cache = None
    if teacher_cache is not None and loss != "ce":
        cache = TeacherCache(teacher_cache)
        cache.check_matches(sequences, student_config.vocab_size)
    heldout = _heldout(tokenizer, data, train_cfg.seq_len, eval_samples) if dist.main else None
    work = _prepare_work_dir(out, resume, overwrite, dist)

    if from_scratch:  # same architecture, random init (the model's own initializer): the conventional baseline
        from transformers import AutoModelForCausalLM

        torch.manual_seed(train_cfg.seed)
        model = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
        model.compactlm_path = str(student_path)
    else:
        model = load_model(student_ckpt)
    teacher_model = load_model(teacher_ckpt) if needs_teacher else None
    if teacher_model is not None:
        teacher_model.to(dist.device)
    objective = Distillation(
        distill_cfg,
        loss,
        teacher=teacher_model,
        cache=cache,
        lineage=mapping,
        student_width=student_config.hidden_size,
        teacher_width=teacher_config.hidden_size,
    )
    result = train(
        model,
        objective,
        TrainingData(sequences, train_cfg.seed),
        train_cfg,
        work,
        resume=resume,
        description=f"distill ({loss})" if loss != "ce" else "train (ce)",
        stop_after=stop_after,
    )
    del teacher_model
    model = gather_full_model(model, train_cfg)
    record = {
        "op": "distill" if loss != "ce" else "train",
        "teacher": str(teacher_path) if loss != "ce" else None,
        "teacher_cache": str(teacher_cache) if cache is not None else None,
        "loss": loss,
        "from_scratch": from_scratch,
        "distill": asdict(distill_cfg),
        "train": asdict(train_cfg),
        "data": describe(data),
        "seq_len": train_cfg.seq_len,
        "sequences": int(len(sequences)),
        "steps": result.steps,
        "tokens": result.tokens,
        "world_size": dist.world_size,
        "seconds": round(result.seconds, 1),
        "final_train_loss": result.final_loss,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "precision": precision_used(train_cfg),
        "heldout_loss": _heldout_loss(model, heldout),
        "history": _rounded(result.history),
    }
    _finish(model, out, work, student_path, record, overwrite, dist)
    return record


def correct_teacher(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data="python-docs",
    train_cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    eval_samples: int = 16,
) -> dict:
    """Teacher correction (Minitron step 1): fine-tune the teacher on the distillation data with CE."""
    out = Path(out).expanduser()
    check_output(out, overwrite)
    checkpoint = inspect_checkpoint(teacher)
    checkpoint.check_length(train_cfg.seq_len, "--seq-len")
    teacher_path = checkpoint.path
    dist = distributed_from_env()
    tokenizer = load_tokenizer(checkpoint)
    sequences = training_sequences(tokenizer, data, train_cfg, dist.world_size)
    heldout = _heldout(tokenizer, data, train_cfg.seq_len, eval_samples) if dist.main else None
    work = _prepare_work_dir(out, resume, overwrite, dist)
    model = load_model(checkpoint)
    before = _heldout_loss(model, heldout)
    result = train(
        model,
        CrossEntropy(),
        TrainingData(sequences, train_cfg.seed),
        train_cfg,
        work,
        resume=resume,
        description="correct teacher (ce)",
    )
    record = {
        "op": "correct",
        "train": asdict(train_cfg),
        "data": describe(data),
        "seq_len": train_cfg.seq_len,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
        "final_train_loss": result.final_loss,
        "heldout_loss_before": before,
        "heldout_loss": _heldout_loss(model, heldout),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "precision": precision_used(train_cfg),
        "history": _rounded(result.history),
    }
    _finish(model, out, work, teacher_path, record, overwrite, dist)
    return record


def cache_logits(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data="python-docs",
    train_cfg: TrainConfig,
    top_k: int = 64,
    value_dtype: str = "bf16",
    overwrite: bool = False,
) -> Path:
    """Store the teacher's top-k logits for exactly the rows a distillation with `train_cfg` will read."""
    out = Path(out).expanduser()
    check_output(out, overwrite)
    checkpoint = inspect_checkpoint(teacher)
    checkpoint.check_length(train_cfg.seq_len, "--seq-len")
    teacher_path = checkpoint.path
    tokenizer = load_tokenizer(checkpoint)
    sequences = training_sequences(tokenizer, data, train_cfg)
    model = load_model(checkpoint)
    started = time.perf_counter()
    with stage_progress() as update:
        path = cache_teacher_logits(
            model,
            sequences,
            out,
            top_k=top_k,
            value_dtype=value_dtype,
            overwrite=overwrite,
            progress=update,
            meta={"teacher": str(teacher_path), "data": str(data), "seed": train_cfg.seed},
        )
    console.print(
        f"cached top-{top_k} logits of {len(sequences)} x {train_cfg.seq_len} tokens in "
        f"{time.perf_counter() - started:.0f} s: "
        f"{TeacherCache(path).nbytes() / 2**20:.1f} MiB in {path}"
    )
    return path
