"""Multiple-choice task accuracy on BIG-bench tasks, scored by length-normalised log-likelihood.

Source: the task.json files of the PyPI source package `bigbench==1.0.0` (Apache-2.0; 358 MB, of which the
registered tasks are ~3 MB). `pull_tasks` downloads it once with `pip download` (never installs it: it
requires TensorFlow), streams the tar and writes only the registered task files to
`$COMPACTLM_HOME/tasks/<name>.json`; the download is deleted. pip >= 26 downloads the file but refuses to save
it (its built metadata declares a `bleurt @ file://...` requirement); then the download is repeated with the
older pip that Python bundles, in a throwaway venv. The file is checked against its pinned SHA-256. To work
offline, point `COMPACTLM_BIGBENCH_SDIST` at a downloaded `bigbench-1.0.0.tar.gz`.

Prompt format (zero-shot, cloze style): `task_prefix + example_input_prefix + input + example_output_prefix`
with BIG-bench's defaults ("\\nQ: " before the input, "\\nA: " after it) where a task sets none; the input
is stripped of surrounding whitespace, the prompt of leading whitespace, and the prompt's trailing spaces move
to the front of every choice ("...\\nA:" + " four"), so a choice is tokenized as it would be in running text.
The choices are NOT listed in the prompt, whatever the task's `append_choices_to_input` says: a 135M model
scored at chance on general_knowledge with them listed (0.17 vs 0.14 on 60 examples) and well above it
without (0.28), as lm-evaluation-harness scores small models. `parse_task(data, list_choices=None)` follows
the task's own setting instead (each choice after `choice_prefix`, default "\\n  choice: ", in an order
shuffled per example, seeded by the example's position in the file).

Scoring: prompt and choice are tokenized separately and their ids concatenated, so the scored tokens are
exactly the choice's; a choice's log-likelihood is the sum of its tokens' log-probabilities given the prompt, and
its score that sum divided by the choice's length in characters: lm-evaluation-harness's `acc_norm`, so that the
fast scorer and `--harness lm-eval` pick the same choice on the same examples (both see the same log-likelihoods:
SmolLM2 on winowhy, max difference 1.4e-5 nats; tests/unit/compress/test_harness.py). `normalize="none"` is
lm-eval's `acc`; `"tokens"` (the mean per token) was compactlm's scorer before. The highest score is the
prediction (the first one on a tie). Correct choices are those with the highest `target_scores`; chance is the
mean over examples of (correct choices / choices), the expected accuracy of a uniform random pick. Prompts are cut
from the left so that prompt + choice fits `MAX_TOKENS` (and the model's context); any BOS token the tokenizer
adds is kept.

Subset: `load_task(name, limit, seed)` takes the first `limit` examples of the task's examples shuffled with
`random.Random(seed)`, returned in file order: fixed for a seed, and a larger limit extends a smaller one.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactlm.compress.models import compactlm_home
from compactlm.core import sdist
from compactlm.core.errors import CompactLMError

NORMALIZATIONS = ("chars", "none", "tokens")
MAX_TOKENS = 1024
"""Longest prompt + choice scored, in tokens (prompts are cut from the left beyond it)."""

# Task names mapped to their task.json inside the sdist (below its top folder `bigbench-1.0.0/`): multiple-choice
# tasks (`target_scores`) in one file each, chosen for being answerable by small models.
TASKS: dict[str, str] = {
    name: f"bigbench/benchmark_tasks/{name}/task.json"
    for name in (
        "winowhy",
        "social_iqa",
        "strategyqa",
        "general_knowledge",
        "causal_judgment",
        "date_understanding",
        "emoji_movie",
        "implicatures",
        "physical_intuition",
        "riddle_sense",
        "sports_understanding",
    )
}


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question: a prompt, the continuations scored after it, and which are right."""

    prompt: str
    choices: tuple[str, ...]
    """Continuations of the prompt, each with its separating space (" four")."""
    correct: frozenset[int]

    @property
    def chance(self) -> float:
        return len(self.correct) / len(self.choices)


@dataclass(frozen=True)
class ChoiceAccuracy:
    accuracy: float
    chance: float
    """Expected accuracy of a uniform random pick on the same examples."""
    examples: int
    predictions: tuple[int, ...]
    loglikelihoods: tuple[tuple[float, ...], ...] = ()
    """Per example, the summed log-probability of each choice's tokens (lm-eval's `resps`)."""
    margin: float = 0.0
    """Mean over examples of (best correct choice's score - best wrong choice's score): above 0 where the model
    answers right, and how surely; breaks ties between candidates of equal accuracy (depth by task accuracy)."""


def resolve_task_names(names: str | Iterable[str] | None) -> list[str]:
    """Task names from a list or a comma-separated string (`all`: every registered task); unknown names refused."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if "all" in names:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise CompactLMError(f"unknown task {', '.join(map(repr, unknown))}; known tasks: all, {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def tasks_dir() -> Path:
    return compactlm_home() / "tasks"


def task_file(name: str) -> Path:
    return tasks_dir() / f"{name}.json"


BIGBENCH = sdist.Sdist(
    spec="bigbench==1.0.0",
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    size="358 MB",
    env="COMPACTLM_BIGBENCH_SDIST",
)


BUNDLED = Path(__file__).with_name("bigbench-tasks.tar.xz")
"""The registered tasks' files as extracted from bigbench-1.0.0.tar.gz (Apache-2.0), shipped with compactlm: PyPI
stopped listing bigbench 1.0.0 in December 2026, so a fresh machine can no longer download it."""


def _unpack_bundled() -> Path:
    import tarfile

    with tarfile.open(BUNDLED, "r:xz") as archive:
        files = {}
        for member in archive.getmembers():
            name = member.name.removesuffix(".json")
            if member.isfile() and name in TASKS and "/" not in member.name:
                files[member.name] = archive.extractfile(member).read()
    missing = sorted(set(TASKS) - {n.removesuffix(".json") for n in files})
    if missing:
        raise CompactLMError(f"{BUNDLED} lacks the task files of {', '.join(missing)}; reinstall compactlm")
    sdist.write_atomically(tasks_dir(), files)
    (tasks_dir() / ".compactlm-pulled").write_text(
        f"{BIGBENCH.spec} ({BIGBENCH.filename}), the copy bundled with compactlm\nlicense: Apache-2.0\n"
        f"pulled: {time.strftime('%Y-%m-%d')}\n"
    )
    return tasks_dir()


def pull_tasks(names: Iterable[str] | None = None, sdist_path: str | os.PathLike | None = None) -> Path:
    """Cache the task files once: every registered task is extracted from one download; returns the cache folder.

    `names` (default: all) only decides whether anything is missing. `sdist_path` (or `$COMPACTLM_BIGBENCH_SDIST`)
    is a local `bigbench-1.0.0.tar.gz` to read instead of downloading.
    """
    names = resolve_task_names(list(names) if names is not None else ["all"])
    if all(task_file(n).is_file() for n in names):
        return tasks_dir()
    if sdist_path is None and not os.environ.get(BIGBENCH.env) and BUNDLED.is_file():
        return _unpack_bundled()
    from compactlm.core.console import download_progress

    with download_progress() as progress, tempfile.TemporaryDirectory(prefix="compactlm-bigbench-") as tmp:
        path = sdist.fetch(BIGBENCH, Path(tmp), progress, local=sdist_path)
        wanted = {path_in_sdist: name for name, path_in_sdist in TASKS.items()}
        found = sdist.members(path, wanted, progress, f"extracting {len(wanted)} task files")
        missing = sorted(set(TASKS) - {wanted[inner] for inner in found})
        if missing:
            raise CompactLMError(f"{path} lacks the task files of {', '.join(missing)}: is it {BIGBENCH.filename}?")
        sdist.write_atomically(tasks_dir(), {f"{wanted[inner]}.json": data for inner, data in found.items()})
    (tasks_dir() / ".compactlm-pulled").write_text(
        f"{BIGBENCH.spec} ({BIGBENCH.filename})\nlicense: Apache-2.0\npulled: {time.strftime('%Y-%m-%d')}\n"
    )
    return tasks_dir()


def parse_task(data: dict, list_choices: bool | None = False) -> list[ChoiceExample]:
    """The multiple-choice examples of a BIG-bench JSON task (examples without `target_scores` are skipped).

    `list_choices`: also list the choices in the prompt (None: as the task's `append_choices_to_input` says).
    """
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    if list_choices is None:
        list_choices = data.get("append_choices_to_input", True)
    examples = []
    for index, example in enumerate(data.get("examples", [])):
        scores = example.get("target_scores")
        if not scores:
            continue
        choices, values = list(scores), [float(v) for v in scores.values()]
        if len(choices) < 2 or max(values) <= min(values):
            continue  # no choice is better than another: nothing to grade
        text = str(example["input"]).strip()
        if list_choices:
            listed = sorted(choices)
            random.Random(index).shuffle(listed)
            text += choice_prefix + choice_prefix.join(listed)
        prompt = (task_prefix + input_prefix + text + output_prefix).lstrip()
        stripped = prompt.rstrip(" ")
        separator = prompt[len(stripped) :]
        correct = frozenset(i for i, v in enumerate(values) if v == max(values))
        examples.append(ChoiceExample(stripped, tuple(separator + c for c in choices), correct))
    return examples


def load_task(name: str, limit: int | None = None, seed: int = 0, tail: bool = False) -> list[ChoiceExample]:
    """A fixed subset of a registered task: the first `limit` of its examples shuffled with `seed`, in file order.

    `tail`: the last `limit` of that order instead, disjoint from every evaluation subset (the first ones) while
    the two limits together do not exceed the task's size: depth importance by task accuracy chooses on these,
    so that the evaluation does not grade the model on the examples its layers were chosen by."""
    (name,) = resolve_task_names([name])
    pull_tasks([name])
    try:
        examples = parse_task(json.loads(task_file(name).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CompactLMError(
            f"{task_file(name)} is not a valid BIG-bench task ({exc}): delete it to pull again"
        ) from exc
    if not examples:
        raise CompactLMError(f"task {name} has no multiple-choice examples")
    if limit is not None and limit < 1:
        raise CompactLMError(f"the task example limit must be at least 1, not {limit}")
    if limit is None or limit >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[-limit:] if tail else order[:limit])]


def task_size(name: str) -> int:
    """How many multiple-choice examples a registered task has (pulls the tasks once)."""
    return len(load_task(name))


def _special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (a BOS token), found by tokenizing with and without them."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def _choice_logits(model, input_ids, attention_mask, rows, cols):
    """Logits at the given (row, position) pairs only: the LM head runs on the scored positions, not on all."""
    base = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is model or head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows, cols]
    # The supported families (Llama, Mistral, Qwen2/3) compute logits as lm_head(final hidden states), unscaled.
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head(hidden[rows, cols])


def _encode(tokenizer, examples: Sequence[ChoiceExample], limit: int) -> list[tuple[int, int, list[int], int]]:
    """One (example, choice, prompt + choice ids, prompt length) row per choice; prompts cut from the left."""
    bos = _special_prefix(tokenizer)
    rows = []
    for e, example in enumerate(examples):
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        choices = [tokenizer(c, add_special_tokens=False)["input_ids"][: limit - len(bos) - 1] for c in example.choices]
        keep = limit - len(bos) - max(len(c) for c in choices)
        prompt = bos + prompt[max(0, len(prompt) - keep) :]
        if not prompt:  # the first choice token needs something to be predicted from
            prompt = [tokenizer.eos_token_id or 0]
        rows += [(e, c, prompt + ids, len(prompt)) for c, ids in enumerate(choices)]
    return rows


@dataclass(frozen=True)
class ChoiceBatch:
    """Prompt + choice rows, right-padded into one forward: which positions are scored, and against which tokens."""

    keys: tuple[tuple[int, int], ...]
    """(example, choice) of each row."""
    input_ids: Any
    attention_mask: Any
    rows: Any
    """Row of each scored position."""
    cols: Any
    """Position whose logits predict each scored token."""
    targets: Any


def _batch(rows: Sequence[tuple[int, int, list[int], int]], pad_id: int) -> ChoiceBatch:
    import torch

    width = max(len(ids) for _, _, ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    row_idx, col_idx, targets = [], [], []
    for b, (_, _, ids, n_prompt) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        row_idx += [b] * (len(ids) - n_prompt)
        col_idx += range(n_prompt - 1, len(ids) - 1)  # the logits at i predict the token at i + 1
        targets += ids[n_prompt:]
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    keys = tuple((e, c) for e, c, _, _ in rows)
    return ChoiceBatch(keys, input_ids, mask, as_long(row_idx), as_long(col_idx), as_long(targets))


def choice_batches(
    model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 16, max_tokens: int = MAX_TOKENS
) -> list[ChoiceBatch]:
    """Every prompt + choice as one row, rows sorted by length (little padding), `batch_size` rows a batch.

    Built once, the same batches can be scored by many variants of `model` (compactlm.compress.depth replays
    the layers before a removed block from the base forward of the very same batch)."""
    if not examples:
        raise CompactLMError("no examples to score")
    limit = min(max_tokens, getattr(model.config, "max_position_embeddings", None) or max_tokens)
    rows = _encode(tokenizer, examples, limit)
    rows.sort(key=lambda row: -len(row[2]))
    pad_id = tokenizer.eos_token_id or 0  # padded positions are masked and never scored
    return [_batch(rows[start : start + batch_size], pad_id) for start in range(0, len(rows), batch_size)]


def logprob_sums(model, batch: ChoiceBatch):
    """(summed log-probability, token count) of each row's choice tokens, float64, in one forward."""
    import torch

    sums = torch.zeros(len(batch.keys), dtype=torch.float64)
    counts = torch.zeros(len(batch.keys), dtype=torch.float64)
    if batch.targets.numel():
        logits = _choice_logits(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols).double()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, batch.targets[:, None])[:, 0]
        sums.index_add_(0, batch.rows, logprobs)
        counts.index_add_(0, batch.rows, torch.ones_like(logprobs))
    return sums, counts


def grade(
    examples: Sequence[ChoiceExample], batches: Sequence[ChoiceBatch], results: Sequence, normalize: str = "chars"
) -> ChoiceAccuracy:
    """Accuracy from every batch's `logprob_sums`: each example's prediction is its best-scoring choice."""
    import torch

    _check_normalize(normalize)
    scores = torch.full((len(examples), max(len(x.choices) for x in examples)), -torch.inf, dtype=torch.float64)
    sums = [[0.0] * len(x.choices) for x in examples]
    for batch, (total, counts) in zip(batches, results, strict=True):
        for (e, c), ll, n in zip(batch.keys, total.tolist(), counts.tolist(), strict=True):
            sums[e][c] = ll
            length = {"chars": len(examples[e].choices[c]), "tokens": n, "none": 1}[normalize]
            scores[e, c] = ll / length if n and length else -torch.inf  # an empty choice never wins
    predictions = tuple(int(i) for i in scores.argmax(dim=1))  # the first maximum on a tie
    hits = sum(p in x.correct for p, x in zip(predictions, examples, strict=True))
    margins = []  # best right choice's score minus best wrong one's: how surely each example is answered
    for x, row in zip(examples, scores.tolist(), strict=True):
        wrong = [v for i, v in enumerate(row[: len(x.choices)]) if i not in x.correct]
        right = max(row[i] for i in x.correct)
        margins.append(right - max(wrong) if wrong and math.isfinite(right) and math.isfinite(max(wrong)) else 0.0)
    return ChoiceAccuracy(
        accuracy=hits / len(examples),
        chance=sum(x.chance for x in examples) / len(examples),
        examples=len(examples),
        predictions=predictions,
        loglikelihoods=tuple(tuple(row) for row in sums),
        margin=sum(margins) / len(margins),
    )


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise CompactLMError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")


def multiple_choice_accuracy(
    model,
    tokenizer,
    examples: Sequence[ChoiceExample],
    batch_size: int = 16,
    max_tokens: int = MAX_TOKENS,
    progress: Callable[[int, int], None] | None = None,
    normalize: str = "chars",
) -> ChoiceAccuracy:
    """Accuracy of `model` picking, for each example, the choice with the best score: its summed log-probability
    divided by its length in characters (`normalize="chars"`, lm-evaluation-harness's acc_norm; the default),
    not divided (`"none"`, lm-eval's acc), or by its token count (`"tokens"`, compactlm's scorer before it was
    matched to lm-eval).

    Every prompt + choice is one row; rows are sorted by length and run `batch_size` at a time, right-padded.
    `progress(done, total)` is called after each batch, in rows.
    """
    import torch

    _check_normalize(normalize)
    batches = choice_batches(model, tokenizer, examples, batch_size, max_tokens)
    total_rows, done, results = sum(len(b.keys) for b in batches), 0, []
    with torch.inference_mode():
        for batch in batches:
            results.append(logprob_sums(model, batch))
            done += len(batch.keys)
            if progress is not None:
                progress(done, total_rows)
    return grade(examples, batches, results, normalize)
