"""Integration: the BIG-bench tasks pulled for real (once, into the real cache) and SmolLM2-135M above chance.

Measured (cloze prompts, mean log-prob per choice token): general_knowledge 0.33 on all 70 examples (chance
0.14), social_iqa 0.48 on the fixed 100-example subset (chance 0.34). The margins asserted below leave room for
a few examples to flip on another CPU, and fail if scoring degrades to guessing.
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
