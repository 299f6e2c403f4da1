"""Depth importance: removal losses against naive skipping, Block Influence, which layers to drop; LM loss."""

from __future__ import annotations

import math

import pytest
import torch

from compactlm.compress.depth import BlockInfluence, choose_layers_to_drop, lm_loss, removal_losses, skip_layers
from compactlm.compress.evaluate import Perplexity, perplexity
from compactlm.compress.importance import ImportanceConfig, ImportanceScores, estimate_importance
from compactlm.core.errors import CompactLMError
from tests.helpers import FAMILIES, random_tokens, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_losses_match_naive_skipping(family):
    model = tiny_model(family)
    layers_before = list(model.model.layers)
    sequences = random_tokens(5, 12, seed=2)
    base, losses = removal_losses(model, sequences, block_sizes=(1, 2, 3, 4), batch_size=2)
    assert base == pytest.approx(lm_loss(model, sequences, batch_size=5), abs=1e-5)
    assert {k: len(v) for k, v in losses.items()} == {1: 4, 2: 3, 3: 2, 4: 1}
    for k, table in losses.items():
        for start in range(4 - k + 1):
            with skip_layers(model, range(start, start + k)):
                naive = lm_loss(model, sequences, batch_size=3)
            assert float(table[start]) == pytest.approx(naive, abs=1e-5), (k, start)
    assert list(model.model.layers) == layers_before  # every layer put back


def test_removing_every_layer_leaves_embeddings_to_the_head():
    model = tiny_model("llama")
    sequences = random_tokens(2, 10)
    _, losses = removal_losses(model, sequences, block_sizes=(4,), batch_size=2)
    with torch.inference_mode():
        hidden = model.model.norm(model.model.embed_tokens(sequences))
        logits = model.lm_head(hidden)[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), sequences[:, 1:].reshape(-1))
    assert float(losses[4][0]) == pytest.approx(float(want), abs=1e-5)


def test_skip_layers_restores_layers_on_error():
    model = tiny_model("llama")
    before = list(model.model.layers)
    with pytest.raises(RuntimeError), skip_layers(model, [1, 2]):
        assert model.model.layers[1] is not before[1]
        raise RuntimeError("boom")
    assert list(model.model.layers) == before


def test_lm_loss_equals_transformers_loss_and_perplexity():
    model = tiny_model("qwen3")
    sequences = random_tokens(4, 16, seed=4)
    with torch.inference_mode():
        hf_loss = float(model(input_ids=sequences, labels=sequences).loss)
    assert lm_loss(model, sequences, batch_size=3) == pytest.approx(hf_loss, abs=1e-5)
    result = perplexity(model, sequences, batch_size=2)
    assert result.tokens == 4 * 15
    assert result.loss == pytest.approx(hf_loss, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(hf_loss))
    assert Perplexity(loss=800.0, tokens=1).perplexity == math.inf


def _boundaries(model, tokens) -> list[torch.Tensor]:
    """Hidden states at every layer boundary: input of layer 0, then each layer's output."""
    seen: list[torch.Tensor] = []
    layers = model.model.layers
    handles = [layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))]
    handles += [layer.register_forward_hook(lambda _m, _a, out: seen.append(out)) for layer in layers]
    try:
        with torch.inference_mode():
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_influence_equals_brute_force(family):
    model = tiny_model(family)
    tokens = random_tokens(5, 12, seed=6)
    scores = estimate_importance(
        model, tokens, ImportanceConfig(batch_size=2, block_sizes=(1, 2, 4), removal_loss=False)
    )
    hidden = _boundaries(model, tokens)
    for k in (1, 2, 4):
        want = torch.tensor(
            [
                1 - torch.nn.functional.cosine_similarity(hidden[i], hidden[i + k], dim=-1).double().mean()
                for i in range(4 - k + 1)
            ]
        )
        torch.testing.assert_close(scores.block_influence[k].double(), want, rtol=1e-4, atol=1e-6)


def test_block_influence_of_an_identity_layer_is_zero():
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = estimate_importance(model, random_tokens(4, 16), ImportanceConfig(removal_loss=False))
    influence = scores.block_influence[1]
    assert abs(float(influence[2])) < 1e-5
    assert (influence[[0, 1, 3]] > 1e-3).all()
    assert int(influence.argmin()) == 2


def test_block_influence_accumulates_tokens_over_batches():
    tracker = BlockInfluence(num_layers=2, block_sizes=[1, 2])
    x = torch.randn(2, 3, 8)
    for _ in range(2):  # two batches of 2 x 3 tokens
        tracker.boundary(0, x)
        tracker.boundary(1, x)  # layer 0 changes nothing
        tracker.boundary(2, -x)  # layer 1 flips the sign: cos = -1
    assert tracker.tokens == 12
    result = tracker.result()
    torch.testing.assert_close(result[1], torch.tensor([0.0, 2.0], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(result[2], torch.tensor([2.0], dtype=torch.float64), atol=1e-6, rtol=0)


def _hand_scores() -> ImportanceScores:
    return ImportanceScores(
        mlp=torch.ones(5, 4),
        heads=torch.ones(5, 2),
        hidden=torch.ones(8),
        removal_loss={
            1: torch.tensor([9.0, 3.0, 5.0, 2.0, 8.0]),
            2: torch.tensor([9.0, 6.0, 4.0, 7.0]),
            3: torch.tensor([5.0, 6.0, 7.0]),
        },
        block_influence={1: torch.tensor([0.5, 0.1, 0.2, 0.3, 0.9]), 2: torch.tensor([0.4, 0.3, 0.6, 0.2])},
        base_loss=2.0,
    )


@pytest.mark.parametrize(
    "metric,num_drop,want",
    [
        ("block-loss", 1, [3]),
        ("block-loss", 2, [2, 3]),
        ("block-loss", 3, [0, 1, 2]),
        ("layer-loss", 1, [3]),
        ("layer-loss", 2, [1, 3]),  # not contiguous: the two layers whose own removal hurts least
        ("layer-loss", 3, [1, 2, 3]),
        ("block-influence", 1, [1]),
        ("block-influence", 2, [3, 4]),
        ("block-loss", 0, []),
    ],
)
def test_choose_layers_to_drop(metric, num_drop, want):
    assert choose_layers_to_drop(_hand_scores(), num_drop, metric) == want


@pytest.mark.parametrize("metric,what", [("block-loss", "removal loss"), ("block-influence", "block influence")])
def test_missing_block_size_names_the_option_to_fix_it(metric, what):
    with pytest.raises(CompactLMError) as info:
        choose_layers_to_drop(_hand_scores(), 4, metric)
    message = str(info.value)
    assert f"no {what} for blocks of 4 layer(s)" in message
    assert "--block-sizes including 4" in message and f"--depth-metric {metric}" in message


def test_layer_loss_needs_single_layer_losses_and_nan_counts_as_missing():
    scores = _hand_scores()
    scores.removal_loss = {2: scores.removal_loss[2]}
    with pytest.raises(CompactLMError, match="--block-sizes including 1"):
        choose_layers_to_drop(scores, 2, "layer-loss")
    scores.removal_loss = {2: torch.tensor([1.0, float("nan"), 2.0, 3.0])}
    with pytest.raises(CompactLMError, match="--block-sizes including 2"):
        choose_layers_to_drop(scores, 2, "block-loss")


def test_unknown_depth_metric_is_refused():
    with pytest.raises(CompactLMError, match="unknown depth metric 'cosine'"):
        choose_layers_to_drop(_hand_scores(), 1, "cosine")
