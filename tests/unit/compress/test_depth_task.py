"""Depth importance by task accuracy (`--depth-metric task:NAME`): the replayed removal accuracies equal those of
the model with the block really skipped, the choice, the held-apart examples, and the error paths."""

from __future__ import annotations

import json

import pytest
import torch

from compactlm.compress.depth import choose_layers_to_drop, depth_task, skip_layers, task_removals
from compactlm.compress.importance import ImportanceConfig, ImportanceScores, estimate_importance, random_scores
from compactlm.compress.prune import PruneTarget
from compactlm.compress.tasks import ChoiceExample, choice_batches, load_task, multiple_choice_accuracy, task_file
from compactlm.core.errors import CompactLMError
from tests.helpers import FAMILIES, CharTokenizer, random_tokens, tiny_model


def _examples(n: int = 12) -> list[ChoiceExample]:
    words = ("horse", "legs", "four", "two", "page", "text", "word", "next", "layer", "model")
    out = []
    for i in range(n):
        a, b, c = words[i % 10], words[(3 * i + 1) % 10], words[(7 * i + 2) % 10]
        choices = (f" {b}", f" {c} {a}", f" {a}") if i % 3 else (f" {b}", f" {c}")
        out.append(ChoiceExample(f"which word after {a} {i}?", choices, frozenset({i % len(choices)})))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_task_removals_equal_scoring_the_model_with_the_block_skipped(family):
    model = tiny_model(family, seed=3)
    tokenizer, examples = CharTokenizer(), _examples()
    before = list(model.model.layers)
    batches = choice_batches(model, tokenizer, examples, batch_size=5)  # several batches, rows split across them
    base, table = task_removals(model, examples, batches, block_sizes=(1, 2, 4))
    full = multiple_choice_accuracy(model, tokenizer, examples)
    assert base[0] == full.accuracy and base[1] == pytest.approx(full.margin, abs=1e-6)  # batching: fp32 noise
    assert {k: tuple(v.shape) for k, v in table.items()} == {1: (4, 2), 2: (3, 2), 4: (1, 2)}
    for k, scores in table.items():
        for start in range(4 - k + 1):
            with skip_layers(model, range(start, start + k)):
                naive = multiple_choice_accuracy(model, tokenizer, examples, batch_size=7)
            assert float(scores[start, 0]) == pytest.approx(naive.accuracy, abs=1e-9), (k, start)
            assert float(scores[start, 1]) == pytest.approx(naive.margin, abs=1e-6), (k, start)
    assert list(model.model.layers) == before


def test_the_margin_is_the_best_right_score_minus_the_best_wrong_one():
    from tests.unit.compress.test_tasks import ScriptedTokenizer, _bigram

    # After the prompt token 1: " yes" (2) -0.5, " no" (3) -1.5; scored per character: -0.5 / 4, -1.5 / 3.
    model = _bigram({1: {2: -0.5, 3: -1.5}})
    tokenizer = ScriptedTokenizer({"Q": [1], " yes": [2], " no": [3]})
    right = ChoiceExample("Q", (" no", " yes"), frozenset({1}))
    wrong = ChoiceExample("Q", (" no", " yes"), frozenset({0}))
    result = multiple_choice_accuracy(model, tokenizer, [right, wrong])
    assert result.accuracy == 0.5
    assert result.margin == pytest.approx(((-0.125 + 0.5) + (-0.5 + 0.125)) / 2, abs=1e-5)  # one sure, one surely wrong
    assert multiple_choice_accuracy(model, tokenizer, [right]).margin == pytest.approx(0.375, abs=1e-5)


def _scores_with_task(accuracy: list[float], margin: list[float], k: int = 2) -> ImportanceScores:
    scores = random_scores(tiny_model("llama").config, block_sizes=(1, k))
    scores.task_removal = {"winowhy": {k: torch.tensor([accuracy, margin]).T.contiguous()}}
    return scores


def test_the_task_metric_drops_the_block_that_keeps_accuracy_highest_ties_broken_by_margin():
    scores = _scores_with_task([0.50, 0.75, 0.75], [0.10, 0.02, 0.05])
    assert choose_layers_to_drop(scores, 2, "task:winowhy") == [2, 3]  # 0.75 twice: the larger margin wins
    scores = _scores_with_task([0.80, 0.75, 0.75], [0.00, 0.50, 0.50])
    assert choose_layers_to_drop(scores, 2, "task:winowhy") == [0, 1]  # accuracy first, margin only on a tie
    assert choose_layers_to_drop(scores, 0, "task:winowhy") == []


def test_the_task_metric_names_what_is_missing_and_what_exists():
    scores = _scores_with_task([0.5, 0.6, 0.7], [0, 0, 0])
    with pytest.raises(CompactLMError, match="no winowhy accuracy for blocks of 3 layer.*--depth-task winowhy"):
        choose_layers_to_drop(scores, 3, "task:winowhy")
    with pytest.raises(CompactLMError, match="no social_iqa accuracy for blocks of 2"):
        choose_layers_to_drop(scores, 2, "task:social_iqa")
    with pytest.raises(CompactLMError, match="unknown task 'hellaswag'; known tasks: all, winowhy"):
        depth_task("task:hellaswag")
    with pytest.raises(CompactLMError, match="takes one task"):
        depth_task("task:all")
    with pytest.raises(CompactLMError, match="or task:NAME"):
        depth_task("accuracy")
    assert depth_task("block-loss") is None and depth_task("task:social_iqa") == "social_iqa"
    with pytest.raises(CompactLMError, match="--depth-metric: unknown task 'nope'") as info:
        PruneTarget(num_layers=2, depth_metric="task:nope")
    assert info.value.key == "depth_metric"


def _cache_task(name: str, n: int) -> None:
    data = {
        "examples": [
            {"input": f"is {i} even", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(n)
        ]
    }
    task_file(name).parent.mkdir(parents=True, exist_ok=True)
    task_file(name).write_text(json.dumps(data))


def test_the_chosen_examples_are_the_tasks_last_disjoint_from_the_evaluations_first():
    _cache_task("winowhy", 40)
    head, tail = load_task("winowhy", 25), load_task("winowhy", 15, tail=True)
    assert len(head) == 25 and len(tail) == 15
    assert not {x.prompt for x in head} & {x.prompt for x in tail}  # 25 + 15 = 40: nothing in both
    assert {x.prompt for x in head} | {x.prompt for x in tail} == {x.prompt for x in load_task("winowhy")}
    assert load_task("winowhy", 15, tail=True) == tail  # fixed
    assert len(load_task("winowhy", 99, tail=True)) == 40


def test_importance_scores_keep_task_removals_through_a_file(tmp_path):
    _cache_task("winowhy", 30)
    model = tiny_model("qwen2", seed=1)
    config = ImportanceConfig(block_sizes=(1, 3), depth_tasks=("winowhy",), task_samples=10, removal_loss=False)
    scores = estimate_importance(model, random_tokens(4, 16), config, tokenizer=CharTokenizer())
    assert set(scores.task_removal) == {"winowhy"} and set(scores.task_removal["winowhy"]) == {1, 3}
    base = scores.meta["task_base"]["winowhy"]
    assert base["examples"] == 10 and 0 <= base["accuracy"] <= 1 and base["chance"] == 0.5  # two choices each
    loaded = ImportanceScores.load(scores.save(tmp_path / "scores.safetensors"))
    for k in (1, 3):
        assert torch.equal(loaded.task_removal["winowhy"][k], scores.task_removal["winowhy"][k])
    assert loaded.meta["task_base"] == scores.meta["task_base"]
    assert choose_layers_to_drop(loaded, 3, "task:winowhy") == choose_layers_to_drop(scores, 3, "task:winowhy")
    with pytest.raises(CompactLMError, match="needs the model's tokenizer"):
        estimate_importance(model, random_tokens(2, 8), config)
    with pytest.raises(CompactLMError, match="unknown task 'nope'"):
        ImportanceConfig(depth_tasks=("nope",))


def test_prune_by_task_drops_the_block_the_importance_file_says(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from compactlm.compress.checkpoint import load_model
    from tests.helpers import cli, english_docs, save_word_tokenizer, write_jsonl

    texts = english_docs(60, words_per_doc=30)
    save_word_tokenizer(tiny_dir, texts)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    _cache_task("winowhy", 40)
    data = ["--data", str(tmp_path / "docs.jsonl"), "--samples", "2", "--seq-len", "8", "--task-samples", "12"]
    scores_file = tmp_path / "scores.safetensors"
    importance = ["compress", "importance", str(tiny_dir), "--out", str(scores_file), "--block-sizes", "1,2"]
    result = cli(*importance, "--depth-task", "winowhy", *data)
    assert result.exit_code == 0, result.output
    assert "task:winowhy" in result.output and "the block each metric would drop" in result.output
    assert "(chance" in result.output and "0.500)" in result.output  # the table wraps at 80 columns
    assert "winowhy acc" in result.output  # single layers too
    scores = ImportanceScores.load(scores_file)
    want = choose_layers_to_drop(scores, 2, "task:winowhy")
    out = tmp_path / "student"
    by_task = ["--depth-metric", "task:winowhy"]
    result = cli("compress", "prune", str(tiny_dir), str(out), "--num-layers", "2", *by_task, *data)  # scores now
    assert result.exit_code == 0, result.output
    step = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert step["dropped_layers"] == want and step["target"]["depth_metric"] == "task:winowhy"
    assert load_model(out).config.num_hidden_layers == 2
    assert load_file(out / step["kept_indices"])["layers"].tolist() == [i for i in range(4) if i not in want]
    result = cli("compress", "prune", str(tiny_dir), str(tmp_path / "other"), "--num-layers", "1", *by_task,
                 "--scores", str(scores_file))  # fmt: skip
    assert result.exit_code != 0 and "no winowhy accuracy for blocks of 3" in str(result.exception)
    assert not (tmp_path / "other").exists()
    result = cli(
        "compress", "prune", str(tiny_dir), str(tmp_path / "rand"), "--num-layers", "2", *by_task, "--random-seed", "1"
    )  # fmt: skip  (the random baseline works with it too)
    assert result.exit_code == 0, result.output
