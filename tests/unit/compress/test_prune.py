"""Structured pruning: parity, config and shapes, exactness on dead units, GQA bookkeeping, plan errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm.compress.arch import count_params, shape_of
from compactlm.compress.checkpoint import save_checkpoint
from compactlm.compress.evaluate import count_model_params
from compactlm.compress.importance import ImportanceConfig, ImportanceScores, estimate_importance, random_scores
from compactlm.compress.prune import PruneTarget, needs_scores, parse_layer_ranges, plan, prune
from compactlm.core.errors import CompactLMError
from tests.helpers import (
    ATOL,
    FAMILIES,
    FULL_QK_NORM,
    FUSED,
    expected_state_shapes,
    head_cols,
    logits,
    random_tokens,
    state_shapes,
    tiny_config,
    tiny_model,
    value_rows,
    zero_neurons,
)

HD = 16  # head_dim of the tiny models; pruning never changes it


def _scores(model) -> ImportanceScores:
    return estimate_importance(model, random_tokens(4, 16, seed=7), ImportanceConfig(removal_loss=False))


def _crafted(model) -> ImportanceScores:
    """Real-shaped, strictly positive scores that a test then lowers where it wants pruning to cut."""
    scores = random_scores(model.config, seed=3)
    for name in ("mlp", "heads", "hidden"):
        setattr(scores, name, getattr(scores, name) + 1.0)
    return scores


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_nothing_keeps_logits(family, tokens):
    model = tiny_model(family)
    student, record, kept = prune(model, _scores(model), PruneTarget())
    assert type(student) is type(model)
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=0, atol=1e-6)
    assert record["params_before"] == record["params_after"] == count_model_params(model)
    assert record["dropped_layers"] == []
    assert torch.equal(kept.mlp, torch.arange(96).expand(4, 96))


TARGETS = {
    "width": (PruneTarget(hidden_size=36, ffn_hidden_size=64), dict(D=36, F=64, H=6, G=3, L=4)),
    "heads": (PruneTarget(num_attention_heads=3), dict(D=48, F=96, H=3, G=3, L=4)),
    "groups": (PruneTarget(num_query_groups=2), dict(D=48, F=96, H=4, G=2, L=4)),
    "depth": (PruneTarget(num_layers=3, depth_metric="block-influence"), dict(D=48, F=96, H=6, G=3, L=3)),
    "all": (
        PruneTarget(hidden_size=32, ffn_hidden_size=40, num_attention_heads=2, num_query_groups=2, drop_layers=(1,)),
        dict(D=32, F=40, H=2, G=2, L=3),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", TARGETS)
def test_pruned_config_and_every_weight_shape(family, kind, tokens):
    target, want = TARGETS[kind]
    model = tiny_model(family)
    student, record, kept = prune(model, _scores(model), target)
    config = student.config
    assert config.model_type == family
    assert config.hidden_size == want["D"]
    assert config.intermediate_size == want["F"]
    assert config.num_attention_heads == want["H"]
    assert config.num_key_value_heads == want["G"]
    assert config.head_dim == HD  # kept, and written explicitly
    assert config.num_hidden_layers == want["L"]
    assert state_shapes(student) == expected_state_shapes(config)
    if family not in FUSED:
        assert state_shapes(student)["model.layers.0.self_attn.q_proj.weight"] == (want["H"] * HD, want["D"])
    new_shape = shape_of(config)
    assert record["params_after"] == count_params(new_shape) == count_model_params(student)
    assert record["to_shape"] == new_shape.as_dict()
    assert len(kept.layers) == want["L"] and kept.heads.shape == (want["L"], want["H"])
    assert kept.groups.shape == (want["L"], want["G"]) and kept.mlp.shape == (want["L"], want["F"])
    assert kept.hidden.shape == (want["D"],)
    assert logits(student, tokens).shape == (*tokens.shape, 256)


def test_tied_embeddings_stay_tied_after_save_and_reload(tmp_path, tokens):
    model = tiny_model("qwen2")
    student, record, _ = prune(
        model, _scores(model), PruneTarget(hidden_size=36, num_layers=3, depth_metric="block-influence")
    )
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    out = save_checkpoint(student, tmp_path / "student", source=None, operation=record)
    assert json.loads((out / "config.json").read_text())["head_dim"] == HD  # written explicitly
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings is True
    assert reloaded.lm_head.weight.shape == (256, 36)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(reloaded, tokens), logits(student, tokens), rtol=0, atol=1e-6)


def test_untied_models_keep_a_separate_pruned_lm_head(tmp_path, tokens):
    model = tiny_model("llama", tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    student, record, kept = prune(model, _scores(model), PruneTarget(hidden_size=36))
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, model.lm_head.weight[:, kept.hidden])
    assert torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept.hidden])
    assert record["params_after"] == count_model_params(student)  # both matrices counted
    out = save_checkpoint(student, tmp_path / "student", source=None, operation=record)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings is False
    assert torch.equal(reloaded.lm_head.weight, student.lm_head.weight)
    torch.testing.assert_close(logits(reloaded, tokens), logits(student, tokens), rtol=0, atol=1e-6)


HEAD_EXACT = [f for f in FAMILIES if f not in FULL_QK_NORM]
"""Families where dropping a head that writes nothing leaves the other heads' outputs exactly as they were."""


@pytest.mark.parametrize("family", HEAD_EXACT)
def test_pruning_heads_whose_output_is_dropped_keeps_logits(family, tokens):
    model = tiny_model(family)
    scores = _crafted(model)
    # one head of each KV group per layer writes nothing to the residual stream; scores mark it lowest
    dead = {0: [0, 2, 4], 1: [1, 3, 5], 2: [1, 2, 4], 3: [0, 3, 5]}
    with torch.no_grad():
        for layer, heads in dead.items():
            for h in heads:
                model.model.layers[layer].self_attn.o_proj.weight[:, head_cols(h, HD)] = 0
                scores.heads[layer, h] = 0.0
    student, _, kept = prune(model, scores, PruneTarget(num_attention_heads=3))
    for layer, heads in dead.items():
        assert kept.heads[layer].tolist() == sorted(set(range(6)) - set(heads))
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("family", HEAD_EXACT)
def test_pruning_a_silent_kv_group_keeps_logits(family, tokens):
    model = tiny_model(family)
    scores = _crafted(model)
    dead_group = {0: 1, 1: 0, 2: 2, 3: 1}
    with torch.no_grad():
        for layer, g in dead_group.items():
            for h in (2 * g, 2 * g + 1):  # both query heads that share KV group g
                model.model.layers[layer].self_attn.o_proj.weight[:, head_cols(h, HD)] = 0
                scores.heads[layer, h] = 0.0
    student, _, kept = prune(model, scores, PruneTarget(num_query_groups=2))
    assert student.config.num_key_value_heads == 2 and student.config.num_attention_heads == 4
    for layer, g in dead_group.items():
        assert kept.groups[layer].tolist() == sorted({0, 1, 2} - {g})
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("family", HEAD_EXACT)
def test_real_scores_find_and_prune_a_kv_group_with_zero_values(family, tokens):
    model = tiny_model(family)
    with torch.no_grad():  # V of group 2 is zero in layer 1: its heads output nothing, so they score zero
        v, rows = value_rows(model.model.layers[1], 2, HD)
        v.weight[rows] = 0
        if v.bias is not None:
            v.bias[rows] = 0
    scores = _scores(model)
    assert scores.heads[1, 4] == 0 and scores.heads[1, 5] == 0
    student, _, kept = prune(model, scores, PruneTarget(num_query_groups=2))
    assert kept.groups[1].tolist() == [0, 1]
    assert kept.heads[1].tolist() == [0, 1, 2, 3]
    assert kept.heads.shape == (4, 4)
    # the other layers lose a group too: the logits change, but only by dropping real contributions
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (0, 2, 3):
            lost = set(range(6)) - set(kept.heads[layer].tolist())
            for h in lost:
                ref.model.layers[layer].self_attn.o_proj.weight[:, head_cols(h, HD)] = 0
    torch.testing.assert_close(logits(student, tokens), logits(ref, tokens), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_neurons_with_zero_down_columns_keeps_logits(family, tokens):
    model = tiny_model(family)
    scores = _crafted(model)
    gen = torch.Generator().manual_seed(11)
    dead = {layer: torch.randperm(96, generator=gen)[:32] for layer in range(4)}
    with torch.no_grad():
        for layer, neurons in dead.items():
            model.model.layers[layer].mlp.down_proj.weight[:, neurons] = 0
            scores.mlp[layer, neurons] = 0.0
    student, _, kept = prune(model, scores, PruneTarget(ffn_hidden_size=64))
    for layer, neurons in dead.items():
        assert set(kept.mlp[layer].tolist()).isdisjoint(neurons.tolist())
        assert kept.mlp[layer].tolist() == sorted(kept.mlp[layer].tolist())  # parent order preserved
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", *FUSED])
def test_real_scores_prune_neurons_whose_gate_and_up_rows_are_zero(family, tokens):
    model = tiny_model(family)
    dead = [3, 17, 50, 95]
    with torch.no_grad():
        for layer in model.model.layers:
            zero_neurons(layer, dead)
    student, _, kept = prune(model, _scores(model), PruneTarget(ffn_hidden_size=92))
    for layer in range(4):
        assert kept.mlp[layer].tolist() == [i for i in range(96) if i not in dead]
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_an_identity_layer_keeps_logits(family, tokens):
    model = tiny_model(family)
    with torch.no_grad():  # no write to the residual stream: the layer is an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    student, record, kept = prune(model, random_scores(model.config), PruneTarget(drop_layers=(2,)))
    assert kept.layers.tolist() == [0, 1, 3]
    assert record["dropped_layers"] == [2]
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=1e-5, atol=ATOL)
    # the renumbered layers carry their parent's weights
    assert torch.equal(student.model.layers[2].mlp.down_proj.weight, model.model.layers[3].mlp.down_proj.weight)


def test_block_influence_picks_the_identity_layer(tokens):
    model = tiny_model("mistral")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    _, record, _ = prune(model, _scores(model), PruneTarget(num_layers=3, depth_metric="block-influence"))
    assert record["dropped_layers"] == [1]


def test_kept_heads_belong_to_kept_groups():
    model = tiny_model("llama")
    scores = _crafted(model)
    # make the within-group choice non-trivial: in each layer the higher head of a group alternates
    scores.heads = torch.tensor(
        [
            [1.0, 2.0, 6.0, 5.0, 3.0, 4.0],
            [9.0, 1.0, 2.0, 9.0, 5.0, 5.5],
            [1, 2, 3, 4, 5, 6],
            [6, 5, 4, 3, 2, 1.0],
        ]
    )
    student, _, kept = prune(model, scores, PruneTarget(num_attention_heads=3))
    assert kept.groups.tolist() == [[0, 1, 2]] * 4
    assert kept.heads.tolist() == [[1, 2, 5], [0, 3, 5], [1, 3, 5], [0, 2, 4]]
    assert (kept.heads // 2 == kept.groups).all()
    _check_attention_rows(model, student, kept)

    student, _, kept = prune(model, scores, PruneTarget(num_query_groups=2, num_attention_heads=2))
    # group sums per layer: [3, 11, 7], [10, 11, 10.5], [3, 7, 11], [11, 7, 3]
    assert kept.groups.tolist() == [[1, 2], [1, 2], [1, 2], [0, 1]]
    assert (kept.heads // 2 == kept.groups).all()  # one head per kept group, from that group
    assert kept.heads.tolist() == [[2, 5], [3, 5], [3, 5], [0, 2]]
    _check_attention_rows(model, student, kept)


def _check_attention_rows(parent, student, kept) -> None:
    """q/o carry the kept heads' rows/columns, k/v the kept groups' rows (head_dim blocks, in kept order)."""
    for j, old in enumerate(kept.layers.tolist()):
        p, s = parent.model.layers[old].self_attn, student.model.layers[j].self_attn
        q_rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in kept.heads[j].tolist()])
        kv_rows = torch.cat([torch.arange(g * HD, (g + 1) * HD) for g in kept.groups[j].tolist()])
        assert torch.equal(s.q_proj.weight, p.q_proj.weight[q_rows])
        assert torch.equal(s.k_proj.weight, p.k_proj.weight[kv_rows])
        assert torch.equal(s.v_proj.weight, p.v_proj.weight[kv_rows])
        assert torch.equal(s.o_proj.weight, p.o_proj.weight[:, q_rows])


def test_qwen2_biases_are_sliced_with_their_rows():
    model = tiny_model("qwen2")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    student, _, kept = prune(model, _scores(model), PruneTarget(num_query_groups=2, hidden_size=36))
    for j, old in enumerate(kept.layers.tolist()):
        p, s = model.model.layers[old].self_attn, student.model.layers[j].self_attn
        q_rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in kept.heads[j].tolist()])
        kv_rows = torch.cat([torch.arange(g * HD, (g + 1) * HD) for g in kept.groups[j].tolist()])
        assert s.q_proj.bias.shape == (4 * HD,) and s.k_proj.bias.shape == (2 * HD,) == s.v_proj.bias.shape
        assert torch.equal(s.q_proj.bias, p.q_proj.bias[q_rows])
        assert torch.equal(s.k_proj.bias, p.k_proj.bias[kv_rows])
        assert torch.equal(s.v_proj.bias, p.v_proj.bias[kv_rows])
        assert s.o_proj.bias is None


def test_qwen3_qk_norms_are_untouched():
    model = tiny_model("qwen3")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_()
            layer.self_attn.k_norm.weight.normal_()
    target = PruneTarget(hidden_size=36, num_attention_heads=2, num_query_groups=2, drop_layers=(0,))
    student, _, kept = prune(model, _scores(model), target)
    assert kept.layers.tolist() == [1, 2, 3]
    for j, old in enumerate(kept.layers.tolist()):
        p, s = model.model.layers[old].self_attn, student.model.layers[j].self_attn
        assert torch.equal(s.q_norm.weight, p.q_norm.weight) and s.q_norm.weight.shape == (HD,)
        assert torch.equal(s.k_norm.weight, p.k_norm.weight) and s.k_norm.weight.shape == (HD,)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_types_follow_the_kept_layers(family, tmp_path):
    overrides = dict(use_sliding_window=True, max_window_layers=2, sliding_window=8) if family == "qwen2" else {}
    model = tiny_model(family, **overrides)
    types = getattr(model.config, "layer_types", None)
    student, record, _ = prune(model, random_scores(model.config), PruneTarget(drop_layers=(0, 3)))
    assert student.config.num_hidden_layers == 2 == len(student.model.layers)
    if types is not None:
        assert student.config.layer_types == [types[1], types[2]]
    if family == "qwen2":
        assert types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    out = save_checkpoint(student, tmp_path / "s", source=None, operation=record)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
    if types is not None:
        assert len(reloaded.config.layer_types) == 2
        assert reloaded.config.layer_types == student.config.layer_types


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_count_params_matches_the_model(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    assert count_params(shape_of(model.config)) == count_model_params(model)


BIASED_LLAMA = dict(attention_bias=True, mlp_bias=True)


def test_llama_with_attention_and_mlp_biases_prunes_every_bias(tokens):
    model = tiny_model("llama", **BIASED_LLAMA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    student, _, _ = prune(model, _scores(model), PruneTarget())
    torch.testing.assert_close(logits(student, tokens), logits(model, tokens), rtol=0, atol=1e-6)
    target = PruneTarget(
        hidden_size=36, ffn_hidden_size=64, num_query_groups=2, num_layers=3, depth_metric="block-influence"
    )
    student, _, kept = prune(model, _scores(model), target)
    assert state_shapes(student) == expected_state_shapes(student.config)
    for j, old in enumerate(kept.layers.tolist()):
        p, s = model.model.layers[old], student.model.layers[j]
        assert torch.equal(s.self_attn.o_proj.bias, p.self_attn.o_proj.bias[kept.hidden])
        assert torch.equal(s.mlp.gate_proj.bias, p.mlp.gate_proj.bias[kept.mlp[j]])
        assert torch.equal(s.mlp.down_proj.bias, p.mlp.down_proj.bias[kept.hidden])


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", dict(attention_bias=True)),
        ("llama", dict(mlp_bias=True)),
        ("qwen3", dict(attention_bias=True)),
    ],
    ids=["llama-attention_bias", "llama-mlp_bias", "qwen3-attention_bias"],
)
def test_count_params_matches_models_with_optional_biases(family, overrides):
    model = tiny_model(family, **overrides)
    assert count_params(shape_of(model.config)) == count_model_params(model)


@pytest.mark.parametrize(
    "target,message",
    [
        (dict(hidden_size=64), "must not exceed the model's sizes: hidden_size 64 > 48"),
        (dict(ffn_hidden_size=1000), "ffn_hidden_size 1000 > 96"),
        (dict(num_attention_heads=12), "num_attention_heads 12 > 6"),
        (dict(num_query_groups=4), "num_query_groups 4 > 3"),
        (dict(num_layers=5), "num_layers 5 > 4"),
        (dict(num_attention_heads=4), "must be a multiple of num_query_groups (3)"),
        (dict(num_attention_heads=2, num_query_groups=3), "must be a multiple of num_query_groups"),
        (
            dict(num_attention_heads=6, num_query_groups=2),
            "would need 3 heads per group, but the model has 2",
        ),
        (dict(drop_layers=(1, 4)), "--drop-layers [4] out of range: the model has layers 0-3"),
        (dict(drop_layers=(-1,)), "out of range"),
        (dict(drop_layers=(0, 1, 2, 3)), "would remove every layer"),
        (dict(hidden_size=40), "multiple of 6"),
    ],
)
def test_plan_refuses_impossible_targets(target, message):
    with pytest.raises(CompactLMError) as info:
        plan(tiny_config("llama"), PruneTarget(**target))
    assert message in str(info.value)


def test_plan_names_the_config_class_when_hidden_is_not_a_multiple_of_heads():
    with pytest.raises(CompactLMError, match="LlamaConfig .*refuses the pruned shape.*multiple of"):
        plan(tiny_config("llama"), PruneTarget(hidden_size=40))
    # with heads pruned to a divisor of the new hidden size the same hidden size is fine
    shape, config = plan(tiny_config("llama"), PruneTarget(hidden_size=40, num_attention_heads=4, num_query_groups=2))
    assert (shape.hidden_size, shape.num_attention_heads, shape.head_dim) == (40, 4, 16)
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    assert "transformers_version" not in config and "_name_or_path" not in config


def test_plan_takes_query_heads_along_with_dropped_groups():
    shape, config = plan(tiny_config("qwen3"), PruneTarget(num_query_groups=1, num_layers=2))
    assert (shape.num_query_groups, shape.num_attention_heads, shape.num_layers) == (1, 2, 2)
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_layers=2, drop_layers=(1,)), "either --num-layers or --drop-layers, not both"),
        (dict(ffn_hidden_size=0), "--ffn-hidden-size must be a positive integer"),
        (dict(hidden_size=32.0), "--hidden-size must be a positive integer"),
        (
            dict(depth_metric="random"),
            "--depth-metric: unknown depth metric 'random'; choose one of block-loss, layer-loss, block-influence "
            "or task:NAME",
        ),
    ],
)
def test_prune_target_rejects_bad_values(kwargs, message):
    with pytest.raises(CompactLMError) as info:
        PruneTarget(**kwargs)
    assert message in str(info.value)


def test_prune_target_normalizes_drop_layers():
    assert PruneTarget(drop_layers=[3, 1, 3]).drop_layers == (1, 3)


@pytest.mark.parametrize(
    "target,needed",
    [
        (PruneTarget(), False),
        (PruneTarget(drop_layers=(1, 2)), False),
        (PruneTarget(ffn_hidden_size=96, num_layers=4), False),  # the model's own sizes: nothing to choose
        (PruneTarget(num_layers=3), True),
        (PruneTarget(ffn_hidden_size=64), True),
        (PruneTarget(num_query_groups=2, drop_layers=(0,)), True),
        (PruneTarget(hidden_size=36), True),
    ],
)
def test_needs_scores_only_when_importance_chooses_something(target, needed):
    assert needs_scores(tiny_config("llama"), target) is needed


@pytest.mark.parametrize(
    "text,want",
    [
        ("16-29", tuple(range(16, 30))),
        ("3,5,10-12", (3, 5, 10, 11, 12)),
        (" 7 , 2-3 ,", (7, 2, 3)),
        ("4-4", (4,)),
    ],
)
def test_parse_layer_ranges(text, want):
    assert parse_layer_ranges(text) == want


@pytest.mark.parametrize("text", ["a-b", "5-3", "1,x", "1-2-3", "3:5"])
def test_parse_layer_ranges_rejects_bad_strings(text):
    with pytest.raises(CompactLMError, match="cannot read layer list .*16-29 or 3,5,10-12"):
        parse_layer_ranges(text)
