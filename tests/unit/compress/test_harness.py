"""`compress eval --harness lm-eval`: lm-evaluation-harness in process on the bundled tasks, written as local lm-eval
tasks. Its log-likelihoods equal compactlm's scorer's, so both pick the same choice on the same examples (acc_norm);
bad input is one line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from compactlm.cli import app
from compactlm.compress import harness
from compactlm.compress.checkpoint import load_model, load_tokenizer
from compactlm.compress.tasks import load_task, multiple_choice_accuracy, task_file
from compactlm.core.errors import CompactLMError
from tests.helpers import english_docs, save_word_tokenizer, write_jsonl

pytest.importorskip("lm_eval")

TASK = {
    "examples": [
        {"input": f"is {word} a word number {i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2, "maybe so": 0}}
        for i, word in enumerate(["the", "model", "reads", "text", "and", "writes", "more", "words", "here", "now"])
    ]
    + [{"input": "two right answers", "target_scores": {"this": 1, "that": 1, "neither one": 0}}]
}


@pytest.fixture
def scored(tiny_dir, tmp_path):
    save_word_tokenizer(tiny_dir, english_docs(80, words_per_doc=30))
    task_file("winowhy").parent.mkdir(parents=True, exist_ok=True)
    task_file("winowhy").write_text(json.dumps(TASK))
    return load_model(tiny_dir), load_tokenizer(tiny_dir)


def test_lm_eval_sees_the_same_loglikelihoods_and_picks_the_same_choices(scored, tmp_path):
    model, tokenizer = scored
    mapping = harness.write_tasks(["winowhy"], None, tmp_path / "tasks")
    assert mapping == {"winowhy": "bigbench_winowhy"}
    manager = harness.task_manager(tmp_path / "tasks")
    result = harness.evaluate(model, tokenizer, mapping, manager)["winowhy"]
    examples = load_task("winowhy")
    ours = multiple_choice_accuracy(model, tokenizer, examples)
    assert result.examples == ours.examples == len(TASK["examples"])
    for theirs, mine in zip(result.loglikelihoods, ours.loglikelihoods, strict=True):
        assert theirs == pytest.approx(mine, abs=1e-4)
    # the same scores -> the same picks: acc_norm (/ characters) and acc (sums) both agree, per example
    assert result.acc_norm == ours.accuracy and result.accuracy == ours.accuracy
    assert result.acc == multiple_choice_accuracy(model, tokenizer, examples, normalize="none").accuracy
    assert result.chance == pytest.approx(ours.chance)  # the two-answer example counts both as right
    assert result.hits_norm == tuple(float(p in e.correct) for p, e in zip(ours.predictions, examples, strict=True))


def test_the_eval_command_runs_lm_eval_and_refuses_unknown_tasks(scored, tiny_dir, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "docs.jsonl", english_docs(80, words_per_doc=30))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.csv"
    base = ["compress", "eval", str(tiny_dir), "--data", "docs.jsonl", "--samples", "2", "--seq-len", "8"]
    result = CliRunner().invoke(app, [*base, "--tasks", "winowhy", "--harness", "lm-eval", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert frame["n_winowhy"].tolist() == [len(TASK["examples"])] and frame["seconds_tasks"].iloc[0] > 0
    assert 0 <= frame["acc_winowhy"].iloc[0] <= 1 and "lm-evaluation-harness" in result.output

    unknown = CliRunner().invoke(
        app, [*base, "--tasks", "winowhy,nosuch_task", "--harness", "lm-eval", "--out", "x.csv"]
    )
    assert isinstance(unknown.exception, CompactLMError)
    assert "unknown task 'nosuch_task': bundled (offline) tasks are winowhy" in str(unknown.exception)
    assert not (tmp_path / "x.csv").exists()
    fewshot = CliRunner().invoke(app, [*base, "--tasks", "winowhy", "--num-fewshot", "2"])
    assert "--num-fewshot is lm-eval's" in str(fewshot.exception)


def test_an_lm_eval_task_that_needs_a_download_says_which_offline(scored, tmp_path, monkeypatch):
    model, tokenizer = scored
    monkeypatch.delenv("COMPACTLM_LM_EVAL_ONLINE", raising=False)
    mapping = harness.write_tasks(["arc_easy"], 5, tmp_path / "tasks")
    manager = harness.task_manager(tmp_path / "tasks")
    harness.check_tasks(mapping, manager)  # lm-eval knows it
    with pytest.raises(CompactLMError, match="lm-eval could not load the data of arc_easy .offline here") as error:
        harness.evaluate(model, tokenizer, mapping, manager, limit=5)
    assert "\n" not in str(error.value)


def test_a_model_lm_eval_cannot_take_is_one_line(scored, tmp_path):
    from tests.helpers import CharTokenizer

    model, _ = scored
    mapping = harness.write_tasks(["winowhy"], 5, tmp_path / "tasks")
    manager = harness.task_manager(tmp_path / "tasks")
    with pytest.raises(CompactLMError, match="lm-eval cannot evaluate .*tiny: AssertionError") as error:
        harness.evaluate(model, CharTokenizer(), mapping, manager, limit=5)  # not a Hugging Face tokenizer
    assert "\n" not in str(error.value)
