"""The teacher-logit cache: what is stored, how it is looked up, what it refuses, and training from it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from compactlm.compress.distill import Distillation
from compactlm.compress.teacher_cache import TeacherCache, cache_teacher_logits, token_hash
from compactlm.compress.train import TrainingData, train
from compactlm.compress.train_config import DistillConfig, TrainConfig
from compactlm.core.errors import CompactLMError
from tests.helpers import cli, random_tokens, small_run, tiny_model

ROWS, SEQ_LEN = 5, 16


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def sequences():
    return random_tokens(ROWS, SEQ_LEN, seed=21)


@pytest.fixture
def cache_dir(teacher, sequences, tmp_path):
    calls = []
    folder = cache_teacher_logits(
        teacher,
        sequences,
        tmp_path / "cache",
        top_k=8,
        shard_rows=2,
        batch_size=2,
        meta={"data": "unit-test"},
        progress=lambda *args: calls.append(args),
    )
    assert calls[-1] == ("teacher logits", ROWS, ROWS)
    return folder


def _teacher_logits(teacher, sequences):
    with torch.no_grad():
        return teacher(input_ids=sequences, use_cache=False).logits


def test_the_cache_writes_shards_and_a_manifest(cache_dir, sequences):
    manifest = json.loads((cache_dir / "cache.json").read_text())
    assert manifest["format"] == "compactlm-teacher-cache/1"
    assert (manifest["rows"], manifest["seq_len"], manifest["top_k"], manifest["vocab_size"]) == (5, 16, 8, 256)
    assert manifest["value_dtype"] == "bf16" and manifest["index_dtype"] == "uint16"
    assert manifest["token_hash"] == token_hash(sequences) and manifest["data"] == "unit-test"
    assert manifest["shards"] == [
        {"file": "shard-00000.safetensors", "start": 0, "rows": 2},
        {"file": "shard-00001.safetensors", "start": 2, "rows": 2},
        {"file": "shard-00002.safetensors", "start": 4, "rows": 1},
    ]
    shards = [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["cache.json", *shards]
    with safe_open(str(cache_dir / "shard-00001.safetensors"), framework="pt") as shard:
        assert shard.get_tensor("indices").dtype == torch.uint16
        assert shard.get_tensor("values").dtype == torch.bfloat16
        assert shard.get_tensor("values").shape == (2, SEQ_LEN, 8)
    assert TeacherCache(cache_dir).nbytes() == sum((cache_dir / s["file"]).stat().st_size for s in manifest["shards"])


def test_lookup_returns_the_teachers_top_k_across_shard_boundaries(cache_dir, teacher, sequences):
    rows = torch.tensor([4, 0, 3, 1, 3])
    values, indices = TeacherCache(cache_dir).lookup(rows)
    assert values.shape == indices.shape == (5, SEQ_LEN, 8)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    top = torch.topk(_teacher_logits(teacher, sequences)[rows], 8, dim=-1)
    torch.testing.assert_close(values, top.values, rtol=2**-8, atol=1e-6)  # bf16 keeps 8 bits of mantissa
    # Indices are exact wherever the teacher's ranking is not a near-tie.
    gaps = torch.cat([top.values[..., :-1] - top.values[..., 1:], torch.full((5, SEQ_LEN, 1), 1.0)], dim=-1)
    clear = gaps > 1e-4
    assert clear.float().mean() > 0.95
    assert torch.equal(indices[clear], top.indices[clear])


def test_a_vocabulary_over_65536_tokens_is_stored_as_int32(tmp_path, sequences):
    big = tiny_model("llama", num_hidden_layers=1, vocab_size=70_000)
    folder = cache_teacher_logits(big, sequences[:1, :4], tmp_path / "c", top_k=3, value_dtype="fp32")
    cache = TeacherCache(folder)
    assert cache.manifest["index_dtype"] == "int32"
    values, indices = cache.lookup(torch.tensor([0]))
    top = torch.topk(_teacher_logits(big, sequences[:1, :4]), 3, dim=-1)
    assert torch.equal(indices, top.indices) and indices.max() > 0
    torch.testing.assert_close(values, top.values)


def test_check_matches_refuses_other_rows_and_another_vocabulary(cache_dir, sequences):
    cache = TeacherCache(cache_dir)
    cache.check_matches(sequences, 256)
    with pytest.raises(CompactLMError, match="vocabulary 256, the student 128"):
        cache.check_matches(sequences, 128)
    other = sequences.clone()
    other[2, 5] = (other[2, 5] + 1) % 256
    with pytest.raises(CompactLMError, match="made for other training data \\(5 x 16 tokens of unit-test\\)"):
        cache.check_matches(other, 256)
    with pytest.raises(CompactLMError, match="same --data, --seq-len and --tokens/--steps"):
        cache.check_matches(sequences[:4], 256)


def test_the_cache_refuses_bad_options_and_a_missing_manifest(teacher, sequences, tmp_path):
    with pytest.raises(CompactLMError, match="--top-k must be between 1 and the vocabulary size \\(256\\)"):
        cache_teacher_logits(teacher, sequences, tmp_path / "a", top_k=257)
    with pytest.raises(CompactLMError, match="value dtype must be one of"):
        cache_teacher_logits(teacher, sequences, tmp_path / "b", value_dtype="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(CompactLMError, match="is not a teacher cache"):
        TeacherCache(tmp_path)


def test_an_existing_cache_is_replaced_only_with_overwrite(cache_dir, teacher, sequences):
    with pytest.raises(CompactLMError, match="already exists"):
        cache_teacher_logits(teacher, sequences, cache_dir, top_k=4)
    cache_teacher_logits(teacher, sequences, cache_dir, top_k=4, overwrite=True)
    assert TeacherCache(cache_dir).manifest["top_k"] == 4
    assert [p.name for p in cache_dir.parent.iterdir()] == ["cache"]  # no temp folder left


def test_distilling_from_a_full_vocabulary_cache_matches_the_live_teacher(teacher, sequences, tmp_path):
    folder = cache_teacher_logits(teacher, sequences, tmp_path / "cache", top_k=256, value_dtype="fp32", shard_rows=3)
    cache = TeacherCache(folder)
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1, save_every=0)
    runs = {}
    for name, source in (("live", {"teacher": teacher}), ("cache", {"cache": cache})):
        student = tiny_model("llama", seed=5, num_hidden_layers=1)
        objective = Distillation(DistillConfig(loss="logit"), "logit", **source)
        result = train(student, objective, TrainingData(sequences), cfg, tmp_path / name)
        runs[name] = (student, result)
    (live, live_result), (cached, cached_result) = runs["live"], runs["cache"]
    for a, b in zip(live_result.history, cached_result.history, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4)
    assert live_result.history[-1]["kd"] < live_result.history[0]["kd"]
    for name, value in live.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)


# --- cache-logits then distill --teacher-cache, from the command line -------------------------------------------


def test_cache_logits_then_distill_from_the_cache(retrain_checkpoints, tmp_path):
    ckpts, cache = retrain_checkpoints, tmp_path / "cache"
    options = small_run(ckpts["corpus"], eval_samples=None)  # cache-logits scores nothing
    result = cli("compress", "cache-logits", ckpts["teacher"], "--out", cache, "--top-k", "16", *options)
    assert result.exit_code == 0, result.output
    manifest = TeacherCache(cache).manifest
    assert (manifest["rows"], manifest["seq_len"], manifest["top_k"]) == (6, 16, 16)
    assert manifest["teacher"] == str(ckpts["teacher"]) and manifest["data"] == str(ckpts["corpus"])

    distill = ["compress", "distill", "--teacher", ckpts["teacher"], "--student", ckpts["student"]]
    out = tmp_path / "distilled"
    result = cli(*distill, "--out", out, *small_run(ckpts["corpus"]), "--loss", "logit", "--teacher-cache", cache)
    assert result.exit_code == 0, result.output
    step = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert step["op"] == "distill" and step["teacher_cache"] == str(cache) and step["steps"] == 3
    assert all(math.isfinite(row["kd"]) and row["kd"] > 0 for row in step["history"])

    # A distillation of another length reads other rows: the cache refuses it before any training.
    other = tmp_path / "other"
    result = cli(
        *distill, "--out", other, *small_run(ckpts["corpus"], steps=4), "--loss", "logit", "--teacher-cache", cache
    )
    assert isinstance(result.exception, CompactLMError)
    assert "was made for other training data (6 x 16 tokens" in str(result.exception)
    assert "this run trains on 8 x 16" in str(result.exception)
    assert not other.exists() and not (tmp_path / ".other.work").exists()

    # Hidden-state losses need the live teacher.
    hidden = ["--loss", "logit+hidden", "--teacher-cache", cache]
    result = cli(*distill, "--out", other, *small_run(ckpts["corpus"]), *hidden)
    assert isinstance(result.exception, CompactLMError)
    assert "needs the live teacher's hidden states" in str(result.exception)
