"""Multiple-choice tasks: parsing BIG-bench JSON, the fixed subset, chance, the scoring rule, the cache (offline)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compactlm.cli.root import app
from compactlm.compress import tasks
from compactlm.compress.tasks import (
    TASKS,
    ChoiceExample,
    load_task,
    multiple_choice_accuracy,
    parse_task,
    pull_tasks,
    resolve_task_names,
    task_file,
)
from compactlm.core.errors import CompactLMError
from tests.helpers import CharTokenizer, english_docs, save_word_tokenizer, tiny_model, write_jsonl

TASK = {
    "name": "fake",
    "task_prefix": "Answer.\n",
    "append_choices_to_input": True,
    "examples": [
        {"input": "How many legs do horses have? ", "target_scores": {"two": 0, "four": 1, "six": 0}},
        {"input": "Pick the even ones.", "target_scores": {"1": 0, "2": 1, "3": 0, "4": 1}},
        {"input": "No choices here.", "target": "x"},
        {"input": "Nothing is better.", "target_scores": {"a": 0, "b": 0}},
    ],
}


def _numbered_task(n: int) -> dict:
    return {
        "examples": [
            {"input": f"question {i}", "target_scores": {"yes": int(i % 2), "no": 1 - i % 2}} for i in range(n)
        ]
    }


SHIPPED = tasks.BUNDLED


@pytest.fixture(autouse=True)
def no_bundled_copy(monkeypatch, tmp_path):
    """The download path's tests run as on an install without the bundled task files."""
    monkeypatch.setattr(tasks, "BUNDLED", tmp_path / "no-bundled-copy.tar.xz")


def test_the_bundled_copy_fills_the_cache_without_a_download(monkeypatch, no_download):
    """PyPI no longer lists bigbench 1.0.0: the task files shipped with compactlm fill the cache, all of them, each
    a task that parses to multiple-choice examples."""
    monkeypatch.setattr(tasks, "BUNDLED", SHIPPED)
    folder = pull_tasks(["winowhy"])
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(f"{n}.json" for n in TASKS)
    assert "bundled" in (folder / ".compactlm-pulled").read_text()
    for name in TASKS:
        assert len(tasks.parse_task(json.loads(task_file(name).read_text()))) >= 40, name


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to run pip or reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def _cache(name: str, data: dict) -> None:
    task_file(name).parent.mkdir(parents=True, exist_ok=True)
    task_file(name).write_text(json.dumps(data))


def test_parse_task_builds_cloze_prompts_and_correct_sets():
    examples = parse_task(TASK)
    assert len(examples) == 2  # no target_scores, or no choice better than another: skipped
    horses, even = examples
    assert horses.prompt == "Answer.\n\nQ: How many legs do horses have?\nA:"  # BIG-bench's default prefixes
    assert horses.choices == (" two", " four", " six")  # the prompt's trailing space starts each choice
    assert horses.correct == {1}
    assert even.correct == {1, 3} and even.chance == 0.5
    assert math.isclose(horses.chance, 1 / 3)


def test_parse_task_lists_choices_only_when_asked():
    listed = parse_task(TASK, list_choices=None)[0]  # the task says append_choices_to_input
    question, *choices = listed.prompt.removesuffix("\nA:").split("\n  choice: ")
    assert question == "Answer.\n\nQ: How many legs do horses have?"
    assert sorted(choices) == ["four", "six", "two"]
    assert parse_task(TASK, list_choices=None) == parse_task(TASK, list_choices=None)  # the listed order is fixed
    custom = dict(TASK, example_input_prefix="\nStatement: ", example_output_prefix="\nVerdict:\n")
    example = parse_task(custom)[0]
    assert example.prompt == "Answer.\n\nStatement: How many legs do horses have?\nVerdict:\n"
    assert example.choices[0] == "two"  # no trailing space to move


def test_task_names_are_validated():
    assert resolve_task_names("winowhy, social_iqa") == ["winowhy", "social_iqa"]
    assert resolve_task_names("all") == list(TASKS)
    assert resolve_task_names(None) == []
    assert {"winowhy", "social_iqa", "strategyqa", "general_knowledge"} <= set(TASKS)
    with pytest.raises(CompactLMError, match="unknown task 'hellaswag'; known tasks: all, winowhy"):
        resolve_task_names("winowhy,hellaswag")


def test_load_task_takes_a_fixed_seeded_subset_in_file_order(no_download):
    _cache("strategyqa", _numbered_task(40))
    ten = load_task("strategyqa", limit=10)
    assert ten == load_task("strategyqa", limit=10)
    numbers = [int(x.prompt.split()[2]) for x in ten]
    assert numbers == sorted(numbers) and numbers != list(range(10))  # shuffled pick, file order
    assert set(ten) <= set(load_task("strategyqa", limit=20))  # a larger limit extends a smaller one
    assert ten != load_task("strategyqa", limit=10, seed=1)
    assert len(load_task("strategyqa")) == len(load_task("strategyqa", limit=1000)) == 40
    with pytest.raises(CompactLMError, match="at least 1"):
        load_task("strategyqa", limit=0)


def _fake_sdist(path: Path, names) -> Path:
    raw = path.open("wb")
    with raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in [*names, "unregistered_task"]:
            data = json.dumps({"name": name, **_numbered_task(3)}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha256(names) -> str:
    """The digest of the fake sdist of `names`."""
    with tempfile.TemporaryDirectory() as tmp:
        return hashlib.sha256(_fake_sdist(Path(tmp) / "x.tar.gz", names).read_bytes()).hexdigest()


def test_pull_tasks_extracts_every_registered_task_once(tmp_path, no_download):
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", TASKS)
    folder = pull_tasks(["winowhy"], sdist_path=sdist)
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(f"{n}.json" for n in TASKS)
    assert not list(folder.glob(".*.tmp-*"))
    sdist.unlink()
    assert pull_tasks() == folder  # cached: nothing to read or download
    assert json.loads(task_file("general_knowledge").read_text())["name"] == "general_knowledge"


def test_pull_tasks_refuses_an_sdist_without_the_tasks(tmp_path, no_download):
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", ["winowhy"])
    with pytest.raises(CompactLMError, match="lacks the task files of"):
        pull_tasks(sdist_path=sdist)
    assert not task_file("winowhy").exists()  # nothing half-cached


def test_pip_failure_says_what_to_run(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=1, stdout="", stderr="No route"))
    with pytest.raises(CompactLMError, match=r"pip download --no-deps --no-binary :all: bigbench==1.0.0 -d DIR"):
        pull_tasks(["winowhy"])


def test_pip_failure_names_pips_error_not_its_last_progress_line(monkeypatch):
    chatter = "Collecting bigbench==1.0.0\n  Preparing metadata (pyproject.toml): finished with status 'done'"
    failed = SimpleNamespace(returncode=1, stdout=chatter, stderr="ERROR: [Errno 28] No space left on device")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(CompactLMError, match=r"\(ERROR: \[Errno 28\] No space left on device\)"):
        pull_tasks(["winowhy"])


def test_pip_refusing_the_sdist_retries_with_the_bundled_pip_of_a_fresh_venv(monkeypatch, tmp_path):
    refusal = "ERROR: Distributions from PyPI cannot declare direct URL dependencies.\nbigbench depends on bleurt @"
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            return SimpleNamespace(returncode=0, stdout="", stderr="")
        if cmd[0] == sys.executable:  # this environment's pip refuses
            return SimpleNamespace(returncode=1, stdout="", stderr=refusal)
        folder = Path(cmd[cmd.index("-d") + 1])  # the venv's pip saves the file
        _fake_sdist(folder / tasks.BIGBENCH.filename, TASKS)
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(tasks, "BIGBENCH", dataclasses.replace(tasks.BIGBENCH, sha256=_sha256(TASKS)))
    pull_tasks(["social_iqa"])
    assert all(task_file(n).is_file() for n in TASKS)
    assert calls[1][1:3] == ["-m", "venv"] and calls[2][0].endswith("venv/bin/python")


class BigramLM(nn.Module):
    """The logits at a position depend only on the token there: `table[token]` (log-probabilities)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


class ScriptedTokenizer:
    """Whole strings to fixed ids; no special tokens."""

    eos_token_id = 0

    def __init__(self, ids: dict[str, list[int]]):
        self.ids = ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(self.ids.get(text, [7]))}


def _bigram(next_logprobs: dict[int, dict[int, float]], vocab: int = 8) -> BigramLM:
    """Rows with the given next-token log-probabilities; the rest of each row's mass spread over other tokens."""
    table = torch.full((vocab, vocab), -30.0)
    for token, nexts in next_logprobs.items():
        rest = 1 - sum(math.exp(v) for v in nexts.values())
        others = [t for t in range(vocab) if t not in nexts]
        table[token, others] = math.log(rest / len(others))
        for nxt, logprob in nexts.items():
            table[token, nxt] = logprob
    return BigramLM(table)


def test_length_normalisation_picks_the_better_per_token_choice():
    # Prompt "Q" = [1]. Choice " A" = [2]: log p = -1.0. Choice " B C" = [3, 4]: -0.6 each, -1.2 in all.
    model = _bigram({1: {2: -1.0, 3: -0.6}, 3: {4: -0.6}})
    tokenizer = ScriptedTokenizer({"Q": [1], " A": [2], " B C": [3, 4]})
    rows = tasks._encode(tokenizer, [ChoiceExample("Q", (" A", " B C"), frozenset({1}))], limit=64)
    assert [r[2] for r in rows] == [[1, 2], [1, 3, 4]]
    scores = _mean_logprobs(model, rows)
    assert torch.allclose(scores, torch.tensor([-1.0, -0.6], dtype=torch.float64), atol=1e-5)
    example = [ChoiceExample("Q", (" A", " B C"), frozenset({1}))]
    by_tokens = multiple_choice_accuracy(model, tokenizer, example, normalize="tokens")
    assert by_tokens.predictions == (1,) and by_tokens.accuracy == 1.0
    assert multiple_choice_accuracy(model, tokenizer, example, normalize="none").predictions == (0,)  # -1.0 > -1.2
    by_chars = multiple_choice_accuracy(model, tokenizer, example)  # lm-eval's acc_norm: -1.0 / 2 < -1.2 / 4
    assert by_chars.predictions == (1,)
    assert by_chars.loglikelihoods[0] == pytest.approx((-1.0, -1.2), abs=1e-5)
    with pytest.raises(CompactLMError, match="normalize must be one of"):
        multiple_choice_accuracy(model, tokenizer, example, normalize="bytes")


def test_accuracy_and_chance_on_scripted_answers():
    # After the prompt token 1 the model prefers token 2 ("yes"), then 3 ("no"), then 4 ("maybe").
    model = _bigram({1: {2: -0.5, 3: -1.5, 4: -2.5}})
    tokenizer = ScriptedTokenizer({"Q": [1], " yes": [2], " no": [3], " maybe": [4]})
    examples = [
        ChoiceExample("Q", (" no", " yes"), frozenset({1})),  # right
        ChoiceExample("Q", (" no", " maybe", " yes"), frozenset({0})),  # wrong
        ChoiceExample("Q", (" yes", " no", " maybe", " no"), frozenset({0, 1})),  # right; two correct of four
    ]
    result = multiple_choice_accuracy(model, tokenizer, examples, batch_size=2)
    assert result.predictions == (1, 2, 0)
    assert math.isclose(result.accuracy, 2 / 3)
    assert math.isclose(result.chance, (1 / 2 + 1 / 3 + 2 / 4) / 3)
    assert result.examples == 3


class BosCharTokenizer(CharTokenizer):
    bos = 255

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([self.bos] if add_special_tokens else []) + ids}


def test_long_prompts_are_cut_from_the_left_keeping_bos():
    tokenizer = BosCharTokenizer()
    example = ChoiceExample("x" * 50 + "tail:", (" yes", " no"), frozenset({0}))
    rows = tasks._encode(tokenizer, [example], limit=16)
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    for _, c, ids, n_prompt in rows:
        assert len(ids) <= 16
        assert ids[0] == tokenizer.bos and ids[1:n_prompt] == prompt_ids[-(n_prompt - 1) :]
        assert ids[n_prompt:] == tokenizer(example.choices[c], add_special_tokens=False)["input_ids"]
    assert rows[0][3] == rows[1][3] == 16 - 4  # room for the longest choice (" yes")


def test_batched_padded_scores_equal_one_row_full_logits():
    """Right padding, the LM head on the scored positions only, and batching change nothing."""
    model = tiny_model("llama")
    tokenizer = CharTokenizer()
    examples = [
        ChoiceExample("the model reads", (" text", " a page of text"), frozenset({0})),
        ChoiceExample("which word comes", (" next", " first in line"), frozenset({0})),
    ]
    rows = tasks._encode(tokenizer, examples, limit=64)
    batched = _mean_logprobs(model, rows)
    for r, (_, _, ids, n_prompt) in enumerate(rows):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.isclose(batched[r], logprobs[n_prompt - 1 :].mean(), atol=1e-5)
    one = multiple_choice_accuracy(model, tokenizer, examples, batch_size=1)
    four = multiple_choice_accuracy(model, tokenizer, examples, batch_size=4)
    # the same answers; scores equal up to the last bits a batch shape changes in fp32 kernels (AVX2 CPUs: ~1e-8)
    assert (one.accuracy, one.chance, one.examples, one.predictions) == (
        four.accuracy,
        four.chance,
        four.examples,
        four.predictions,
    )
    assert one.margin == pytest.approx(four.margin, rel=1e-6, abs=1e-7)
    for a, b in zip(one.loglikelihoods, four.loglikelihoods, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_eval_command_adds_task_accuracy_and_a_chance_row(tiny_dir, tmp_path, no_download, monkeypatch):
    texts = english_docs(80, words_per_doc=30)
    save_word_tokenizer(tiny_dir, texts)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    _cache("general_knowledge", TASK)
    _cache("strategyqa", _numbered_task(30))
    monkeypatch.chdir(tmp_path)  # short names keep the table inside the runner's 80 columns
    out = tmp_path / "results.parquet"
    args = ["compress", "eval", "tiny", "tiny", "--data", "docs.jsonl", "--samples", "2", "--seq-len", "8"]
    args += ["--tasks", "general_knowledge,strategyqa", "--task-limit", "5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert len(frame) == 2
    assert {"acc_general_knowledge", "chance_strategyqa", "n_strategyqa", "perplexity"} <= set(frame.columns)
    assert frame["n_general_knowledge"].tolist() == [2, 2] and frame["n_strategyqa"].tolist() == [5, 5]
    assert frame["chance_strategyqa"].tolist() == [0.5, 0.5]
    assert frame["acc_strategyqa"].iloc[0] == frame["acc_strategyqa"].iloc[1]  # same model, same examples
    assert "chance" in result.output and "0.500" in result.output

    result = CliRunner().invoke(app, ["compress", "eval", str(tiny_dir), "--tasks", "winowhy,nope"])
    assert isinstance(result.exception, CompactLMError)
    assert "unknown task 'nope'" in str(result.exception)


def _mean_logprobs(model, rows) -> torch.Tensor:
    """Mean log-probability of each row's choice tokens, all rows in one right-padded batch."""
    sums, counts = tasks.logprob_sums(model, tasks._batch(rows, pad_id=0))
    return sums / counts
