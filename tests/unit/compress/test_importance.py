"""Activation importance: shapes, the running aggregation against brute force, persistence, validation."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from compactlm.compress.importance import (
    AGGREGATIONS,
    ImportanceConfig,
    ImportanceScores,
    estimate_importance,
    random_scores,
)
from compactlm.core.errors import CompactLMError
from tests.helpers import random_tokens, tiny_config, tiny_model

WIDTH_ONLY = dict(removal_loss=False)


def _capture(model, tokens: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every layer's down_proj input, o_proj input and every RMSNorm output, from one plain forward."""
    seen: dict[str, list[torch.Tensor]] = {"down": [], "o": [], "norm": []}
    handles = []
    norms = []
    for layer in model.model.layers:
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen["down"].append(a[0])))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen["o"].append(a[0])))
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    norms.append(model.model.norm)
    for norm in norms:
        handles.append(norm.register_forward_hook(lambda _m, _a, out: seen["norm"].append(out)))
    try:
        with torch.inference_mode():
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _reduce(x: torch.Tensor, seq_agg: str, batch_agg: str) -> torch.Tensor:
    """[batch, seq, channels] magnitudes -> [channels]: over seq within each sample, then over samples."""
    x = x.double()
    per_sample = {
        "mean": lambda: x.mean(dim=1),
        "l2": lambda: x.pow(2).sum(dim=1).sqrt(),
        "var": lambda: x.var(dim=1, unbiased=False),
    }[seq_agg]()
    return {
        "mean": lambda: per_sample.mean(dim=0),
        "l2": lambda: per_sample.pow(2).sum(dim=0).sqrt(),
        "var": lambda: per_sample.var(dim=0, unbiased=False),
    }[batch_agg]()


def test_score_shapes_and_group_sums():
    model = tiny_model("llama")
    scores = estimate_importance(model, random_tokens(5, 16), ImportanceConfig(batch_size=2, block_sizes=(1, 2)))
    assert scores.mlp.shape == (4, 96)
    assert scores.heads.shape == (4, 6)
    assert scores.hidden.shape == (48,)
    assert {k: v.shape for k, v in scores.block_influence.items()} == {1: (4,), 2: (3,)}
    assert {k: v.shape for k, v in scores.removal_loss.items()} == {1: (4,), 2: (3,)}
    assert isinstance(scores.base_loss, float) and scores.base_loss > 0
    groups = scores.groups(3)
    assert groups.shape == (4, 3)
    for g in range(3):  # query heads 2g and 2g+1 share KV group g
        torch.testing.assert_close(groups[:, g], scores.heads[:, 2 * g] + scores.heads[:, 2 * g + 1])
    assert scores.meta["samples"] == 5 and scores.meta["seq_len"] == 16
    assert scores.meta["shape"]["ffn_hidden_size"] == 96


@pytest.mark.parametrize("seq_agg,batch_agg", list(itertools.product(AGGREGATIONS, AGGREGATIONS)))
def test_running_aggregation_equals_brute_force(seq_agg, batch_agg):
    model = tiny_model("qwen2")
    tokens = random_tokens(7, 12, seed=3)
    # batch 3 over 7 samples: the last batch is partial, so the running sums must weigh samples, not batches
    config = ImportanceConfig(seq_agg=seq_agg, batch_agg=batch_agg, batch_size=3, **WIDTH_ONLY)
    scores = estimate_importance(model, tokens, config)
    seen = _capture(model, tokens)

    want_mlp = torch.stack([_reduce(x.abs(), seq_agg, batch_agg) for x in seen["down"]])
    per_head = [torch.linalg.vector_norm(x.unflatten(-1, (6, 16)), dim=-1) for x in seen["o"]]
    want_heads = torch.stack([_reduce(x, seq_agg, batch_agg) for x in per_head])
    want_hidden = torch.stack([_reduce(x.abs(), seq_agg, batch_agg) for x in seen["norm"]]).sum(0)
    assert len(seen["norm"]) == 2 * 4 + 1
    torch.testing.assert_close(scores.mlp.double(), want_mlp, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.heads.double(), want_heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.hidden.double(), want_hidden, rtol=1e-4, atol=1e-7)


def test_neuron_with_zero_gate_and_up_rows_scores_zero_and_ranks_lowest():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[37] = 0
        model.model.layers[1].mlp.up_proj.weight[37] = 0
    for seq_agg, batch_agg in [("mean", "l2"), ("l2", "mean")]:
        config = ImportanceConfig(seq_agg=seq_agg, batch_agg=batch_agg, **WIDTH_ONLY)
        scores = estimate_importance(model, random_tokens(4, 16), config)
        assert scores.mlp[1, 37] == 0
        assert int(scores.mlp[1].argmin()) == 37
        assert (scores.mlp[1, torch.arange(96) != 37] > 0).all()
        assert (scores.mlp[0] > 0).all()  # other layers untouched


def test_scores_do_not_depend_on_batch_size():
    model = tiny_model("mistral")
    tokens = random_tokens(4, 16, seed=5)
    one = estimate_importance(model, tokens, ImportanceConfig(batch_size=1, block_sizes=(1, 2), depth_samples=4))
    four = estimate_importance(model, tokens, ImportanceConfig(batch_size=4, block_sizes=(1, 2), depth_samples=4))
    for name in ("mlp", "heads", "hidden"):
        torch.testing.assert_close(getattr(one, name), getattr(four, name), rtol=1e-5, atol=1e-6)
    for k in (1, 2):
        torch.testing.assert_close(one.block_influence[k], four.block_influence[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.removal_loss[k], four.removal_loss[k], rtol=1e-5, atol=1e-6)
    assert one.base_loss == pytest.approx(four.base_loss, rel=1e-6)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen3")
    scores = estimate_importance(
        model,
        random_tokens(4, 16),
        ImportanceConfig(block_sizes=(1, 3), depth_samples=2),
        meta={"model": "tiny"},
    )
    path = scores.save(tmp_path / "scores.safetensors")
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]  # no temp left
    loaded = ImportanceScores.load(path)
    for name in ("mlp", "heads", "hidden"):
        assert torch.equal(getattr(loaded, name), getattr(scores, name))
    for table in ("block_influence", "removal_loss"):
        got, want = getattr(loaded, table), getattr(scores, table)
        assert got.keys() == want.keys() == {1, 3}
        for k in want:
            assert torch.equal(got[k], want[k])
    assert loaded.base_loss == scores.base_loss
    assert loaded.meta == json.loads(json.dumps(scores.meta))  # JSON turns tuples into lists, nothing else
    assert loaded.meta["model"] == "tiny"


def test_load_rejects_files_that_are_not_scores(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, other)
    with pytest.raises(CompactLMError, match="not a compactlm importance file"):
        ImportanceScores.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CompactLMError, match="cannot read importance scores"):
        ImportanceScores.load(garbage)


def test_check_matches_rejects_scores_of_another_shape():
    config = tiny_config("llama")
    random_scores(config).check_matches(config)  # same shape: accepted
    for other in (tiny_config("llama", intermediate_size=64), tiny_config("llama", num_hidden_layers=3)):
        with pytest.raises(CompactLMError, match="do not match this model"):
            random_scores(other).check_matches(config)
    bad_heads = random_scores(config)
    bad_heads.heads = torch.rand(4, 4)
    with pytest.raises(CompactLMError, match=r"heads scores have shape \(4, 4\)"):
        bad_heads.check_matches(config)


def test_prune_refuses_mismatched_scores():
    from compactlm.compress.prune import PruneTarget, prune

    model = tiny_model("llama")
    with pytest.raises(CompactLMError, match="do not match"):
        prune(model, random_scores(tiny_config("llama", hidden_size=36)), PruneTarget())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(seq_agg="max"), "seq_agg must be one of mean, l2, var"),
        (dict(batch_agg="median"), "batch_agg must be one of"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(depth_samples=0), "depth_samples must be at least 1"),
        (dict(block_sizes=(0, 1)), "block sizes must be positive"),
        (dict(block_sizes=()), "block sizes must be positive"),
    ],
)
def test_importance_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(CompactLMError, match=message):
        ImportanceConfig(**kwargs)


def test_importance_config_normalizes_block_sizes():
    assert ImportanceConfig(block_sizes=[3, 1, 3]).block_sizes == (1, 3)


def test_estimate_importance_rejects_empty_data_and_oversized_blocks():
    model = tiny_model("llama")
    with pytest.raises(CompactLMError, match="calibration data is empty"):
        estimate_importance(model, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(CompactLMError, match="block size 5 is larger than the model's 4 layers"):
        estimate_importance(model, random_tokens(2, 8), ImportanceConfig(block_sizes=(1, 5)))


def test_progress_reports_every_stage():
    calls = []
    estimate_importance(
        tiny_model("llama"),
        random_tokens(3, 8),
        ImportanceConfig(batch_size=2, block_sizes=(1, 2), depth_samples=2),
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    assert [c for c in calls if c[0] == "width"] == [("width", 2, 3), ("width", 3, 3)]
    depth = [c for c in calls if c[0] == "depth"]
    assert depth[-1] == ("depth", 7, 7)  # 4 single layers + 3 blocks of two
    assert len(depth) == 7


def test_random_scores_have_the_model_shapes_and_are_seeded():
    config = tiny_config("qwen2")
    a, b = (
        random_scores(config, seed=1, block_sizes=(1, 3)),
        random_scores(config, seed=1, block_sizes=(1, 3)),
    )
    assert a.mlp.shape == (4, 96) and a.heads.shape == (4, 6) and a.hidden.shape == (48,)
    assert a.removal_loss[3].shape == (2,) and a.block_influence[1].shape == (4,)
    assert torch.equal(a.mlp, b.mlp)
    assert not torch.equal(a.mlp, random_scores(config, seed=2).mlp)
