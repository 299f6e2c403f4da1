"""The job recipe: the repo's recipe loads, budgets and --set lay values over it, and every bad key or value is
an error naming it and its line before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from compactlm.core.errors import CompactLMError
from compactlm.job.recipe import load_job_recipe
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "smollm2-minitron.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = """\
name: job
students:
  small: {num_layers: 2}
sweep:
  shapes: [[16, 8]]
  batch_sizes: [1, 4]
  requests: 4
"""


def test_the_repo_recipe_loads_with_both_budgets():
    small = load_job_recipe(RECIPE)
    full = load_job_recipe(RECIPE, budget="full")
    assert set(small.students) == {"width", "depth"}
    assert small.engines.precisions == ("bf16", "int8")
    assert full.distill.tokens > small.distill.tokens and full.correction.tokens > small.correction.tokens
    assert full.evaluate.task_limit == 200 and full.sweep.repeats == 2 and len(full.sweep.shapes) == 2
    # the full budget adds the architecture search's winner beside the two hand-picked students, unchanged
    assert set(full.students) == {"width", "depth", "searched"}
    assert {name: full.students[name] for name in small.students} == small.students
    assert full.students["searched"].num_query_groups == 2 and full.students["searched"].num_layers == 26
    assert small.headline == (128, 128, 32)
    assert small.default_out() == Path("runs/smollm2-minitron-small")
    # the recipe distils on half docs, half the teacher's own text, and generates enough of it for both budgets
    for recipe in (small, full):
        assert recipe.train_data == "python-docs:0.5,generated:0.5" and recipe.generate.enabled
        assert recipe.distill.precision == "auto" and recipe.distill.lr == 1e-3


def test_set_overrides_one_value_and_keeps_the_rest():
    recipe = load_job_recipe(RECIPE, overrides=["distill.tokens=4096", "students.depth.num_layers=20"])
    assert recipe.distill.tokens == 4096 and recipe.distill.loss == "logit"
    assert recipe.students["depth"].num_layers == 20 and recipe.students["width"].hidden_size == 432


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            BASE + "distil: {tokens: 3}\n",
            r"recipe.yaml:8: unknown key 'distil' in the recipe \(did you mean 'distill'\?\)",
        ),
        (
            BASE + "distill:\n  tokens: 3\n  tempreature: 2\n",
            r"recipe.yaml:10: unknown key 'tempreature' in distill \(did you mean 'temperature'\?\)",
        ),
        (BASE + "distill: {tokens: many}\n", r"recipe.yaml:8: distill.tokens must be an integer or null, not 'many'"),
        (BASE + "distill: {tokens: 0}\n", r"recipe.yaml:8: --tokens must be at least 1, not 0"),
        (
            BASE.replace("{num_layers: 2}", "{num_layer: 2}"),
            r"recipe.yaml:3: unknown key 'num_layer' in students.small \(did you mean 'num_layers'\?\)",
        ),
        (BASE.replace("small:", "teacher:"), r"student name 'teacher'"),
        (BASE + "engines: {precisions: [fp64]}\n", r"recipe.yaml:8: engines.precisions: the cpu backend has no"),
        (BASE + "evaluate: {tasks: [trivia]}\n", r"unknown task 'trivia'"),
        (BASE.replace("requests: 4", "requests: 4\n  bogus: 1"), r"recipe.yaml:8: unknown key 'bogus' in sweep"),
        (BASE + "distill: {loss: logit+hidden}\n", r"teacher_cache serves the logit loss only"),
        (BASE + "report: {batch_size: 32}\n", r"report.batch_size 32 is not one of sweep.batch_sizes"),
        (BASE.replace("name: job", "name: My Job"), r"recipe name 'My Job'"),
        ("students: {}\n", r"recipe.yaml: the recipe needs name"),
        (
            BASE + "generate: {tokens: 20000}\ndistill: {tokens: 40960, data: 'python-docs:1,generated:1'}\n",
            r"recipe.yaml:8: generate.tokens 20,000 is too few: training reads 20,480 tokens of `generated` "
            r"\(50% of 40,960\) and its train split holds ~17,000; give generate.tokens >= 24,095",
        ),
        (BASE + "distill: {data: generated}\n", r"distill.data names `generated`, but generate.tokens is 0"),
        (BASE + "generate: {tokens: 4096}\n", r"generate.tokens is set, but distill.data does not name `generated`"),
    ],
)
def test_bad_recipes_are_refused_with_the_key_and_its_line(tmp_path, text, message):
    with pytest.raises(CompactLMError, match=message):
        load_job_recipe(write(tmp_path, text))


def test_budgets_and_overrides_are_checked_too(tmp_path):
    path = write(tmp_path, BASE + "budgets:\n  big:\n    distill: {tokenz: 5}\n")
    assert load_job_recipe(path).distill.tokens == 24576  # the base is fine
    with pytest.raises(CompactLMError, match=r"recipe.yaml:10: unknown key 'tokenz' in distill"):
        load_job_recipe(path, budget="big")
    with pytest.raises(CompactLMError, match="has no budget 'huge'; it has: small, big"):
        load_job_recipe(path, budget="huge")
    with pytest.raises(CompactLMError, match=r"--set distill.lr=fast: distill.lr must be a number"):
        load_job_recipe(path, overrides=["distill.lr=fast"])
    with pytest.raises(CompactLMError, match="write it as section.key=value"):
        load_job_recipe(path, overrides=["distill.lr"])
