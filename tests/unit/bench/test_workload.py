"""Benchmark workloads: exact lengths, fresh prompts, real text, trtllm-bench's JSONL shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compactlm.bench.workload import DatasetWorkload, Workload, WorkloadItem, WorkloadSpec, load_jsonl, save_jsonl
from compactlm.core.errors import CompactLMError
from tests.helpers import english_docs, save_word_tokenizer, write_jsonl


def test_fixed_lengths_are_exact_and_prompts_fresh_and_free_of_eos():
    workload = Workload(WorkloadSpec(48, 7, seed=3), vocab_size=50, exclude=(2, 7))
    items = workload.take(40) + workload.take(10)  # take() continues: the later ones are new prompts too
    assert all(i.input_len == 48 and i.output_tokens == 7 for i in items)
    assert len({i.input_ids for i in items}) == 50
    ids = np.concatenate([i.input_ids for i in items])
    assert ids.min() >= 0 and ids.max() < 50 and not np.isin(ids, [2, 7]).any()
    assert [i.task_id for i in items] == list(range(50))
    again = Workload(WorkloadSpec(48, 7, seed=3), vocab_size=50, exclude=(2, 7)).take(40)
    assert again == items[:40]  # reproducible from the seed


def test_normal_lengths_spread_like_token_norm_dist_and_stay_within_the_headroom():
    spec = WorkloadSpec(100, 40, input_stdev=10, output_stdev=5, seed=1)
    items = Workload(spec, vocab_size=1000).take(2000)
    inputs = np.array([i.input_len for i in items])
    outputs = np.array([i.output_tokens for i in items])
    assert abs(inputs.mean() - 100) < 1.5 and 8.5 < inputs.std() < 11.5
    assert abs(outputs.mean() - 40) < 1 and 4 < outputs.std() < 6
    assert spec.max_lengths() == (140, 60)
    assert inputs.max() <= 140 and inputs.min() >= 60 and outputs.max() <= 60


def test_text_prompts_are_windows_of_the_corpus_with_exact_lengths(tmp_path):
    docs = english_docs(30, words_per_doc=50)
    save_word_tokenizer(tmp_path / "tok", docs)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    items = Workload(WorkloadSpec(20, 4, source=str(corpus)), tokenizer=tok).take(5)
    assert [i.input_len for i in items] == [20] * 5
    text = tok.decode(list(items[1].input_ids))
    assert any(word in text for word in docs[0].split()[:10] + docs[1].split())  # real words, not noise
    assert len({i.input_ids for i in items}) == 5
    with pytest.raises(CompactLMError, match="need a tokenizer"):
        Workload(WorkloadSpec(20, 4, source=str(corpus)))
    with pytest.raises(CompactLMError, match="ran out of text"):
        Workload(WorkloadSpec(2000, 4, source=str(corpus)), tokenizer=tok).take(10)
    text_set = tmp_path / "text.jsonl"  # trtllm-bench also reads datasets of text prompts
    text_set.write_text(json.dumps({"task_id": 7, "prompt": docs[2], "output_tokens": 3}) + "\n")
    (item,) = load_jsonl(text_set, lambda: tok)  # the tokenizer is only loaded when a line needs it
    assert item.input_ids == tuple(tok(docs[2], add_special_tokens=False)["input_ids"]) and item.task_id == 7


def test_jsonl_round_trip_in_trtllm_bench_shape(tmp_path):
    items = Workload(WorkloadSpec(16, 5, input_stdev=3, seed=2), vocab_size=100).take(12)
    path = save_jsonl(items, tmp_path / "data" / "set.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"task_id", "input_ids", "output_tokens"}
    assert load_jsonl(path) == items


def test_jsonl_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": 0, "input_ids": [1, 2], "output_tokens": 3}\n{"input_ids": [1], "output_tokens": 0}\n')
    with pytest.raises(CompactLMError, match=r"bad.jsonl:2: field 'output_tokens' must be a positive integer"):
        load_jsonl(path)
    path.write_text('{"prompt": "hello", "output_tokens": 3}\n')
    with pytest.raises(CompactLMError, match=r"bad.jsonl:1 has a text prompt"):
        load_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(CompactLMError, match=r"bad.jsonl:1 is not valid JSON"):
        load_jsonl(path)


def test_a_dataset_workload_hands_out_its_requests_once():
    items = [WorkloadItem(i, (1,) * (i + 1), 2) for i in range(5)]
    workload = DatasetWorkload(items, "set.jsonl")
    assert workload.max_lengths() == (5, 2) and workload.spec.input_len == 3
    assert workload.take(3) == items[:3]
    with pytest.raises(CompactLMError, match="has 5 requests"):
        workload.take(3)
    assert list(workload) == items[3:]
