"""`compactlm compress distill | correct-teacher | cache-logits`: the retraining commands.

Their training flags are TrainConfig's fields and `distill`'s objective flags DistillConfig's (one flag per field,
derived: cli/options.py); a flag left out takes the field's default. `--config FILE` gives any option in YAML;
flags override it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from compactlm.cli.options import ConfigOpt, build_config, command_hints, config_options, options_file
from compactlm.compress.train_config import CACHE_FIELDS, DistillConfig, TrainConfig
from compactlm.core.console import console
from compactlm.core.errors import CompactLMError

CONTROL = ("config", "resume", "overwrite")
"""Options that steer the command, not the run (never read from the options file)."""


def _settings(command, config: Path | None, flags: dict, steering: tuple[str, ...] = CONTROL):
    """The options file (keys checked against `command`'s options, less the `steering` ones) and the flags; the
    run's TrainConfig (with a length), and every value read."""
    hints = {k: v for k, v in command_hints(command).items() if k not in steering}
    located = options_file(config, hints, {k: v for k, v in flags.items() if k not in steering})
    train = build_config(TrainConfig, located).require_length()
    return located, train


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


def _required(located, *names: str) -> list:
    missing = [n for n in names if located.data.get(n) is None]
    if missing:
        raise CompactLMError(f"--{missing[0].replace('_', '-')} is required (on the command line or in --config)")
    return [located.data[n] for n in names]


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @config_options(TrainConfig, DistillConfig)
    def distill_cmd(
        teacher: Annotated[str | None, typer.Option(help="Teacher checkpoint or bundled name.")] = None,
        student: Annotated[str | None, typer.Option(help="Student checkpoint (e.g. from `compress prune`).")] = None,
        out: Annotated[Path | None, typer.Option(help="Output checkpoint directory.")] = None,
        data: Annotated[str | None, typer.Option(help="Training text: bundled corpus, file or folder.")] = None,
        teacher_cache: Annotated[
            Path | None, typer.Option(help="Train from cached top-k teacher logits (compress cache-logits).")
        ] = None,
        from_scratch: Annotated[
            bool | None, typer.Option("--from-scratch", help="Re-initialize the student (the baseline).")
        ] = None,
        eval_samples: Annotated[
            int | None, typer.Option(help="Held-out sequences scored at the end (default: 16).")
        ] = None,
        config: ConfigOpt = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT / discard old checkpoints.")] = False,
        **options,
    ) -> None:
        """Retrain a pruned student by knowledge distillation from its teacher (or by CE with --loss ce)."""
        from compactlm.compress.retrain import distill_checkpoint

        flags = dict(options, teacher=teacher, student=student, out=out, data=data, teacher_cache=teacher_cache)
        flags.update(from_scratch=from_scratch, eval_samples=eval_samples)
        located, train = _settings(distill_cmd, config, flags)
        teacher, student, out = _required(located, "teacher", "student", "out")
        values = located.data
        record = distill_checkpoint(
            teacher,
            student,
            Path(out),
            data=values.get("data", "python-docs"),
            train_cfg=train,
            distill_cfg=build_config(DistillConfig, located),
            teacher_cache=values.get("teacher_cache"),
            from_scratch=bool(values.get("from_scratch")),
            resume=resume,
            overwrite=overwrite,
            eval_samples=values.get("eval_samples", 16),
        )
        _report(record, out)

    @app.command("correct-teacher")
    @config_options(TrainConfig)
    def correct_cmd(
        teacher: Annotated[str, typer.Argument(help="Teacher checkpoint or bundled name.")],
        out: Annotated[Path, typer.Option(help="Output checkpoint directory.")],
        data: Annotated[str | None, typer.Option(help="The distillation data (default: python-docs).")] = None,
        eval_samples: Annotated[
            int | None, typer.Option(help="Held-out sequences scored before and after (default: 16).")
        ] = None,
        config: ConfigOpt = None,
        resume: Annotated[bool, typer.Option("--resume")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
        **options,
    ) -> None:
        """Teacher correction: fine-tune the teacher briefly on the distillation data (CE), before distilling."""
        from compactlm.compress.retrain import correct_teacher

        located, train = _settings(correct_cmd, config, dict(options, data=data, eval_samples=eval_samples))
        record = correct_teacher(
            teacher,
            out,
            data=located.data.get("data", "python-docs"),
            train_cfg=train,
            resume=resume,
            overwrite=overwrite,
            eval_samples=located.data.get("eval_samples", 16),
        )
        _report(record, out)
        if record.get("heldout_loss_before") is not None:
            console.print(f"held-out loss {record['heldout_loss_before']:.4f} -> {record['heldout_loss']:.4f}")

    @app.command("cache-logits")
    @config_options(TrainConfig, skip=tuple(f for f in TrainConfig.__dataclass_fields__ if f not in CACHE_FIELDS))
    def cache_cmd(
        teacher: Annotated[str, typer.Argument(help="Teacher checkpoint or bundled name.")],
        out: Annotated[Path, typer.Option(help="Cache folder to create.")],
        top_k: Annotated[int, typer.Option(help="Logits kept per position.")] = 64,
        value_dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32.")] = "bf16",
        data: Annotated[str | None, typer.Option(help="Same as the distillation's (default: python-docs).")] = None,
        config: Annotated[
            Path | None, typer.Option("--config", help="The distillation's options file (its data keys are used).")
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
        **options,
    ) -> None:
        """Store a teacher's top-k logits for the rows a distillation will read (then: distill --teacher-cache).
        Give it the distillation's data and length options, or its --config file."""
        from compactlm.compress.retrain import cache_logits

        # with the distillation's file, its keys are the distillation's options
        command, steering = (distill_cmd, CONTROL) if config else (cache_cmd, (*CONTROL, "top_k", "value_dtype"))
        located, train = _settings(command, config, dict(options, data=data), steering)
        cache_logits(
            teacher,
            out,
            data=located.data.get("data", "python-docs"),
            train_cfg=train,
            top_k=top_k,
            value_dtype=value_dtype,
            overwrite=overwrite,
        )
