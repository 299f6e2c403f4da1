"""Iterative compression (Minitron step 6): a YAML recipe runs prune -> distill -> prune -> distill ..., each
student the teacher of the next stage, and ends with a family table (parameters, perplexity, task accuracy per
stage).

    teacher: runs/teacher-corrected      # the first parent (and teacher); a bundled name works too
    out: runs/chain                      # optional: where it runs (--out wins)
    data: python-docs                    # importance, distillation and held-out text
    seq_len: 256
    importance: {samples: 64, depth_samples: 8}
    distill: {loss: logit, batch_size: 4}        # defaults for every stage
    eval: {samples: 32, seq_len: 512, tasks: [general_knowledge, social_iqa], task_limit: 100}
    stages:
      - name: 86m
        prune: {hidden_size: 432, ffn_hidden_size: 1152}
        distill: {tokens: 20480}
      - name: 61m
        prune: {num_layers: 24, ffn_hidden_size: 768}
        distill: {tokens: 20480}

Every key is checked before anything runs: an unknown one is an error naming it, where it sits and its line.
OUT holds `chain.json` (the recipe as run), one folder per stage (`1-86m/pruned`, `1-86m/distilled`,
`metrics.json`), and `family.csv`. Checkpoints are written atomically, a finished stage is skipped on a re-run and
an interrupted distillation resumes from its work folder; a re-run with a changed recipe is refused for the
stages already done.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from compress.checkpoint import inspect_checkpoint, read_record, write_json
from compress.errors import CompactLMError
from compress.recipe import _Loader, read_yaml

TRAIN_KEYS = {
    "tokens": int,
    "steps": int,
    "batch_size": int,
    "grad_accum": int,
    "lr": float,
    "min_lr": float,
    "warmup_steps": int,
    "weight_decay": float,
    "max_grad_norm": float,
    "precision": str,
    "save_every": int,
    "seed": int,
}
DISTILL_KEYS = TRAIN_KEYS | {
    "loss": str,
    "temperature": float,
    "logit_weight": float,
    "hidden_weight": float,
    "embedding_weight": float,
    "hidden_loss": str,
}
PRUNE_KEYS = {
    "hidden_size": int,
    "ffn_hidden_size": int,
    "num_attention_heads": int,
    "num_query_groups": int,
    "num_layers": int,
    "drop_layers": str,
    "depth_metric": str,
}
STAGE = {"name": str, "prune": PRUNE_KEYS, "distill": DISTILL_KEYS}
SCHEMA = {
    "teacher": str,
    "out": str,
    "data": str,
    "seq_len": int,
    "importance": {"samples": int, "seq_len": int, "depth_samples": int, "batch_size": int},
    "distill": DISTILL_KEYS,
    "eval": {"samples": int, "seq_len": int, "batch_size": int, "tasks": [str], "task_limit": int},
    "stages": [STAGE],
}
REQUIRED = {"": ("teacher", "stages"), "stages[]": ("name", "prune")}
DEFAULTS = {
    "data": "python-docs",
    "seq_len": 256,
    "importance": {"samples": 64, "seq_len": 256, "depth_samples": 8, "batch_size": 8},
    "distill": {"loss": "logit", "batch_size": 4},
    "eval": {"samples": 32, "seq_len": 512, "batch_size": 4, "tasks": [], "task_limit": 100},
}
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check(node, schema, where: str, path: Path) -> None:
    """Every key known and every value of its kind, recursively; errors name the key, its place and line."""
    line = node.start_mark.line + 1
    if isinstance(schema, dict):
        if not isinstance(node, yaml.MappingNode):
            raise CompactLMError(f"{path}:{line}: {where or 'the recipe'} must be a mapping of key: value")
        seen = set()
        for key_node, value_node in node.value:
            key = str(key_node.value).replace("-", "_")
            here = f"{where}.{key}" if where else key
            if key not in schema:
                close = difflib.get_close_matches(key, sorted(schema), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise CompactLMError(
                    f"{path}:{key_node.start_mark.line + 1}: unknown key {key_node.value!r} in "
                    f"{where or 'the recipe'}{hint}; known keys there: {', '.join(sorted(schema))}"
                )
            seen.add(key)
            _check(value_node, schema[key], here, path)
        required = REQUIRED.get(re.sub(r"\[\d+\]", "[]", where), ())
        missing = [k for k in required if k not in seen]
        if missing:
            raise CompactLMError(f"{path}:{line}: {where or 'the recipe'} needs {', '.join(missing)}")
        return
    if isinstance(schema, list):
        if not isinstance(node, yaml.SequenceNode):
            raise CompactLMError(f"{path}:{line}: {where} must be a list")
        for i, item in enumerate(node.value):
            _check(item, schema[0], f"{where}[{i}]", path)
        return
    # the recipe reader's YAML 1.2 loader: 1e-4 is a number
    value = yaml.load(yaml.serialize(node), Loader=_Loader) if isinstance(node, yaml.ScalarNode) else None  # noqa: S506
    ok = isinstance(node, yaml.ScalarNode) and (
        isinstance(value, schema)
        and not (schema is int and isinstance(value, bool))
        or (schema is float and isinstance(value, int) and not isinstance(value, bool))
        or (schema is str and isinstance(value, (int, float)) and where.endswith("drop_layers"))
    )
    if not ok:
        shown = node.value if isinstance(node, yaml.ScalarNode) else "a " + type(node).__name__.removesuffix("Node")
        raise CompactLMError(f"{path}:{line}: {where} must be {_KINDS[schema]}, not {shown!r}")


@dataclass
class Stage:
    name: str
    prune: dict
    distill: dict


@dataclass
class ChainRecipe:
    teacher: str
    data: str
    seq_len: int
    importance: dict
    distill: dict
    eval: dict
    stages: list[Stage]
    source: Path
    out: str | None = None
    """Where the chain runs when the command line gives no --out."""

    def as_dict(self) -> dict:
        return {
            "teacher": self.teacher,
            "data": self.data,
            "seq_len": self.seq_len,
            "importance": self.importance,
            "distill": self.distill,
            "eval": self.eval,
            "stages": [{"name": s.name, "prune": s.prune, "distill": s.distill} for s in self.stages],
        }


def load_chain(path: str | os.PathLike) -> ChainRecipe:
    """Read and check a chain recipe (see the module doc); relative checkpoint paths are taken as given."""
    path = Path(path)
    node, values = read_yaml(path, "recipe")
    if node is None:
        raise CompactLMError(f"recipe {path} is empty: it needs teacher and stages")
    _check(node, SCHEMA, "", path)
    values = json.loads(json.dumps(values))  # plain types
    values = {k.replace("-", "_"): v for k, v in values.items()}
    if not values["stages"]:
        raise CompactLMError(f"{path}: stages is empty: give at least one prune + distill stage")
    stages = []
    names = set()
    for i, raw in enumerate(values["stages"]):
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        name = str(raw["name"])
        if name in names or not name or "/" in name:
            raise CompactLMError(f"{path}: stage {i + 1} needs a unique name without '/', not {name!r}")
        names.add(name)
        distill = {**DEFAULTS["distill"], **values.get("distill", {}), **raw.get("distill", {})}
        if distill.get("tokens") is None and distill.get("steps") is None:
            raise CompactLMError(f"{path}: stage {name!r} needs a distillation length: distill: {{tokens: N}}")
        stages.append(Stage(name, raw["prune"], distill))
    return ChainRecipe(
        teacher=str(values["teacher"]),
        data=str(values.get("data", DEFAULTS["data"])),
        seq_len=int(values.get("seq_len", DEFAULTS["seq_len"])),
        importance={**DEFAULTS["importance"], **values.get("importance", {})},
        distill=values.get("distill", {}),
        eval={**DEFAULTS["eval"], **values.get("eval", {})},
        stages=stages,
        source=path,
        out=values.get("out"),
    )


def _target(stage: Stage):
    from compress.prune import PruneTarget, parse_layer_ranges

    prune = dict(stage.prune)
    if "drop_layers" in prune:
        prune["drop_layers"] = parse_layer_ranges(str(prune["drop_layers"]))
    return PruneTarget(**prune)


def check_chain(recipe: ChainRecipe) -> None:
    """Cheap checks before any work: the teacher loads, every stage's target fits its parent's shape."""
    from compress.distill import DistillConfig
    from compress.prune import plan
    from compress.train import TrainConfig

    _, config = inspect_checkpoint(recipe.teacher)
    for stage in recipe.stages:
        try:
            _, new_config = plan(config, _target(stage))
            TrainConfig(**{k: v for k, v in stage.distill.items() if k in TrainConfig.__dataclass_fields__})
            DistillConfig(**{k: v for k, v in stage.distill.items() if k in DistillConfig.__dataclass_fields__})
        except CompactLMError as exc:
            raise CompactLMError(f"{recipe.source}: stage {stage.name!r}: {exc}") from exc
        config = type(config)(**new_config)


def _stage_dir(out: Path, i: int, stage: Stage) -> Path:
    return out / f"{i + 1}-{stage.name}"


def _prepare(out: Path, recipe: ChainRecipe, overwrite: bool) -> None:
    import shutil

    manifest = out / "chain.json"
    now = recipe.as_dict()
    if manifest.is_file() and overwrite:
        shutil.rmtree(out)
    elif manifest.is_file():
        before = json.loads(manifest.read_text())["recipe"]
        for key in ("teacher", "data", "seq_len", "importance"):
            if before.get(key) != now[key]:
                raise CompactLMError(f"{out} was run with another {key}: use another OUT, or --overwrite")
        for i, (old, new) in enumerate(zip(before["stages"], now["stages"], strict=False)):
            done = (_stage_dir(out, i, Stage(**old)) / "distilled" / "config.json").is_file()
            if done and old != new:
                raise CompactLMError(
                    f"stage {old['name']!r} in {out} is done with another recipe ({old} vs {new}): use another OUT, "
                    "or --overwrite"
                )
    elif out.exists() and any(out.iterdir()):
        raise CompactLMError(f"{out} exists and is not a chain folder (no chain.json): choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"recipe": now, "recipe_file": str(recipe.source)})


def _evaluate(path: Path, name: str, recipe: ChainRecipe, cache_file: Path) -> dict:
    """Held-out perplexity and task accuracy of one model, cached beside it (keyed by the eval settings)."""
    from compress.jobs import evaluate_models

    settings = {"data": recipe.data, **recipe.eval}
    if cache_file.is_file():
        saved = json.loads(cache_file.read_text())
        if saved.get("settings") == settings:
            return saved["metrics"]
    e = recipe.eval
    frame = evaluate_models(
        [path],
        recipe.data,
        e["samples"],
        e["seq_len"],
        e["batch_size"],
        names=[name],
        tasks=list(e["tasks"]) or None,
        task_limit=e["task_limit"],
    )
    metrics = json.loads(frame.iloc[0].to_json())
    write_json(cache_file, {"settings": settings, "metrics": metrics})
    return metrics


def run_chain(recipe: ChainRecipe, out: str | os.PathLike, *, overwrite: bool = False, progress=None) -> pd.DataFrame:
    """Run (or resume) a chain; returns the family table (also saved as OUT/family.csv)."""
    from compress.distill import DistillConfig
    from compress.importance import ImportanceConfig
    from compress.jobs import prune_checkpoint
    from compress.retrain import distill_checkpoint, work_dir_for
    from compress.tasks import resolve_task_names
    from compress.train import TrainConfig

    out = Path(out).expanduser()
    resolve_task_names(",".join(recipe.eval["tasks"]) or None)
    check_chain(recipe)
    _prepare(out, recipe, overwrite)
    update = progress or (lambda stage, done, total: None)
    teacher, _ = inspect_checkpoint(recipe.teacher)
    imp = recipe.importance
    parent = teacher
    rows = []
    for i, stage in enumerate(recipe.stages):
        folder = _stage_dir(out, i, stage)
        pruned, distilled = folder / "pruned", folder / "distilled"
        if not (distilled / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            if not (pruned / "config.json").is_file():
                prune_checkpoint(
                    parent,
                    pruned,
                    _target(stage),
                    data=recipe.data,
                    samples=imp["samples"],
                    seq_len=imp["seq_len"],
                    importance=ImportanceConfig(batch_size=imp["batch_size"], depth_samples=imp["depth_samples"]),
                )
            d = stage.distill
            distill_checkpoint(
                parent,
                pruned,
                distilled,
                data=recipe.data,
                seq_len=recipe.seq_len,
                train_cfg=TrainConfig(**{k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__}),
                distill_cfg=DistillConfig(**{k: v for k, v in d.items() if k in DistillConfig.__dataclass_fields__}),
                resume=work_dir_for(distilled).exists(),
                eval_samples=0,  # the family table evaluates every stage the same way
            )
        update("chain: stages", i + 1, len(recipe.stages))
        record = read_record(distilled)["history"][-1]
        rows.append({"stage": i + 1, "name": stage.name, "path": distilled, "tokens": record["tokens"]})
        parent = distilled
    family = []
    metrics = _evaluate(teacher, "teacher", recipe, out / "teacher-metrics.json")
    family.append(_family_row(0, "teacher", teacher, 0, 0, metrics))
    total = 0
    for row in rows:
        total += row["tokens"]
        metrics = _evaluate(row["path"], row["name"], recipe, row["path"].parent / "metrics.json")
        family.append(_family_row(row["stage"], row["name"], row["path"], row["tokens"], total, metrics))
        update("chain: evaluated", row["stage"], len(rows))
    frame = pd.DataFrame(family)
    frame.to_csv(out / "family.csv", index=False)
    return frame


def _family_row(stage: int, name: str, path: Path, tokens: int, total: int, metrics: dict) -> dict:
    from compress.arch import shape_of
    from compress.checkpoint import read_config

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
    row |= {k: v for k, v in metrics.items() if k.startswith("acc_")}
    row["path"] = str(path)
    return row
