"""File-level jobs behind the CLI and the pipeline: checkpoint (and data) in, scores or checkpoint out."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from compactlm.compress.checkpoint import load_model, load_tokenizer, save_checkpoint
from compactlm.compress.data import check_data, describe, load_sequences
from compactlm.compress.depth import depth_task
from compactlm.compress.evaluate import count_model_params, perplexity
from compactlm.compress.importance import ImportanceConfig, ImportanceScores, estimate_importance, random_scores
from compactlm.compress.prune import PruneTarget, needs_scores, prune
from compactlm.compress.record import read_record
from compactlm.compress.tasks import load_task, multiple_choice_accuracy, pull_tasks
from compactlm.core.console import stage_progress
from compactlm.core.errors import CompactLMError


def calibration_data(model_path, data, samples: int, seq_len: int, split: str = "train") -> torch.Tensor:
    return load_sequences(data, load_tokenizer(model_path), num_sequences=samples, seq_len=seq_len, split=split)


def run_importance(
    model_or_path, data, samples: int, seq_len: int, config: ImportanceConfig | None = None
) -> ImportanceScores:
    """Load (if needed) the model and its calibration data from the train split, and estimate importance."""
    if config is not None and config.depth_tasks:
        pull_tasks(config.depth_tasks)  # a download that fails fails before the model loads and the passes run
    model = load_model(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    path = Path(model.compactlm_path)
    sequences = calibration_data(path, data, samples, seq_len)
    meta = {"model": str(path), "data": describe(data), "split": "train"}
    tokenizer = load_tokenizer(path) if config is not None and config.depth_tasks else None
    with stage_progress() as update:
        return estimate_importance(model, sequences, config, meta=meta, progress=update, tokenizer=tokenizer)


def prune_checkpoint(
    model_or_path,
    out,
    target: PruneTarget,
    *,
    scores: ImportanceScores | None = None,
    scores_path: str | os.PathLike | None = None,
    random_seed: int | None = None,
    data="python-docs",
    samples: int = 128,
    seq_len: int = 256,
    importance: ImportanceConfig | None = None,
    overwrite: bool = False,
) -> dict:
    """Prune a checkpoint to `target` and save it with its record; returns {'path', 'record', 'model'}.

    Scores come from `scores`, a scores file, random (`random_seed`, the baseline), or are computed now on
    `data` (with the removal-loss block size the depth target needs).
    """
    model = load_model(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    source = Path(model.compactlm_path)
    num_layers = model.config.num_hidden_layers
    drop = num_layers - target.num_layers if target.num_layers else 0
    if scores is None and scores_path is not None:
        scores = ImportanceScores.load(scores_path)
    if scores is None and not needs_scores(model.config, target):
        scores = random_scores(model.config)  # every unit is kept or named explicitly: scores choose nothing
        scores.meta = {"not_needed": "widths unchanged and layers named explicitly"}
    task = depth_task(target.depth_metric)
    if scores is None and random_seed is not None:
        blocks = (1, drop) if drop else (1,)
        scores = random_scores(model.config, seed=random_seed, block_sizes=blocks, tasks=(task,) if task else ())
    if scores is None:
        cfg = importance or ImportanceConfig()
        needs_loss = drop > 0 and task is None and target.depth_metric != "block-influence"
        cfg = ImportanceConfig(
            seq_agg=cfg.seq_agg,
            batch_agg=cfg.batch_agg,
            batch_size=cfg.batch_size,
            depth_samples=cfg.depth_samples,
            block_sizes=tuple({1, drop} - {0}) if drop else (1,),
            removal_loss=needs_loss,
            depth_tasks=(task,) if task and drop else (),
            task_samples=cfg.task_samples,
        )
        scores = run_importance(model, data, samples, seq_len, cfg)
    student, record, kept = prune(model, scores, target)

    parent_record = read_record(source)
    kept_file = f"compactlm.kept.{len(parent_record['history']) if parent_record else 0}.safetensors"

    def write_indices(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(kept.tensors(), folder / kept_file)

    record["kept_indices"] = kept_file
    if random_seed is not None:
        record["importance"] = {"random": True, "seed": random_seed}
    path = save_checkpoint(
        student,
        out,
        source=source,
        operation=record,
        extra_files={"kept": write_indices},
        overwrite=overwrite,
    )
    student.compactlm_path = str(path)
    return {"path": path, "record": record, "model": student}


def evaluate_models(
    paths,
    data,
    samples: int,
    seq_len: int,
    batch_size: int = 4,
    names=None,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    task_batch_size: int = 16,
    harness: str = "compactlm",
    num_fewshot: int | None = None,
    general: str | None = None,
) -> pd.DataFrame:
    """Held-out loss/perplexity of several checkpoints on the same held-out sequences (one row each).

    With `tasks` (see compactlm.compress.tasks), each row also gets `acc_<task>`: multiple-choice accuracy on the same
    `task_limit` examples of each task for every model, with `chance_<task>`, `n_<task>` (examples) and
    `seconds_tasks` (the scoring's wall time). With `general` (a held-out corpus, e.g. "english": see
    compactlm.compress.english), each row also gets `general_loss` and `general_perplexity` on as many sequences of
    that text, and `general_data`. `harness="lm-eval"` scores them with lm-evaluation-harness instead
    (compactlm.compress.harness: the bundled tasks offline, any lm-eval task name where its data can be fetched).
    """
    import tempfile
    import time

    if harness not in ("compactlm", "lm-eval"):
        raise CompactLMError(f"harness must be compactlm or lm-eval, not {harness!r}")
    if num_fewshot is not None and harness != "lm-eval":
        raise CompactLMError("--num-fewshot is lm-eval's: give --harness lm-eval")
    examples, lm_eval, scratch = {}, None, None
    if harness == "lm-eval" and tasks:
        scratch = tempfile.TemporaryDirectory(prefix="compactlm-lm-eval-")  # the bundled tasks as lm-eval tasks
        from compactlm.compress import harness as lm_harness

        mapping = lm_harness.write_tasks(tasks, task_limit, Path(scratch.name))  # pulls the tasks before any model
        manager = lm_harness.task_manager(Path(scratch.name))
        lm_harness.check_tasks(mapping, manager)
        lm_eval = (lm_harness, mapping, manager)
    else:
        examples = {task: load_task(task, task_limit) for task in tasks or []}  # pulls the tasks before any model
    if general is not None:
        check_data(general, split="heldout")  # pulls it before any model
    rows = []
    sequences, vocab, general_sequences = None, None, None
    try:
        with stage_progress() as update:
            for i, path in enumerate(paths):
                model = load_model(path)
                if sequences is None:
                    sequences = calibration_data(path, data, samples, seq_len, split="heldout")
                    if general is not None:
                        general_sequences = calibration_data(path, general, samples, seq_len, split="heldout")
                    vocab = model.config.vocab_size
                elif model.config.vocab_size != vocab:
                    raise CompactLMError(
                        f"{path} has another vocabulary than {paths[0]}: perplexities would not compare"
                    )
                result = perplexity(model, sequences, batch_size)
                rows.append(
                    {
                        "model": (names or paths)[i],
                        "path": str(path),
                        "params": count_model_params(model),
                        "heldout_loss": result.loss,
                        "perplexity": result.perplexity,
                        "tokens": result.tokens,
                        "data": str(data),
                    }
                )
                if general_sequences is not None:
                    other = perplexity(model, general_sequences, batch_size)
                    rows[-1].update(
                        general_loss=other.loss, general_perplexity=other.perplexity, general_data=str(general)
                    )
                tokenizer = load_tokenizer(path) if examples or lm_eval else None
                started = time.perf_counter()
                if lm_eval is not None:
                    module, mapping, manager = lm_eval
                    update(f"{(names or paths)[i]}: lm-eval {', '.join(mapping)}", 0, 1)
                    results = module.evaluate(
                        model, tokenizer, mapping, manager, num_fewshot, task_limit, task_batch_size
                    )
                else:
                    results = {
                        task: multiple_choice_accuracy(
                            model,
                            tokenizer,
                            task_examples,
                            task_batch_size,
                            progress=lambda done, total, stage=f"{(names or paths)[i]}: {task}": update(
                                stage, done, total
                            ),
                        )
                        for task, task_examples in examples.items()
                    }
                if results:
                    rows[-1]["seconds_tasks"] = round(time.perf_counter() - started, 1)
                for column, field in (("acc", "accuracy"), ("chance", "chance"), ("n", "examples")):
                    rows[-1].update({f"{column}_{task}": getattr(result, field) for task, result in results.items()})
                update("evaluate", i + 1, len(paths))
                del model
    finally:
        if scratch is not None:
            scratch.cleanup()
    return pd.DataFrame(rows)
