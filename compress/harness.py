"""Task accuracy through EleutherAI's lm-evaluation-harness, in process, so that compactlm's numbers sit next to
everyone else's.

The bundled BIG-bench tasks (compactlm.compress.tasks) are written as lm-eval tasks that need no download: one
JSONL of the same seeded examples compactlm's own scorer uses (prompt, choices, gold: always a list, so that an
example with two right answers counts either, as compactlm's scorer does) and one YAML (`dataset_path:
json`, `output_type: multiple_choice`, `target_delimiter: ""`: the choices carry their separating space) under
`bigbench_<name>`. Any other name is handed to lm-eval as it is (hellaswag, winogrande, arc_challenge, mmlu...):
it works where lm-eval can fetch its data set, and offline it fails with one line naming the data set.

Metrics: lm-eval's `acc` (sum of the choice's log-probabilities) and `acc_norm` (that sum over the choice's length
in characters). compactlm's own scorer ranks by the mean log-probability per token, which is neither: the two
harnesses see the same log-likelihoods (tests/unit/compress/test_harness.py) and differ only in that last step.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from compactlm.core.errors import CompactLMError

PREFIX = "bigbench_"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@dataclass(frozen=True)
class HarnessResult:
    task: str
    """The name asked for (a bundled task's compactlm name, or lm-eval's)."""
    accuracy: float
    """lm-eval's acc_norm where the task has it, else acc."""
    acc: float
    acc_norm: float | None
    chance: float
    examples: int
    loglikelihoods: tuple[tuple[float, ...], ...]
    """Per example, the summed log-probability of each choice (lm-eval's `resps`)."""
    hits_norm: tuple[float, ...] = ()
    """Per example, lm-eval's own acc_norm (1.0 right, 0.0 wrong)."""


def write_tasks(names: Sequence[str], limit: int | None, folder: Path, seed: int = 0) -> dict[str, str]:
    """lm-eval task files for the bundled tasks among `names` in `folder`; returns {name: lm-eval task name} for
    every name (others map to themselves)."""
    from compactlm.compress.tasks import TASKS, load_task

    folder.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for name in names:
        if name not in TASKS:
            mapping[name] = name
            continue
        rows = [
            {
                "prompt": e.prompt,
                "choices": list(e.choices),
                "gold": sorted(e.correct),
            }
            for e in load_task(name, limit, seed)
        ]
        data = folder / f"{PREFIX}{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        task = PREFIX + name
        (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=json.dumps(str(data))))
        mapping[name] = task
    return mapping


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """lm-eval logs each step and the datasets library warns; offline the hub is not asked at all."""
    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    if os.environ.get("COMPACTLM_LM_EVAL_ONLINE") != "1":
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        # stderr too: lm-eval's and datasets' progress bars (tqdm reads TQDM_DISABLE only when it is imported)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def task_manager(folder: Path):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise CompactLMError(
            f"--harness lm-eval needs lm-evaluation-harness: pip install 'lm-eval[api]==0.4.13' ({exc})"
        ) from exc
    with _offline_and_quiet():
        return TaskManager(include_path=str(folder))


def check_tasks(mapping: dict[str, str], manager) -> None:
    """An unknown task name: one line listing the bundled ones and where lm-eval's own are listed."""
    from compactlm.compress.tasks import TASKS

    known = set(manager.all_tasks)
    unknown = [name for name, task in mapping.items() if task not in known]
    if unknown:
        raise CompactLMError(
            f"unknown task {', '.join(map(repr, unknown))}: bundled (offline) tasks are {', '.join(TASKS)}; "
            f"lm-eval knows {len(known):,} more (`lm-eval ls tasks`), which need their data sets downloaded"
        )


def evaluate(model, tokenizer, mapping: dict[str, str], manager, num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 16) -> dict[str, HarnessResult]:  # fmt: skip
    """Run lm-eval's multiple-choice scoring on an already loaded HF model (its HFLM wrapper, on CPU)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _offline_and_quiet():
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        except Exception as exc:  # lm-eval asserts what it needs of the model and tokenizer, often without a message
            raise CompactLMError(f"lm-eval cannot evaluate {_name(model)}: {_reason(exc)}") from exc
        try:
            results = simple_evaluate(
                model=lm,
                tasks=list(mapping.values()),
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,  # the bundled tasks' files hold `limit` examples already: a no-op for them
                log_samples=True,
                bootstrap_iters=0,
            )
        except OSError as exc:  # ConnectionError included: a data set lm-eval would download
            reason = " ".join(str(exc).split())[:300]
            foreign = ", ".join(t for t in mapping.values() if not t.startswith(PREFIX))
            raise CompactLMError(
                f"lm-eval could not load the data of {foreign or 'the tasks'}"
                f" (offline here: set COMPACTLM_LM_EVAL_ONLINE=1 where the Hugging Face hub is reachable): {reason}"
            ) from exc
        except (ValueError, TypeError, AssertionError, RuntimeError, KeyError, IndexError, AttributeError) as exc:
            raise CompactLMError(f"lm-eval could not score {_name(model)}: {_reason(exc)}") from exc
    out = {}
    for name, task in mapping.items():
        metrics, samples = results["results"][task], results["samples"][task]
        lls = tuple(tuple(float(r[0]) for r in s["filtered_resps"]) for s in samples)
        golds = [s["target"] if isinstance(s["target"], list) else [s["target"]] for s in samples]
        chance = sum(len(g) / len(ll) for g, ll in zip(golds, lls, strict=True)) / len(samples)
        acc_norm = metrics.get("acc_norm,none")
        out[name] = HarnessResult(
            task=name,
            accuracy=float(acc_norm if acc_norm is not None else metrics["acc,none"]),
            acc=float(metrics["acc,none"]),
            acc_norm=None if acc_norm is None else float(acc_norm),
            chance=chance,
            examples=len(samples),
            loglikelihoods=lls,
            hits_norm=tuple(float(s.get("acc_norm", s.get("acc", 0.0))) for s in samples),
        )
    return out


def _name(model) -> str:
    return str(getattr(model, "compactlm_path", None) or type(model).__name__)


def _reason(exc: BaseException) -> str:
    """One line: the exception's message (lm-eval's assertions often have none), at most 300 characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300] or 'no message'}"
