"""The job's report: `report/index.html` and `report/report.md` in the run folder.

Accuracy beside throughput (one headline row per model), the training runs with their loss curves, the
benchmark's own figures and tables (compactlm.bench.report), the stages with their times, and links to every stored
result a number comes from: checkpoint records, evaluation rows, engine manifests, sweep results, stage records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from compactlm.bench.report import benchmark_blocks, point_table, write_documents
from compactlm.compress.record import read_record
from compactlm.core.console import console
from compactlm.core.runs import Run
from compactlm.job.recipe import JobRecipe, command_line, engine_models


def load_results(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sweep rows of every engine, evaluation rows of every model) stored in a run folder."""
    sweeps = sorted((out / "sweep").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(p) for p in sweeps], ignore_index=True) if sweeps else pd.DataFrame()
    rows = [json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))]
    return frame, pd.DataFrame(rows)


def headline_table(recipe: JobRecipe, frame: pd.DataFrame, evals: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One row per model: size, perplexity, task accuracy, and request throughput at the headline point for each
    precision with the speedup over the teacher's engine of the same precision."""
    isl, osl, batch = recipe.headline
    points = point_table(frame) if not frame.empty else pd.DataFrame()
    if not points.empty:
        points = points[(points["isl"] == isl) & (points["osl"] == osl) & (points["batch_size"] == batch)]
    teacher_params = evals.set_index("model")["params"].get("teacher", math.nan) if not evals.empty else math.nan
    base = order[0] if order else None
    rows = []
    for model in [m for m in ["teacher", *order] if m in set(evals.get("model", []))]:
        ev = evals.set_index("model").loc[model]
        row = {"model": model, "params (M)": ev["params"] / 1e6, "% of teacher": 100 * ev["params"] / teacher_params}
        for column, name in (("perplexity", "perplexity"), ("general_perplexity", "general perplexity")):
            if column in evals.columns and not pd.isna(ev[column]):
                row[name] = ev[column]
                reference = evals.set_index("model")[column].get(base, math.nan)
                if model not in ("teacher", base) and reference == reference:
                    row[f"{name} x {base}"] = f"{ev[column] / reference:.1f}x"
        row.update({c: ev[c] for c in evals.columns if c.startswith("acc_")})
        for precision in recipe.engines.precisions:
            here = _throughput(points, model, precision)
            teacher = _throughput(points, base, precision)
            row[f"req/s {precision}"] = here
            row[f"x teacher {precision}"] = f"{here / teacher:.2f}x" if teacher and not math.isnan(here) else ""
        rows.append(row)
    tasks = [c[4:] for c in evals.columns if c.startswith("acc_") and f"chance_{c[4:]}" in evals]
    if rows and tasks:  # the expected accuracy of a random pick
        rows.append({"model": "(chance)", **{f"acc_{t}": evals[f"chance_{t}"].iloc[0] for t in tasks}})
    return pd.DataFrame(rows)


def _throughput(points: pd.DataFrame, model: str | None, precision: str) -> float:
    if points.empty or model is None:
        return math.nan
    hit = points[points["label"] == f"{model} {precision}"]  # compactlm.bench.report's label: model, then precision
    return float(hit["request_throughput"].iloc[0]) if len(hit) else math.nan


def training_table(out: Path, models: list[str]) -> pd.DataFrame:
    """The training runs (teacher correction, each distillation) from the checkpoints' own records."""
    rows = []
    for model in models:
        record = read_record(out / "models" / model)
        if not record:
            continue
        op = record["history"][-1]
        rows.append(
            {
                "model": model,
                "op": op.get("op"),
                "loss": op.get("loss", "ce"),
                "tokens": op.get("tokens"),
                "steps": op.get("steps"),
                "minutes": (op.get("seconds") or math.nan) / 60,
                "final train loss": op.get("final_train_loss"),
                "peak memory (GB)": (op.get("peak_memory_mb") or math.nan) / 1024,
            }
        )
    return pd.DataFrame(rows)


def plot_training(out: Path, models: list[str], path: Path) -> Path | None:
    """Training loss against tokens for each run (the records keep the loss history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for model in models:
        record = read_record(out / "models" / model)
        history = record["history"][-1].get("history") if record else None
        if history:
            curves.append((model, record["history"][-1], history))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for model, op, history in curves:
        xs = [h["tokens"] for h in history]  # tokens seen so far, after each logged step
        ax.plot(
            xs,
            [h["loss"] for h in history],
            marker="." if len(xs) < 30 else None,
            label=f"{model} ({op.get('loss', 'ce')})",
        )
    ax.set(xlabel="training tokens", ylabel="training loss", title="teacher correction and distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stages_table(job: Run) -> pd.DataFrame:
    rows = [
        {"stage": name, "seconds": record.seconds, "this run": "reused" if record.reused else "ran"}
        for name, record in job.records.items()
    ]
    return pd.DataFrame(rows)


def _links(out: Path, report: Path, models: list[str], engines: list[str]) -> list[tuple[str, str]]:
    def rel(path: Path) -> str:
        return Path("..", path.relative_to(out)).as_posix() if path.exists() else ""

    links = [("the recipe as run (budget and overrides applied)", rel(out / "recipe.resolved.yaml"))]
    for model in models:
        links.append((f"{model}: checkpoint record (compactlm.json)", rel(out / "models" / model / "compactlm.json")))
        links.append((f"{model}: evaluation row", rel(out / "eval" / f"{model}.json")))
    for engine in engines:
        links.append((f"{engine}: engine manifest", rel(out / "engines" / engine / "engine.json")))
        links.append((f"{engine}: sweep results", rel(out / "sweep" / f"{engine}.parquet")))
    for drafted in sorted((out / "engines").glob("*+draft")):
        links.append((f"{drafted.name}: engine manifest (with its draft)", rel(drafted / "engine.json")))
    links.append(("speculative decoding: every measurement", rel(out / "draft" / "draft.json")))
    links.append(("all sweep rows in one table", "results.parquet"))
    links.append(("all evaluation rows", "eval.csv"))
    links.append(("stage records (config, fingerprint, outputs, time)", rel(out / "stages")))
    return [(text, href) for text, href in links if href]


def write_job_report(recipe: JobRecipe, out: Path, job: Run, shapes: pd.DataFrame) -> Path:

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    frame, evals = load_results(out)
    order = engine_models(recipe)
    engines = [f"{m}-{p}" for m in order for p in recipe.engines.precisions]
    if not frame.empty:
        frame.to_parquet(report / "results.parquet", index=False)
    evals.to_csv(report / "eval.csv", index=False)
    isl, osl, batch = recipe.headline
    headline = headline_table(recipe, frame, evals, order)

    blocks: list[tuple[str, object]] = [("h1", f"{recipe.name}: Minitron on {recipe.teacher} (budget {recipe.budget})")]
    blocks.append(("code", command_line(recipe, None if out == recipe.default_out() else out)))
    blocks.append(("p", _summary(recipe, job)))
    blocks += [("h2", "Accuracy beside throughput"), ("table", headline)]
    blocks.append(
        (
            "p",
            f"Perplexity: {recipe.evaluate.samples} x {recipe.evaluate.seq_len} held-out tokens of {recipe.data}; "
            + (
                f"general perplexity: as many held-out tokens of {recipe.evaluate.general}; "
                if recipe.evaluate.general not in (None, recipe.data)
                else ""
            )
            + f"accuracy: zero-shot multiple choice on BIG-bench tasks ({recipe.evaluate.task_limit or 'all'} examples "
            f"each at most). Throughput: requests/s at ISL/OSL {isl}/{osl}, {batch} concurrent requests, on the "
            f"{recipe.engines.backend} engine of each precision; 'x teacher' divides by the teacher's engine of the "
            "same precision. 'teacher' is the model as shipped, 'teacher-corrected' the one the students learned from.",
        )
    )
    blocks += _front_blocks(recipe, headline, order, report / "figures" / "front.png")
    blocks += draft_blocks(out)
    trained = [m for m in order if (out / "models" / m / "compactlm.json").is_file()]
    training = training_table(out, trained)
    if not training.empty:
        blocks += [("h2", "Training"), ("img", plot_training(out, trained, report / "figures" / "training.png"))]
        blocks.append(("table", training))
    if not frame.empty:
        blocks += benchmark_blocks(
            frame,
            report / "figures",
            baseline=f"{order[0]} {recipe.engines.precisions[0]}",
            evals=evals if not evals.empty else None,
        )
    models = shapes.assign(params=shapes["params"] / 1e6).rename(columns={"params": "params (M)"})
    blocks += [("h2", "Models"), ("table", models)]
    blocks += [("h2", "Stages"), ("table", stages_table(job))]
    blocks += [("h2", "Where every number comes from"), ("links", _links(out, report, ["teacher", *order], engines))]
    md, index = write_documents(blocks, report, markdown="report.md", page="index.html")
    console.print(f"report: {index} and {md}")
    return index


def _front_blocks(recipe: JobRecipe, headline: pd.DataFrame, order: list[str], path: Path) -> list[tuple[str, object]]:
    """The headline figure: quality against throughput, one point per model x precision, from the headline table."""
    from compactlm.bench.front import front_points, plot_front

    points = front_points(headline[headline["model"] != "(chance)"], list(recipe.engines.precisions))
    if points.empty:
        return []
    shipped = headline[headline["model"] == "teacher"]
    references = {}
    if len(shipped) and order and order[0] != "teacher":  # the teacher as shipped has no engine: a line
        references["perplexity"] = {"teacher as shipped": float(shipped["perplexity"].iloc[0])}
        tasks = [c for c in headline.columns if c.startswith("acc_")]
        if tasks:
            mean = float(shipped[tasks].astype(float).mean(axis=1).iloc[0])
            references["mean accuracy"] = {"teacher as shipped": mean}
    isl, osl, batch = recipe.headline
    label = f"requests/s (ISL/OSL {isl}/{osl}, {batch} concurrent, {recipe.engines.backend} engine)"
    figure = plot_front(points, path, teacher=order[0] if order else None, references=references, x_label=label)
    if figure is None:
        return []
    marks = {c: points[c].map({True: "yes", False: ""}) for c in points.columns if c.startswith("front")}
    shown = points.assign(**marks)
    return [
        ("img", figure),
        (
            "p",
            "Quality against speed, one point per model and precision (the teacher starred): the gray line is the "
            "front, through the points no other point beats on both axes (marked below); the points as drawn are in "
            "figures/front.csv.",
        ),
        ("table", shown),
    ]


def draft_blocks(out: Path) -> list[tuple[str, object]]:
    """The speculative-decoding section, from the draft stage's results (none when the recipe has no draft)."""
    from compactlm.bench.speculative import ALONE, DRAFT_ALONE, speedup_bound
    from compactlm.job.draft import read_results

    result = read_results(out)
    if result is None:
        return []
    teacher, precision, chosen, best = result["teacher"], result["precision"], result["draft"], result["tokens"]
    speed = pd.DataFrame(result["speed"])
    batches = list(dict.fromkeys(speed["batch_size"]))
    rows = []
    for config, group in speed.groupby("config", sort=False):
        if config == ALONE:
            label = f"{teacher} {precision} alone"
        elif config == DRAFT_ALONE:
            label = f"{chosen} {precision} alone (the draft's own speed)"
        else:
            label = f"{teacher} + {chosen} as draft ({config})" + (" [built]" if config == f"k={best}" else "")
        row: dict[str, object] = {"engine": label}
        for batch in batches:
            hit = group[group["batch_size"] == batch].iloc[0]
            row[f"tok/s @{batch}"] = hit["tokens_per_s"]
            row[f"x alone @{batch}"] = f"{hit['speedup']:.2f}x"
            if config not in (ALONE, DRAFT_ALONE):
                row[f"kept @{batch}"] = f"{hit['acceptance']:.0%}"
                row[f"same tokens @{batch}"] = f"{hit['same_tokens']:.0f}/{hit['requests']}"
        rows.append(row)
    first = speed[speed["batch_size"] == batches[0]].set_index("config")["tokens_per_s"]
    cost = first[ALONE] / first[DRAFT_ALONE]
    trials = pd.DataFrame(result["acceptance"]).rename(
        columns={"tokens": "k", "acceptance": "kept", "tokens_per_step": "tokens a step", "tokens_per_s": "tok/s"}
    )
    bounds = ", ".join(f"k={k} {speedup_bound(cost, k):.2f}x" for k in sorted(set(trials["k"])))
    drafted = speed[(speed["batch_size"] == batches[0]) & ~speed["config"].isin([ALONE, DRAFT_ALONE])]
    top = drafted.loc[drafted["speedup"].idxmax()]
    if top["speedup"] < 1:
        verdict = (
            f"Here the draft does not pay: at every k the teacher is slower with it than alone (at best "
            f"{top['speedup']:.2f}x at {batches[0]} request(s), {top['config']}), so serve "
            f"engines/{teacher}-{precision}; the built folder is kept to try other drafts and k "
            "(`compactlm serve --draft-tokens 0` runs it alone)."
        )
    else:
        verdict = f"At {batches[0]} request(s) the built engine runs {top['speedup']:.2f}x the teacher alone."
    return [
        ("h2", "Speculative decoding: a student as the teacher's draft"),
        ("table", pd.DataFrame(rows)),
        (
            "p",
            f"Output tokens/s at ISL/OSL {result['isl']}/{result['osl']} (held-out {result['data']} prompts, EOS "
            f"ignored, median of {result['repeats']} interleaved repeats; @N: N requests at once). The draft proposes "
            "k tokens a step and the teacher checks them in one pass, keeping the run it agrees with and one token of "
            "its own; 'kept' is the share of proposals kept, 'same tokens' the requests whose greedy tokens equal the "
            f"teacher's alone (bf16 compute rounds a k+1-token check differently from one token at a time). {chosen} "
            f"was chosen as the draft for the highest acceptance over the students (below); the teacher was built "
            f"with it at k={best}, the fastest at {batches[0]} request(s): engines/{Path(result['engine']).name}, "
            f"which `compactlm serve` runs as is. A {chosen} step costs {cost:.2f} of the teacher's at "
            f"{batches[0]} request(s), so no acceptance can give more than {bounds}. {verdict}",
        ),
        ("table", trials),
    ]


def _summary(recipe: JobRecipe, job: Run) -> str:
    ran = sum(r.seconds for r in job.records.values() if not r.reused)
    total = sum(r.seconds for r in job.records.values())
    parts = [f"{recipe.teacher}"]
    if recipe.generate.enabled:
        parts.append(f"{recipe.generate.tokens:,} tokens of text generated by it")
    if recipe.correction.enabled:
        parts.append(f"teacher correction ({recipe.correction.planned_tokens():,} tokens of CE on {recipe.train_data})")
    parts.append(f"one importance pass ({recipe.importance.samples} x {recipe.importance.seq_len} tokens)")
    parts.append(f"{len(recipe.students)} students ({', '.join(recipe.students)})")
    how = "cached top-k teacher logits" if recipe.distill.teacher_cache else "the live teacher"
    parts.append(
        f"distillation ({recipe.distill.planned_tokens():,} tokens each of {recipe.train_data}, {recipe.distill.loss} "
        f"loss, from {how})"
    )
    parts.append(f"{recipe.engines.backend} engines ({', '.join(recipe.engines.precisions)})")
    parts.append(f"a sweep of {len(recipe.sweep.shapes)} shape(s) x batch sizes {list(recipe.sweep.batch_sizes)}")
    if recipe.draft.enabled:
        tried = f"{recipe.draft_precision}, k {list(recipe.draft.tokens)}"
        parts.append(f"the teacher with each student as its draft ({tried})")
    work = f"Work done in this run: {ran / 60:.1f} min"
    if total > ran:  # stages reused from an earlier run: their own times too
        work += f" (every stage's own time: {total / 60:.1f} min)"
    return " -> ".join(parts) + f". {work}."
