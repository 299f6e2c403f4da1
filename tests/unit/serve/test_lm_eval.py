"""lm-evaluation-harness, unmodified, scores a multiple-choice task through the OpenAI front (`local-completions`:
echo + logprobs over token ids) and gets the same log-likelihoods as its own `hf` model on the same weights."""

from __future__ import annotations

import json

import pytest

from compactlm.engines import load_engine
from compactlm.serve.openai_api.route import OpenAIRoute
from compactlm.serve.requests import GenerationService
from tests.helpers import HOST, WORDS, tiny_engine

lm_eval = pytest.importorskip("lm_eval")

TASK = """task: compactlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-task")
    rows = []
    for i in range(12):
        question = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6))
        choices = [" ".join(WORDS[(i * 3 + c * 5 + k) % len(WORDS)] for k in range(2)) for c in range(3)]
        rows.append({"question": question, "choices": choices, "answer": i % 3})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(TASK.format(data=data))
    return folder


def _loglikelihoods(results) -> list[float]:
    samples = results["samples"]["compactlm_tiny_mc"]
    return [float(resp[0]) for sample in samples for resp in sample["filtered_resps"]]


def test_lm_eval_local_completions_through_the_server_matches_its_hf_model(tmp_path_factory, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    engine_dir = tiny_engine(tmp_path_factory.mktemp("lm-eval-engine"))
    tokenizer = engine_dir / "tokenizer"
    manager = TaskManager(include_path=str(task_dir))
    with load_engine(engine_dir) as engine:
        route = OpenAIRoute(GenerationService(engine, "tiny"), HOST, 0, "tiny")
        route.start()
        try:
            served = simple_evaluate(
                model="local-completions",
                model_args=f"model=tiny,base_url=http://{HOST}:{route.port}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tokenizer},tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=96",
                tasks=["compactlm_tiny_mc"],
                task_manager=manager,
                log_samples=True,
            )
        finally:
            route.stop(drain_s=2)
    direct = simple_evaluate(
        model="hf",
        model_args=f"pretrained={engine_dir / 'model'},tokenizer={tokenizer},dtype=float32,max_length=96",
        tasks=["compactlm_tiny_mc"],
        task_manager=manager,
        log_samples=True,
        device="cpu",
    )
    got, want = _loglikelihoods(served), _loglikelihoods(direct)
    assert len(got) == len(want) == 36
    assert got == pytest.approx(want, abs=1e-3)
    acc = served["results"]["compactlm_tiny_mc"]["acc,none"]
    assert acc == direct["results"]["compactlm_tiny_mc"]["acc,none"]
