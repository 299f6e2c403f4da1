"""Integration: the BIG-bench tasks pulled for real (once, into the real cache) and SmolLM2-135M above chance.

Measured (cloze prompts, log-likelihood / choice characters, lm-eval's acc_norm): see the README's task table.
The margins asserted below leave room for a few examples to flip on another CPU, and fail if scoring degrades to
guessing.
"""

from __future__ import annotations

import json

import pytest

from compactlm.compress.checkpoint import load_model, load_tokenizer
from compactlm.compress.models import pull
from compactlm.compress.tasks import TASKS, load_task, multiple_choice_accuracy, parse_task, pull_tasks, task_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    path = pull("smollm2-135m")
    return load_model(path), load_tokenizer(path)


def test_every_registered_task_is_cached_and_multiple_choice():
    folder = pull_tasks()  # downloads bigbench==1.0.0 only if the cache lacks a task (~35 s once)
    assert all(task_file(name).parent == folder and task_file(name).is_file() for name in TASKS)
    for name in TASKS:
        examples = parse_task(json.loads(task_file(name).read_text()))
        assert len(examples) >= 40, name
        assert all(len(x.choices) >= 2 and x.correct for x in examples)
    assert len(load_task("general_knowledge")) == 70
    assert len(load_task("social_iqa", limit=100)) == 100


@pytest.mark.parametrize(("task", "limit", "margin"), [("general_knowledge", None, 0.10), ("social_iqa", 100, 0.06)])
def test_smollm2_beats_chance(task, limit, margin, smollm2):
    model, tokenizer = smollm2
    result = multiple_choice_accuracy(model, tokenizer, load_task(task, limit))
    assert result.accuracy >= result.chance + margin, (task, result.accuracy, result.chance)


def test_lm_eval_and_compactlms_scorer_agree_on_smollm2(smollm2, tmp_path):
    """The same log-likelihoods, so the same pick on every example (README: measured on 4 tasks x 100)."""
    pytest.importorskip("lm_eval")
    from compactlm.compress import harness

    model, tokenizer = smollm2
    mapping = harness.write_tasks(["social_iqa"], 30, tmp_path)
    result = harness.evaluate(model, tokenizer, mapping, harness.task_manager(tmp_path))["social_iqa"]
    examples = load_task("social_iqa", 30)
    ours = multiple_choice_accuracy(model, tokenizer, examples)
    for theirs, mine in zip(result.loglikelihoods, ours.loglikelihoods, strict=True):
        assert theirs == pytest.approx(mine, abs=1e-3)
    assert result.hits_norm == tuple(float(p in e.correct) for p, e in zip(ours.predictions, examples, strict=True))
