"""Iterative compression (Minitron step 6): a chain file runs prune -> distill -> prune -> distill ..., each student
the teacher of the next stage, and ends with a family table (parameters, perplexity, task accuracy per stage).

    teacher: runs/teacher-corrected      # the first parent (and teacher); a bundled name works too
    out: runs/chain                      # optional: where it runs (--out wins)
    data: python-docs                    # importance, distillation and held-out text
    importance: {samples: 64, depth_samples: 8}
    distill: {loss: logit, batch_size: 4}        # laid under every stage's own distill: (TrainConfig + DistillConfig)
    eval: {samples: 32, seq_len: 512, tasks: [general_knowledge, social_iqa], task_limit: 100}   # general: english
    stages:
      - name: 86m
        prune: {hidden_size: 432, ffn_hidden_size: 1152}
        distill: {tokens: 20480}
      - name: 61m
        prune: {num_layers: 24, ffn_hidden_size: 768}
        distill: {tokens: 20480}

Every key is checked before anything runs (compactlm.core.config): an unknown one is an error naming it, where it
sits and its line. OUT is a run folder (compactlm.core.runs): `chain.json` (the file as run), one folder per stage
(`1-86m/pruned`, `1-86m/distilled`, `1-86m/metrics.json`), `family.csv`, and a record per stage under `stages/`.
A re-run skips what is done; an interrupted distillation resumes from its checkpoint; change a stage and it and
the stages after it run again.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from compactlm.compress.prune import PruneTarget
from compactlm.compress.train_config import DistillRun
from compactlm.core.config import build, load_yaml, overlay, part, put
from compactlm.core.errors import CompactLMError
from compactlm.core.io import read_json, write_json


@dataclass(frozen=True)
class ChainImportance:
    """The importance pass each stage prunes from (on its parent)."""

    samples: int = 64
    seq_len: int = 256
    depth_samples: int = 8
    batch_size: int = 8

    def __post_init__(self):
        for name in ("samples", "seq_len", "depth_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"importance.{name} must be >= 1", key=name)


@dataclass(frozen=True)
class ChainEval:
    """How every model of the family is evaluated: the same held-out sequences and task examples."""

    samples: int = 32
    seq_len: int = 512
    batch_size: int = 4
    tasks: tuple[str, ...] = ()
    task_limit: int = 100
    general: str | None = "english"  # a held-out set outside the data's domain (compactlm.compress.english); null: none

    def __post_init__(self):
        from compactlm.compress.tasks import resolve_task_names

        for name in ("samples", "seq_len", "batch_size", "task_limit"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"eval.{name} must be >= 1", key=name)
        try:
            resolve_task_names(",".join(self.tasks) or None)
        except CompactLMError as exc:
            raise CompactLMError(str(exc), key="tasks") from exc


@dataclass(frozen=True)
class Stage:
    name: str
    prune: PruneTarget
    distill: DistillRun = field(default_factory=DistillRun)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise CompactLMError(f"a stage needs a name without '/', not {self.name!r}", key="name")
        if self.distill.tokens is None and self.distill.steps is None:
            raise CompactLMError(
                f"stage {self.name!r} needs a distillation length: distill: {{tokens: N}}", key="distill"
            )


@dataclass(frozen=True)
class ChainRecipe:
    teacher: str
    stages: tuple[Stage, ...]
    out: str | None = None
    """Where the chain runs when the command line gives no --out."""
    data: str = "python-docs"
    importance: ChainImportance = field(default_factory=ChainImportance)
    distill: DistillRun = field(default_factory=DistillRun)
    """Defaults for every stage's distillation (each stage's own `distill:` is laid over them)."""
    eval: ChainEval = field(default_factory=ChainEval)
    source: str = field(default="", metadata={"config": False})
    """The chain file."""

    def __post_init__(self):
        if not self.stages:
            raise CompactLMError("stages is empty: give at least one prune + distill stage", key="stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise CompactLMError(f"stage names must be unique, not {names}", key="stages")

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


def load_chain(path: str | os.PathLike) -> ChainRecipe:
    """Read and check a chain file (see the module doc); relative checkpoint paths are taken as given."""
    located = load_yaml(path, "chain file", empty_ok=True)
    stages = located.data.get("stages")
    if isinstance(stages, list) and isinstance(located.data.get("distill", {}), dict):
        defaults = part(located, "distill")  # the top-level distill: lies under each stage's own
        for i, stage in enumerate(stages):
            if isinstance(stage, dict) and isinstance(stage.get("distill", {}), dict):
                at = f"stages[{i}].distill"
                located = put(located, at, overlay(defaults, part(located, at)))
    recipe = build(ChainRecipe, located, what="the chain file")
    return dataclasses.replace(recipe, source=str(path))


def _stage_dir(out: Path, i: int, stage: Stage) -> Path:
    return out / f"{i + 1}-{stage.name}"


def check_chain(recipe: ChainRecipe) -> None:
    """Cheap checks before any work: the teacher loads, every stage's target fits its parent's shape."""
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.compress.prune import plan

    config = inspect_checkpoint(recipe.teacher).config
    for stage in recipe.stages:
        try:
            _, new_config = plan(config, stage.prune)
        except CompactLMError as exc:
            raise CompactLMError(f"{recipe.source}: stage {stage.name!r}: {exc}") from exc
        config = type(config)(**new_config)
    if recipe.eval.general is not None:  # last: a pulled set is downloaded now
        from compactlm.compress.data import check_data

        try:
            check_data(recipe.eval.general, "heldout")
        except CompactLMError as exc:
            raise CompactLMError(f"{recipe.source}: eval.general: {exc}") from exc


def run_chain(recipe: ChainRecipe, out: str | os.PathLike, *, overwrite: bool = False, progress=None) -> pd.DataFrame:
    """Run (or resume) a chain; returns the family table (also saved as OUT/family.csv)."""
    from compactlm.compress.checkpoint import checkpoint_sha256, inspect_checkpoint
    from compactlm.core.runs import Run

    out = Path(out).expanduser()
    check_chain(recipe)
    run = Run.claim(out, "chain", Path(recipe.source).stem or "chain", overwrite=overwrite)
    write_json(out / "chain.json", {"recipe": recipe.as_dict(), "recipe_file": recipe.source})
    update = progress or (lambda stage, done, total: None)
    teacher = inspect_checkpoint(recipe.teacher).path

    def pull(resume: bool) -> dict:
        return {"path": str(teacher), "sha256": checkpoint_sha256(teacher)}

    run.stage("teacher", {"teacher": recipe.teacher}, [], pull, lambda o: Path(o["path"]).is_dir())
    parent, parent_stage = teacher, "teacher"
    rows = []
    for i, stage in enumerate(recipe.stages):
        folder = _stage_dir(out, i, stage)
        _prune_stage(run, recipe, stage, parent, parent_stage, folder / "pruned")
        record = _distill_stage(run, recipe, stage, parent, parent_stage, folder)
        update("chain: stages", i + 1, len(recipe.stages))
        rows.append({"stage": i + 1, "name": stage.name, "path": folder / "distilled", "tokens": record["tokens"]})
        parent, parent_stage = folder / "distilled", f"distill/{stage.name}"
    family = [_family_row(0, "teacher", teacher, 0, 0, _eval_stage(run, recipe, "teacher", teacher, "teacher", out))]
    total = 0
    for row in rows:
        total += row["tokens"]
        deps = f"distill/{row['name']}"
        metrics = _eval_stage(run, recipe, row["name"], row["path"], deps, row["path"].parent)
        family.append(_family_row(row["stage"], row["name"], row["path"], row["tokens"], total, metrics))
        update("chain: evaluated", row["stage"], len(rows))
    frame = pd.DataFrame(family)
    frame.to_csv(out / "family.csv", index=False)
    return frame


def _prune_stage(run, recipe: ChainRecipe, stage: Stage, parent: Path, parent_stage: str, pruned: Path) -> None:
    from compactlm.compress.importance import ImportanceConfig
    from compactlm.compress.operations import prune_checkpoint

    imp = recipe.importance

    def work(resume: bool) -> dict:
        prune_checkpoint(
            parent,
            pruned,
            stage.prune,
            data=recipe.data,
            samples=imp.samples,
            seq_len=imp.seq_len,
            importance=ImportanceConfig(batch_size=imp.batch_size, depth_samples=imp.depth_samples),
            overwrite=True,
        )
        return {"path": str(pruned)}

    config = {"target": dataclasses.asdict(stage.prune), "importance": dataclasses.asdict(imp), "data": recipe.data}
    run.stage(f"prune/{stage.name}", config, [parent_stage], work, _is_dir)


def _distill_stage(run, recipe: ChainRecipe, stage: Stage, parent: Path, parent_stage: str, folder: Path) -> dict:
    from compactlm.compress.retrain import distill_checkpoint

    distilled = folder / "distilled"

    def work(resume: bool) -> dict:
        record = distill_checkpoint(
            parent,
            folder / "pruned",
            distilled,
            data=recipe.data,
            train_cfg=stage.distill.train,
            distill_cfg=stage.distill.objective,
            resume=resume,
            overwrite=True,
            eval_samples=0,  # the family table evaluates every stage the same way
        )
        return {"path": str(distilled), "tokens": record["tokens"]}

    config = {"distill": dataclasses.asdict(stage.distill), "data": recipe.data}
    deps = [f"prune/{stage.name}", parent_stage]
    return run.stage(f"distill/{stage.name}", config, deps, work, _is_dir).outputs


def _eval_stage(run, recipe: ChainRecipe, name: str, path: Path, dep: str, folder: Path) -> dict:
    """Held-out perplexity and task accuracy of one model, stored beside it as metrics.json."""
    from compactlm.compress.operations import evaluate_models

    e = recipe.eval
    file = folder / ("teacher-metrics.json" if name == "teacher" else "metrics.json")

    def work(resume: bool) -> dict:
        frame = evaluate_models(
            [path],
            recipe.data,
            e.samples,
            e.seq_len,
            e.batch_size,
            names=[name],
            tasks=list(e.tasks) or None,
            task_limit=e.task_limit,
            general=e.general if e.general != recipe.data else None,
        )
        metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[0].items()}
        write_json(file, {"settings": dataclasses.asdict(e), "metrics": metrics})
        return {"path": str(file)}

    config = {"eval": dataclasses.asdict(e), "data": recipe.data}
    record = run.stage(f"eval/{name}", config, [dep], work, lambda o: Path(o["path"]).is_file())
    return read_json(record.outputs["path"], "metrics file")["metrics"]


def _is_dir(outputs: dict) -> bool:
    return Path(outputs["path"]).is_dir()


def _family_row(stage: int, name: str, path: Path, tokens: int, total: int, metrics: dict) -> dict:
    from compactlm.compress.arch import shape_of
    from compactlm.compress.checkpoint import read_config

    shape = shape_of(read_config(Path(path)))
    row = {
        "stage": stage,
        "model": name,
        "params": metrics["params"],
        "layers": shape.num_layers,
        "hidden": shape.hidden_size,
        "ffn": shape.ffn_hidden_size,
        "heads": f"{shape.num_attention_heads}/{shape.num_query_groups}",
        "distill_tokens": tokens,
        "total_tokens": total,
        "heldout_loss": metrics["heldout_loss"],
        "perplexity": metrics["perplexity"] if metrics["perplexity"] is not None else math.inf,
    }
    if "general_perplexity" in metrics:
        row["general_perplexity"] = metrics["general_perplexity"]
    row |= {k: v for k, v in metrics.items() if k.startswith("acc_")}
    row["path"] = str(path)
    return row
