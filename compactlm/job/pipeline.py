"""The main job (`compactlm run RECIPE`): teacher -> teacher correction -> one importance pass -> students ->
distillation (from cached teacher logits) -> evaluation -> engines -> throughput sweep -> a student as the teacher's
speculative-decoding draft (when the recipe asks) -> report.

Every stage is fingerprinted (compactlm.core.runs): killed, the job resumes where it stopped (training from its last
checkpoint); re-run with nothing changed, it does no work twice; change one setting and only the stages that
depend on it run again. The run folder holds every output, the stage records, and the resolved recipe.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import yaml

from compactlm.compress.mixture import Mix, is_mix, parse_mix
from compactlm.core.console import console
from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_file, write_json
from compactlm.core.runs import Run, check_run_folder
from compactlm.job.recipe import CORRECTED, GENERATED, TEACHER, JobRecipe, engine_models, model_names, sources


@dataclasses.dataclass
class Paths:
    """Where each output of a run lives (relative to the run folder)."""

    out: Path

    def model(self, name: str) -> Path:
        return self.out / "models" / name

    def pruned(self, name: str) -> Path:
        return self.out / "models" / f"{name}-pruned"

    @property
    def scores(self) -> Path:
        return self.out / "importance" / "scores.safetensors"

    @property
    def cache(self) -> Path:
        return self.out / "teacher-cache"

    @property
    def generated(self) -> Path:
        return self.out / "data" / GENERATED

    def eval(self, name: str) -> Path:
        return self.out / "eval" / f"{name}.json"

    def engine(self, name: str, precision: str) -> Path:
        return self.out / "engines" / f"{name}-{precision}"

    def sweep(self, engine: str) -> Path:
        return self.out / "sweep" / f"{engine}.parquet"

    @property
    def report(self) -> Path:
        return self.out / "report"


def estimates(recipe: JobRecipe, cached_teacher: bool) -> dict[str, float]:
    """Stage name -> estimated seconds on a 2-core CPU (the job rescales them as it runs). The rates are those
    the main job measured on 2026-12-03 (docs/job/smollm2-minitron-small/stages, bf16 training on a Xeon with
    AMX); a CPU without bf16 units trains in fp32, ~1.5x slower, and the job's rescaling absorbs it."""
    r, plan = recipe, {}
    plan["pull"] = 0.0 if cached_teacher else 30.0
    if r.generate.enabled:  # an engine build, then ~600 kept tokens/s at batch 32 (SmolLM2, bf16, 2 cores)
        plan["generate"] = r.generate.tokens / 600 + 15
    if r.correction.enabled:
        plan["correct-teacher"] = 2.6e-3 * r.correction.planned_tokens() + 12
    plan["importance"] = 1e-3 * r.importance.samples * r.importance.seq_len + 8
    task_metrics = {t.depth_metric for t in r.students.values() if t.num_layers and t.depth_metric.startswith("task:")}
    # SmolLM2, 12 candidate blocks: 88 s for 256 winowhy examples in the job; longer prompts and more blocks cost more
    plan["importance"] += 0.6 * r.importance.task_samples * len(task_metrics)
    for name in r.students:
        plan[f"prune/{name}"] = 2.0
    cached = r.distill.teacher_cache
    if cached:
        plan["teacher-cache"] = 0.8e-3 * r.distill.planned_tokens() + 8
    for name in r.students:  # measured 2.2e-3 (width, 30 layers) and 1.4e-3 s/token (depth, 11 layers)
        plan[f"distill/{name}"] = (1.8e-3 if cached else 3e-3) * r.distill.planned_tokens() + 10
    task_examples = len(r.evaluate.tasks) * (r.evaluate.task_limit or 300)
    perplexity_sets = 2 if r.evaluate.general is not None else 1
    for name in model_names(r):
        tokens = perplexity_sets * r.evaluate.samples * r.evaluate.seq_len
        plan[f"eval/{name}"] = 1e-3 * tokens + 0.06 * task_examples + 5
    points = len(r.sweep.shapes) * len(r.sweep.batch_sizes) * r.sweep.repeats
    for name in engine_models(r):
        for precision in r.engines.precisions:
            plan[f"engine/{name}-{precision}"] = 16.0
            plan[f"sweep/{name}-{precision}"] = 7.0 * points
    if r.draft.enabled:
        from compactlm.job.draft import STAGE, estimate

        plan[STAGE] = estimate(r)
    return plan


def check_job(recipe: JobRecipe):
    """Everything that can be checked before any work, and before the run folder exists: the data, the teacher (a
    bundled one is pulled into the cache once), every student's target, and every sequence length against the
    teacher's positions. Returns the resolved teacher and the table of shapes."""
    from compactlm.compress.arch import count_params, shape_of
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.compress.data import check_data
    from compactlm.compress.prune import plan

    check_data(recipe.data, "train")
    check_data(recipe.data, "heldout")
    if recipe.distill.data is not None:  # every source but the text the job will generate
        for name in set(sources(recipe.train_data)) - {GENERATED}:
            try:
                check_data(name, "train")
            except CompactLMError as exc:
                raise CompactLMError(f"{recipe.source}: distill.data: {exc}") from exc
    teacher = inspect_checkpoint(recipe.teacher)
    config = teacher.config
    rows = [{"model": TEACHER, **shape_of(config).as_dict(), "params": count_params(shape_of(config))}]
    for name, target in recipe.students.items():
        try:
            shape, _ = plan(config, target)
        except CompactLMError as exc:
            raise CompactLMError(f"{recipe.source}: student {name!r}: {exc}") from exc
        rows.append({"model": name, **shape.as_dict(), "params": count_params(shape)})
    frame = pd.DataFrame(rows)
    frame["params_pct"] = 100 * frame["params"] / frame["params"].iloc[0]
    max_pos = getattr(config, "max_position_embeddings", None)
    lengths = {
        "sweep shapes (input + output)": recipe.sweep.limits().max_seq_len,
        "correction.seq_len": recipe.correction.seq_len if recipe.correction.enabled else 0,
        "importance.seq_len": recipe.importance.seq_len,
        "distill.seq_len": recipe.distill.seq_len,
        "evaluate.seq_len": recipe.evaluate.seq_len,
    }
    for what, length in lengths.items():
        if max_pos and length > max_pos:
            raise CompactLMError(
                f"{recipe.source}: {what} needs {length} positions; the teacher has {max_pos} (max_position_embeddings)"
            )
    if recipe.evaluate.general is not None:
        try:
            check_data(recipe.evaluate.general, "heldout")  # last: a pulled set is downloaded now
        except CompactLMError as exc:
            raise CompactLMError(f"{recipe.source}: evaluate.general: {exc}") from exc
    return teacher, frame


def run_job(recipe: JobRecipe, out: Path | None = None) -> Path:
    """Run (or resume) the whole job; returns the report's index.html."""
    out = Path(out or recipe.default_out()).expanduser()
    check_run_folder(out, "job", recipe.name)  # before anything is pulled
    checked, shapes = check_job(recipe)  # before anything is created
    job = Run.claim(out, "job", recipe.name, estimates(recipe, True))
    paths = Paths(out)
    for folder in ("models", "engines", "sweep", "eval", "importance"):
        (out / folder).mkdir(exist_ok=True)
    with atomic_file(out / "recipe.resolved.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(_plain(recipe), sort_keys=False))
    console.print(
        f"[bold]{recipe.name}[/] (budget {recipe.budget}) -> {out}: {len(job.plan)} stages, "
        f"estimated {sum(job.plan.values()) / 60:.0f} min on a 2-core CPU"
    )

    teacher = _pull(job, recipe, checked.path)
    from compactlm.compress.tables import results_table

    names = {"num_layers": "layers", "hidden_size": "hidden", "ffn_hidden_size": "MLP", "num_attention_heads": "heads"}
    names.update(num_query_groups="KV heads", params_pct="% of teacher")
    shapes = shapes[["model", *names, "params"]].rename(columns=names)
    console.print(results_table(shapes, title=f"{recipe.name}: the teacher and its students"))
    if recipe.generate.enabled:
        _generate(job, recipe, paths, teacher)
    source = _correct(job, recipe, paths, teacher)
    _importance(job, recipe, paths, source)
    for name, target in recipe.students.items():
        _prune(job, recipe, paths, source, name, target)
    if recipe.distill.teacher_cache:
        _teacher_cache(job, recipe, paths, source)
    for name in recipe.students:
        _distill(job, recipe, paths, source, name)
    checkpoints = {TEACHER: teacher, **({CORRECTED: source} if recipe.correction.enabled else {})}
    checkpoints.update({name: paths.model(name) for name in recipe.students})
    for name, path in checkpoints.items():
        _evaluate(job, recipe, paths, name, path)
    for name in engine_models(recipe):
        for precision in recipe.engines.precisions:
            _engine(job, recipe, paths, name, checkpoints[name], precision)
            _sweep(job, recipe, paths, name, precision)
    if recipe.draft.enabled:
        from compactlm.job.draft import run_draft

        run_draft(job, recipe, paths, checkpoints)

    from compactlm.job.report import write_job_report

    index = write_job_report(recipe, out, job, shapes)
    console.print(f"[green]done[/] in {job.elapsed / 60:.1f} min: report [bold]{index}[/]")
    return index


def _plain(recipe: JobRecipe) -> dict:
    data = dataclasses.asdict(recipe)
    data["sweep"] = {k: v for k, v in data["sweep"].items() if k not in ("extra", "engines", "names")}
    return json.loads(json.dumps(data, default=str))  # plain types: tuples as lists, paths as strings


def _pull(job: Run, recipe: JobRecipe, path: Path) -> Path:
    """The teacher, resolved by check_job (a bundled one pulled into the cache): its path and content hash."""
    from compactlm.compress.checkpoint import checkpoint_sha256

    def run(resume: bool) -> dict:
        return {"path": str(path), "sha256": checkpoint_sha256(path)}

    record = job.stage("pull", {"teacher": recipe.teacher}, [], run, lambda o: Path(o["path"]).is_dir())
    return Path(record.outputs["path"])


def _interrupted(exc: Exception) -> CompactLMError:
    return CompactLMError(
        f"{str(exc).split(': checkpoint', 1)[0]}; re-run the same command to continue where it stopped"
    )


def _correct(job: Run, recipe: JobRecipe, paths: Paths, teacher: Path) -> Path:
    if not recipe.correction.enabled:
        return teacher
    from compactlm.compress.retrain import correct_teacher
    from compactlm.compress.train import TrainingInterrupted
    from compactlm.compress.train_config import TrainConfig

    out = paths.model(CORRECTED)
    cfg = recipe.correction

    def run(resume: bool) -> dict:
        try:
            record = correct_teacher(
                teacher,
                out,
                data=train_data(recipe, paths),
                train_cfg=TrainConfig.of(cfg),
                resume=resume,
                overwrite=True,
                eval_samples=0,
            )
        except TrainingInterrupted as exc:
            raise _interrupted(exc) from exc
        return {"path": str(out), "tokens": record["tokens"], "final_train_loss": record["final_train_loss"]}

    config = {**dataclasses.asdict(cfg), "data": recipe.train_data}
    job.stage(
        "correct-teacher", config, _data_deps(recipe, "pull"), run, _is_dir, f"{cfg.planned_tokens():,} tokens of CE"
    )
    return out


def train_data(recipe: JobRecipe, paths: Paths) -> str:
    """The training data as the stages read it: `generated` in a mix replaced by the job's generated corpus."""
    data = recipe.train_data
    if not is_mix(data):
        return str(paths.generated) if data == GENERATED else data
    return str(Mix(tuple((str(paths.generated) if n == GENERATED else n, w) for n, w in parse_mix(data).parts)))


def _data_deps(recipe: JobRecipe, *deps: str) -> list[str]:
    return [*deps, *(["generate"] if recipe.generate.enabled else [])]


def _generate(job: Run, recipe: JobRecipe, paths: Paths, teacher: Path) -> None:
    from compactlm.engines.generate import GenerateConfig, generate_corpus

    cfg = recipe.generate

    def run(resume: bool) -> dict:
        settings = GenerateConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerateConfig)})
        record = generate_corpus(str(teacher), paths.generated, settings, overwrite=True)
        return {"path": str(paths.generated), "tokens": record["tokens"], "samples": record["samples"]}

    config = {**dataclasses.asdict(cfg), "teacher": recipe.teacher}
    how = f"{cfg.tokens:,} tokens sampled from the teacher (T {cfg.temperature}, top-p {cfg.top_p})"
    job.stage("generate", config, ["pull"], run, _is_dir, how)


def _is_dir(outputs: dict) -> bool:
    return Path(outputs["path"]).is_dir()


def _importance(job: Run, recipe: JobRecipe, paths: Paths, source: Path) -> None:
    from compactlm.compress.checkpoint import inspect_checkpoint, load_model
    from compactlm.compress.depth import depth_task
    from compactlm.compress.importance import ImportanceConfig
    from compactlm.compress.operations import run_importance

    layers = inspect_checkpoint(source).config.num_hidden_layers
    # removal losses only for the block sizes the depth students drop (each candidate block costs a forward)
    drops = sorted({layers - t.num_layers for t in recipe.students.values() if t.num_layers})
    tasks = sorted({depth_task(t.depth_metric) for t in recipe.students.values() if t.num_layers} - {None})
    _warn_overlap(recipe, tasks)

    def run(resume: bool) -> dict:
        scores = run_importance(
            load_model(source),
            recipe.data,
            recipe.importance.samples,
            recipe.importance.seq_len,
            ImportanceConfig(
                block_sizes=tuple(drops or (1,)),
                removal_loss=bool(drops),
                depth_tasks=tuple(tasks),
                task_samples=recipe.importance.task_samples,
            ),
        )
        scores.save(paths.scores)  # atomically
        return {"path": str(paths.scores)}

    config = {**dataclasses.asdict(recipe.importance), "data": recipe.data, "block_sizes": drops}
    if tasks:  # (absent otherwise: runs made before task accuracy existed keep their importance stage)
        config["depth_tasks"] = tasks
    else:
        config.pop("task_samples")
    deps = ["correct-teacher" if recipe.correction.enabled else "pull"]
    how = "forward passes only" + (f"; blocks also by {', '.join(tasks)} accuracy" if tasks else "")
    job.stage("importance", config, deps, run, lambda o: Path(o["path"]).is_file(), how)


def _warn_overlap(recipe: JobRecipe, tasks: list[str]) -> None:
    """Layers chosen by a task the job also evaluates: say so where the two example sets share examples."""
    from compactlm.compress.tasks import task_size

    for task in set(tasks) & set(recipe.evaluate.tasks):
        size = task_size(task)
        shared = min(recipe.evaluate.task_limit or size, size) + min(recipe.importance.task_samples, size) - size
        if shared > 0:
            console.print(
                f"[yellow]warning[/]: {task} chooses the depth students' layers on its last "
                f"{recipe.importance.task_samples} examples and is evaluated on its first "
                f"{recipe.evaluate.task_limit or size}: {shared} of its {size} examples are in both"
            )


def _prune(job: Run, recipe: JobRecipe, paths: Paths, source: Path, name: str, target) -> None:
    from compactlm.compress.importance import ImportanceScores
    from compactlm.compress.operations import prune_checkpoint

    out = paths.pruned(name)

    def run(resume: bool) -> dict:
        result = prune_checkpoint(source, out, target, scores=ImportanceScores.load(paths.scores), overwrite=True)
        return {"path": str(result["path"]), "params": result["record"].get("params", {})}

    config = {k: v for k, v in dataclasses.asdict(target).items() if v is not None}
    job.stage(f"prune/{name}", config, ["importance"], run, _is_dir, _describe_target(config))


def _describe_target(target: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in target.items() if k != "depth_metric")


def _teacher_cache(job: Run, recipe: JobRecipe, paths: Paths, source: Path) -> None:
    from compactlm.compress.retrain import cache_logits
    from compactlm.compress.train_config import CACHE_FIELDS

    cfg = recipe.distill

    def run(resume: bool) -> dict:
        path = cache_logits(
            source,
            paths.cache,
            data=train_data(recipe, paths),
            train_cfg=cfg.train,
            top_k=cfg.top_k,
            overwrite=True,
        )
        return {"path": str(path)}

    config = {k: getattr(cfg, k) for k in CACHE_FIELDS}  # what decides the rows the students will read
    config.update(top_k=cfg.top_k, data=recipe.train_data)
    deps = _data_deps(recipe, "correct-teacher" if recipe.correction.enabled else "pull")
    job.stage("teacher-cache", config, deps, run, _is_dir, f"top-{cfg.top_k} logits of {cfg.planned_tokens():,} tokens")


def _distill(job: Run, recipe: JobRecipe, paths: Paths, source: Path, name: str) -> None:
    from compactlm.compress.retrain import distill_checkpoint
    from compactlm.compress.train import TrainingInterrupted

    cfg = recipe.distill
    out = paths.model(name)

    def run(resume: bool) -> dict:
        try:
            record = distill_checkpoint(
                source,
                paths.pruned(name),
                out,
                data=train_data(recipe, paths),
                train_cfg=cfg.train,
                distill_cfg=cfg.objective,
                teacher_cache=paths.cache if cfg.teacher_cache else None,
                resume=resume,
                overwrite=True,
                eval_samples=0,
            )
        except TrainingInterrupted as exc:
            raise _interrupted(exc) from exc
        keys = ("loss", "tokens", "steps", "seconds", "final_train_loss", "peak_memory_mb")
        return {"path": str(out), **{k: record[k] for k in keys}}

    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data"} | {"data": recipe.train_data}
    deps = _data_deps(recipe, f"prune/{name}", *(["teacher-cache"] if cfg.teacher_cache else []))
    how = f"{cfg.planned_tokens():,} tokens, {cfg.loss} loss" + (", cached teacher logits" if cfg.teacher_cache else "")
    job.stage(f"distill/{name}", config, deps, run, _is_dir, how)


def _checkpoint_stage(recipe: JobRecipe, name: str) -> str:
    if name == TEACHER:
        return "pull"
    if name == CORRECTED:
        return "correct-teacher"
    return f"distill/{name}"


def _evaluate(job: Run, recipe: JobRecipe, paths: Paths, name: str, path: Path) -> None:
    from compactlm.compress.operations import evaluate_models

    cfg = recipe.evaluate
    out = paths.eval(name)

    def run(resume: bool) -> dict:
        frame = evaluate_models(
            [path],
            recipe.data,
            cfg.samples,
            cfg.seq_len,
            names=[name],
            tasks=list(cfg.tasks),
            task_limit=cfg.task_limit,
            general=cfg.general if cfg.general != recipe.data else None,
        )
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[0].items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, row)
        keep = ("perplexity", "general_perplexity", "params")
        return {"path": str(out), **{k: v for k, v in row.items() if k in keep}}

    config = {**dataclasses.asdict(cfg), "data": recipe.data}
    job.stage(f"eval/{name}", config, [_checkpoint_stage(recipe, name)], run, lambda o: Path(o["path"]).is_file())


def _engine(job: Run, recipe: JobRecipe, paths: Paths, name: str, checkpoint: Path, precision: str) -> None:
    from compactlm.engines.build import build_engine
    from compactlm.engines.config import BuildConfig

    out = paths.engine(name, precision)
    limits = recipe.sweep.limits()

    def run(resume: bool) -> dict:
        config = BuildConfig(backend=recipe.engines.backend, precision=precision, limits=limits)
        build_engine(checkpoint, out, config, overwrite=True)
        return {"path": str(out)}

    config = {"backend": recipe.engines.backend, "precision": precision, "limits": dataclasses.asdict(limits)}
    deps = [_checkpoint_stage(recipe, name)]
    job.stage(f"engine/{name}-{precision}", config, deps, run, _is_dir, f"{recipe.engines.backend} {precision}")


def _sweep(job: Run, recipe: JobRecipe, paths: Paths, name: str, precision: str) -> None:
    from compactlm.bench.metrics import Slo
    from compactlm.bench.runner import run_benchmark, sweep_plan
    from compactlm.bench.targets import open_target

    engine = f"{name}-{precision}"
    out = paths.sweep(engine)
    sweep = recipe.sweep

    def run(resume: bool) -> dict:
        with open_target(str(paths.engine(name, precision)), name) as target:
            frame = run_benchmark(target, sweep_plan(sweep), None, Slo(**sweep.slo), timeout=sweep.request_timeout)
        frame["job"] = recipe.name
        frame["budget"] = recipe.budget
        with atomic_file(out) as tmp:
            frame.to_parquet(tmp, index=False)
        return {"path": str(out), "points": len(frame)}

    config = {k: v for k, v in dataclasses.asdict(sweep).items() if k not in ("extra", "engines", "names", "out")}
    n = len(sweep_plan(sweep))
    job.stage(f"sweep/{engine}", config, [f"engine/{engine}"], run, lambda o: Path(o["path"]).is_file(), f"{n} points")
