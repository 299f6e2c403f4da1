"""The job's speculative-decoding stage: the teacher's engine with one of its own students as the draft.

Every student's cpu engine (at the recipe's draft precision) is tried as the draft of the teacher's on held-out
prompts of the recipe's data; the student whose proposals the teacher keeps most is chosen; the teacher alone, with
it at each draft length, and the student alone (its step cost bounds the speed-up) are timed at `draft.batch_sizes`,
interleaved in one process (compactlm.bench.speculative); and the teacher is built again with the chosen student
inside, at the draft length that was fastest at the first batch size: engines/<teacher>-<precision>+draft, a folder
`compactlm serve` runs as is. Everything measured goes to draft/draft.json, which the report reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from compactlm.core.console import console
from compactlm.core.io import write_json
from compactlm.core.runs import Run
from compactlm.job.recipe import JobRecipe, engine_models

STAGE = "draft"


def results_path(out: Path) -> Path:
    return out / "draft" / "draft.json"


def engine_path(out: Path, teacher: str, precision: str) -> Path:
    """The teacher's engine with its draft built in ('+' cannot occur in a student's name: no clash)."""
    return out / "engines" / f"{teacher}-{precision}+draft"


def read_results(out: Path) -> dict | None:
    path = results_path(out)
    return json.loads(path.read_text()) if path.is_file() else None


def estimate(recipe: JobRecipe, seconds_per_token: float = 0.02) -> float:
    """Seconds on a 2-core CPU: the acceptance runs, the timed repeats, one more engine build (SmolLM2-scale)."""
    cfg = recipe.draft
    _, osl, _ = recipe.headline
    trials = len(recipe.students) * len(cfg.tokens) * osl * seconds_per_token * max(1, cfg.prompts / 4)
    timed = cfg.repeats * (len(cfg.tokens) + 2) * sum(osl * seconds_per_token * max(1, b / 4) for b in cfg.batch_sizes)
    return trials + timed + 40


def run_draft(job: Run, recipe: JobRecipe, paths, checkpoints: dict[str, Path]) -> None:
    cfg = recipe.draft
    precision = recipe.draft_precision
    teacher = engine_models(recipe)[0]
    isl, osl, _ = recipe.headline
    out = results_path(paths.out)
    built = engine_path(paths.out, teacher, precision)

    def run(resume: bool) -> dict:
        from compactlm.bench.speculative import acceptance_table, choose_draft, speed_table
        from compactlm.compress.checkpoint import load_tokenizer
        from compactlm.compress.data import load_sequences
        from compactlm.engines.build import build_engine
        from compactlm.engines.config import BuildConfig

        model = paths.engine(teacher, precision)
        drafts = {name: paths.engine(name, precision) for name in recipe.students}
        count = max(cfg.prompts, max(cfg.batch_sizes))
        rows = load_sequences(
            recipe.data, load_tokenizer(checkpoints[teacher]), num_sequences=count, seq_len=isl, split="heldout"
        )
        prompts = rows.tolist()
        console.print(f"acceptance: {len(drafts)} student(s) x k {list(cfg.tokens)}, {cfg.prompts} prompts {isl}/{osl}")
        trials = acceptance_table(model, drafts, cfg.tokens, prompts[: cfg.prompts], osl)
        chosen = choose_draft(trials)
        console.print(f"draft: {chosen} (acceptance {trials.groupby('draft')['acceptance'].mean()[chosen]:.0%})")
        speed = speed_table(model, drafts[chosen], cfg.tokens, cfg.batch_sizes, prompts, osl, cfg.repeats)
        first = speed[(speed["batch_size"] == cfg.batch_sizes[0]) & (speed["tokens"] > 0)]
        best = int(first.loc[first["speedup"].idxmax(), "tokens"])
        build = BuildConfig(
            backend="cpu",
            precision=precision,
            limits=recipe.sweep.limits(),
            draft=str(checkpoints[chosen]),
            draft_tokens=best,
        )
        build_engine(checkpoints[teacher], built, build, overwrite=True)
        result = {
            "teacher": teacher,
            "precision": precision,
            "draft": chosen,
            "tokens": best,
            "engine": str(built),
            "isl": isl,
            "osl": osl,
            "data": recipe.data,
            "prompts": cfg.prompts,
            "repeats": cfg.repeats,
            "acceptance": _records(trials),
            "speed": _records(speed),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
        _print(result)
        return {"path": str(out), "engine": str(built), "draft": chosen, "tokens": best}

    config = {**dataclasses.asdict(cfg), "precision": precision, "isl": isl, "osl": osl, "data": recipe.data}
    deps = [f"engine/{name}-{precision}" for name in engine_models(recipe)]
    how = f"{teacher} {precision} with each student as its draft"
    job.stage(STAGE, config, deps, run, lambda o: Path(o["path"]).is_file() and Path(o["engine"]).is_dir(), how)


def _records(frame) -> list[dict]:
    """Rows as plain JSON values: numpy scalars as numbers, missing values as null."""
    import math

    def plain(value):
        if isinstance(value, list):
            return [plain(v) for v in value]
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and math.isnan(value) else value

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _print(result: dict) -> None:
    for row in result["speed"]:
        if row["config"] == "alone":
            continue
        accepted = f", {row['acceptance']:.0%} kept" if row["acceptance"] is not None else ""
        same = f", {row['same_tokens']:.0f}/{row['requests']} same tokens" if row["same_tokens"] is not None else ""
        console.print(
            f"  batch {row['batch_size']}: {row['config']}: {row['tokens_per_s']:.1f} tok/s, "
            f"{row['speedup']:.2f}x the teacher alone{accepted}{same}"
        )
