"""`compactlm compress distill | correct-teacher | cache-logits`: retraining commands (YAML recipes too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from compress.errors import CompactLMError
from compress.progress import console

Int = Annotated[int | None, typer.Option()]

TRAIN_DEFAULTS = {
    "data": "python-docs",
    "seq_len": 256,
    "tokens": None,
    "steps": None,
    "batch_size": 4,
    "grad_accum": 1,
    "lr": 1e-4,
    "min_lr": 1e-5,
    "warmup_steps": None,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "precision": "auto",
    "save_every": 50,
    "seed": 0,
    "parallel": "ddp",
    "eval_samples": 16,
}
DISTILL_DEFAULTS = TRAIN_DEFAULTS | {
    "teacher": None,
    "student": None,
    "out": None,
    "loss": "auto",
    "temperature": 1.0,
    "logit_weight": 1.0,
    "hidden_weight": 1.0,
    "embedding_weight": 1.0,
    "hidden_loss": "cosine",
    "teacher_cache": None,
    "from_scratch": False,
}


def _train_config(values: dict):
    from compress.train import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in values.items() if k in fields})


def _options(recipe: Path | None, defaults: dict, flags: dict) -> dict:
    from compress.recipe import load_recipe, merge

    values = merge(defaults, load_recipe(recipe, defaults) if recipe else {}, flags)
    if values.get("tokens") is None and values.get("steps") is None:
        raise CompactLMError("give a training length: --tokens N or --steps N (or tokens:/steps: in the recipe)")
    return values


def _report(record: dict, out) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    heldout = record.get("heldout_loss")
    console.print(
        f"[green]done[/]: {record['steps']} steps, {record['tokens']:,} tokens in {record['seconds']:.0f} s; "
        f"final train loss {record['final_train_loss']:.4f}"
        + (f", held-out loss {heldout:.4f}" if heldout is not None else "")
        + f" -> [bold]{out}[/]"
    )


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill_cmd(
        teacher: Annotated[str | None, typer.Option(help="Teacher checkpoint or bundled name.")] = None,
        student: Annotated[str | None, typer.Option(help="Student checkpoint (e.g. from `compress prune`).")] = None,
        out: Annotated[Path | None, typer.Option(help="Output checkpoint directory.")] = None,
        data: Annotated[str | None, typer.Option(help="Training text: bundled corpus, file or folder.")] = None,
        tokens: Annotated[int | None, typer.Option(help="Token budget (or --steps).")] = None,
        steps: Annotated[int | None, typer.Option(help="Optimizer steps (or --tokens).")] = None,
        loss: Annotated[
            str | None, typer.Option(help="auto | logit | logit+hidden | logit+hidden+embedding | ce.")
        ] = None,
        temperature: Annotated[float | None, typer.Option(help="Softmax temperature of the logit loss.")] = None,
        logit_weight: Annotated[float | None, typer.Option()] = None,
        hidden_weight: Annotated[float | None, typer.Option()] = None,
        embedding_weight: Annotated[float | None, typer.Option()] = None,
        hidden_loss: Annotated[str | None, typer.Option(help="cosine or mse.")] = None,
        teacher_cache: Annotated[
            Path | None, typer.Option(help="Train from cached top-k teacher logits (compress cache-logits).")
        ] = None,
        from_scratch: Annotated[
            bool | None, typer.Option("--from-scratch", help="Re-initialize the student (the baseline).")
        ] = None,
        seq_len: Annotated[int | None, typer.Option(help="Tokens per training sequence.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch (per process).")] = None,
        grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
        lr: Annotated[float | None, typer.Option(help="Peak learning rate (paper: 1e-4).")] = None,
        min_lr: Annotated[float | None, typer.Option(help="Final learning rate (paper: 1e-5).")] = None,
        warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps (paper: 40; default scales).")] = None,
        precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 (autocast).")] = None,
        parallel: Annotated[str | None, typer.Option(help="Under torchrun: ddp or fsdp (GPUs).")] = None,
        save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        eval_samples: Annotated[int | None, typer.Option(help="Held-out sequences scored at the end.")] = None,
        recipe: Annotated[Path | None, typer.Option(help="YAML file with any of these options.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT / discard old checkpoints.")] = False,
    ) -> None:
        """Retrain a pruned student by knowledge distillation from its teacher (or by CE with --loss ce)."""
        from compress.distill import DistillConfig
        from compress.retrain import distill_checkpoint

        flags = {k: v for k, v in locals().items() if k not in ("recipe", "resume", "overwrite")}
        values = _options(recipe, DISTILL_DEFAULTS, flags)
        for required in ("teacher", "student", "out"):
            if values.get(required) is None:
                raise CompactLMError(f"--{required} is required (on the command line or in the recipe)")
        distill_cfg = DistillConfig(**{k: values[k] for k in DistillConfig.__dataclass_fields__ if k in values})
        record = distill_checkpoint(
            values["teacher"],
            values["student"],
            Path(values["out"]),
            data=values["data"],
            seq_len=values["seq_len"],
            train_cfg=_train_config(values),
            distill_cfg=distill_cfg,
            teacher_cache=values["teacher_cache"],
            from_scratch=bool(values["from_scratch"]),
            resume=resume,
            overwrite=overwrite,
            eval_samples=values["eval_samples"],
        )
        _report(record, values["out"])

    @app.command("correct-teacher")
    def correct_cmd(
        teacher: Annotated[str, typer.Argument(help="Teacher checkpoint or bundled name.")],
        out: Annotated[Path, typer.Option(help="Output checkpoint directory.")],
        data: Annotated[str | None, typer.Option(help="The distillation data.")] = None,
        tokens: Annotated[int | None, typer.Option(help="Token budget (or --steps).")] = None,
        steps: Annotated[int | None, typer.Option(help="Optimizer steps (or --tokens).")] = None,
        seq_len: Annotated[int | None, typer.Option()] = None,
        batch_size: Annotated[int | None, typer.Option()] = None,
        grad_accum: Annotated[int | None, typer.Option()] = None,
        lr: Annotated[float | None, typer.Option()] = None,
        min_lr: Annotated[float | None, typer.Option()] = None,
        warmup_steps: Annotated[int | None, typer.Option()] = None,
        save_every: Annotated[int | None, typer.Option()] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        eval_samples: Annotated[int | None, typer.Option()] = None,
        recipe: Annotated[Path | None, typer.Option(help="YAML file with any of these options.")] = None,
        resume: Annotated[bool, typer.Option("--resume")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    ) -> None:
        """Teacher correction: fine-tune the teacher briefly on the distillation data (CE), before distilling."""
        from compress.retrain import correct_teacher

        flags = {k: v for k, v in locals().items() if k not in ("teacher", "out", "recipe", "resume", "overwrite")}
        values = _options(recipe, TRAIN_DEFAULTS, flags)
        record = correct_teacher(
            teacher,
            out,
            data=values["data"],
            seq_len=values["seq_len"],
            train_cfg=_train_config(values),
            resume=resume,
            overwrite=overwrite,
            eval_samples=values["eval_samples"],
        )
        _report(record, out)
        if record.get("heldout_loss_before") is not None:
            console.print(f"held-out loss {record['heldout_loss_before']:.4f} -> {record['heldout_loss']:.4f}")

    @app.command("cache-logits")
    def cache_cmd(
        teacher: Annotated[str, typer.Argument(help="Teacher checkpoint or bundled name.")],
        out: Annotated[Path, typer.Option(help="Cache folder to create.")],
        top_k: Annotated[int, typer.Option(help="Logits kept per position.")] = 64,
        value_dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32.")] = "bf16",
        data: Annotated[str | None, typer.Option(help="Same as the distillation's.")] = None,
        tokens: Annotated[int | None, typer.Option(help="Same as the distillation's.")] = None,
        steps: Annotated[int | None, typer.Option(help="Same as the distillation's.")] = None,
        seq_len: Annotated[int | None, typer.Option(help="Same as the distillation's.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Same as the distillation's.")] = None,
        grad_accum: Annotated[int | None, typer.Option(help="Same as the distillation's.")] = None,
        seed: Annotated[int | None, typer.Option(help="Same as the distillation's.")] = None,
        recipe: Annotated[Path | None, typer.Option(help="The distillation's recipe (its data keys are used).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    ) -> None:
        """Store a teacher's top-k logits for the rows a distillation will read (then: distill --teacher-cache)."""
        from compress.retrain import cache_logits

        flags = {k: v for k, v in locals().items() if k in TRAIN_DEFAULTS}
        allowed = DISTILL_DEFAULTS if recipe else TRAIN_DEFAULTS
        values = _options(recipe, allowed, flags)
        cache_logits(
            teacher,
            out,
            data=values["data"],
            seq_len=values["seq_len"],
            train_cfg=_train_config(values),
            top_k=top_k,
            value_dtype=value_dtype,
            overwrite=overwrite,
        )
