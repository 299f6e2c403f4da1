"""Mixtures of experts (Mixtral, Qwen2-MoE with its shared expert and a dense layer, Qwen3-MoE): expert importance,
pruning the number of experts, each expert's FFN and the shared expert's, through depth cuts; shapes and configs
asserted, reloads with AutoModelForCausalLM, exact where the removed units compute nothing.
The cut + distillation test every family shares is in test_families.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm.compress.arch import count_params, moe_layer_indices, shape_of
from compactlm.compress.checkpoint import save_checkpoint
from compactlm.compress.evaluate import count_model_params
from compactlm.compress.importance import (
    EXPERT_METRICS,
    ImportanceConfig,
    ImportanceScores,
    estimate_importance,
    random_scores,
)
from compactlm.compress.prune import PruneTarget, prune
from compactlm.core.errors import CompactLMError
from tests.helpers import MOE, cli, logits, random_tokens, state_shapes, tiny_model

EXPERTS, TOP_K = 8, 2
FFN = {"mixtral": 96, "qwen2_moe": 32, "qwen3_moe": 32}
"""Each tiny family's expert width (tests/helpers.py `_quirks`)."""


def _scores(model, tokens=None, **config):
    tokens = random_tokens(4, 16, seed=7) if tokens is None else tokens
    return estimate_importance(model, tokens, ImportanceConfig(removal_loss=False, **config))


def _experts(layer):
    return layer.mlp.experts


def expected_moe_shapes(config) -> dict[str, tuple[int, ...]]:
    """The MLP parameters a model of this MoE config must have (in transformers' in-memory layout), derived here."""
    d = config.hidden_size
    family = config.model_type
    experts = config.num_local_experts if family == "mixtral" else config.num_experts
    ffn = config.intermediate_size if family == "mixtral" else config.moe_intermediate_size
    dense = set(getattr(config, "mlp_only_layers", []) or [])
    shapes = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        if i in dense:
            f = config.intermediate_size
            shapes |= {p + "gate_proj.weight": (f, d), p + "up_proj.weight": (f, d), p + "down_proj.weight": (d, f)}
            continue
        shapes |= {
            p + "gate.weight": (experts, d),
            p + "experts.gate_up_proj": (experts, 2 * ffn, d),
            p + "experts.down_proj": (experts, d, ffn),
        }
        if family == "qwen2_moe":
            s = config.shared_expert_intermediate_size
            shapes |= {
                p + "shared_expert.gate_proj.weight": (s, d),
                p + "shared_expert.up_proj.weight": (s, d),
                p + "shared_expert.down_proj.weight": (d, s),
                p + "shared_expert_gate.weight": (1, d),
            }
    return shapes


def _mlp_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in state_shapes(model).items() if ".mlp." in k}


@pytest.mark.parametrize("family", MOE)
def test_keeping_every_expert_and_neuron_is_the_identity(family, tokens):
    teacher = tiny_model(family)
    target = PruneTarget(num_experts=EXPERTS, moe_ffn_hidden_size=FFN[family])
    student, record, kept = prune(teacher, _scores(teacher), target)
    assert torch.equal(logits(student, tokens), logits(teacher, tokens))
    assert torch.equal(kept.experts, torch.arange(EXPERTS).expand(4, EXPERTS))
    assert record["params_after"] == record["params_before"] == count_model_params(teacher)


@pytest.mark.parametrize("family", MOE)
def test_an_expert_cut_has_the_shapes_and_config_it_claims_and_reloads(family, tmp_path):
    teacher = tiny_model(family)
    shared = {"shared_expert_ffn_hidden_size": 40} if family == "qwen2_moe" else {}
    target = PruneTarget(
        num_experts=5, moe_ffn_hidden_size=FFN[family] // 2, hidden_size=32, drop_layers=(0,), **shared
    )
    student, record, kept = prune(teacher, _scores(teacher), target)
    config = student.config
    experts_key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(config, experts_key) == 5 and config.num_experts_per_tok == TOP_K
    if family == "mixtral":
        assert config.intermediate_size == 48
    else:
        assert config.moe_intermediate_size == 16 and config.intermediate_size == teacher.config.intermediate_size
    if family == "qwen2_moe":  # the dense layer was layer 2 of 4: after dropping layer 0 it is layer 1
        assert config.shared_expert_intermediate_size == 40
        assert config.mlp_only_layers == [1] and moe_layer_indices(config) == (0, 2)
    assert _mlp_shapes(student) == expected_moe_shapes(config)
    assert kept.experts.shape == (3, 5) and kept.expert_mlp.shape == (3, 5, FFN[family] // 2)
    assert record["params_after"] == count_params(shape_of(config)) == count_model_params(student)
    assert record["params_after"] < record["params_before"]
    out = save_checkpoint(student, tmp_path / "student", source=None, operation=record)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(teacher)
    probe = random_tokens(2, 24, seed=5)
    torch.testing.assert_close(logits(reloaded, probe), logits(student, probe), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE)
def test_each_kept_expert_brings_its_own_router_row_and_neurons(family):
    teacher = tiny_model(family)
    student, _, kept = prune(
        teacher, random_scores(teacher.config, seed=3), PruneTarget(num_experts=3, moe_ffn_hidden_size=8)
    )
    f = FFN[family]
    for j, i in enumerate(kept.layers.tolist()):
        if i not in moe_layer_indices(teacher.config):
            continue
        old, new = teacher.model.layers[i].mlp, student.model.layers[j].mlp
        for slot, e in enumerate(kept.experts[j].tolist()):
            m = kept.expert_mlp[j, slot]
            assert torch.equal(new.gate.weight[slot], old.gate.weight[e])
            gate_up = old.experts.gate_up_proj[e]
            assert torch.equal(new.experts.gate_up_proj[slot], torch.cat([gate_up[m], gate_up[f + m]]))
            assert torch.equal(new.experts.down_proj[slot], old.experts.down_proj[e][:, m])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])  # top-k weights renormalized over the chosen experts
@pytest.mark.parametrize("metric", ["contribution", "frequency", "reap"])
def test_experts_no_token_routes_to_are_ranked_last_and_removing_them_is_exact(family, metric):
    """Two tokens pick at most 4 of the 8 experts per layer: keeping 4 by a routing-based metric keeps every expert
    used, so routing and the renormalized weights are unchanged. (Qwen2-MoE leaves its weights unnormalized, so
    there the other experts' probabilities still change the result.)"""
    teacher = tiny_model(family)
    tokens = random_tokens(1, 2, seed=11)
    used: dict[int, set] = {}
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(
            lambda _m, args, i=i: used.setdefault(i, set()).update(args[1].unique().tolist())
        )
        for i, layer in enumerate(teacher.model.layers)
    ]
    teacher(input_ids=tokens)
    for hook in hooks:
        hook.remove()
    scores = _scores(teacher, tokens)
    student, _, kept = prune(teacher, scores, PruneTarget(num_experts=4, expert_metric=metric))
    for i, experts in used.items():
        assert experts <= set(kept.experts[i].tolist())
        unused = sorted(set(range(EXPERTS)) - experts)
        assert (scores.experts[metric][i, unused] == 0).all() and (scores.experts[metric][i, sorted(experts)] > 0).all()
    torch.testing.assert_close(logits(student, tokens), logits(teacher, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_expert_neurons_that_compute_nothing_are_the_ones_cut(family, tokens):
    teacher = tiny_model(family)
    f = FFN[family]
    dead = {e: [(3 * e + k) % f for k in range(4)] for e in range(EXPERTS)}  # different neurons in each expert
    with torch.no_grad():
        for layer in teacher.model.layers:
            if hasattr(layer.mlp, "experts"):
                for e, neurons in dead.items():
                    layer.mlp.experts.gate_up_proj[e, [*neurons, *(f + n for n in neurons)]] = 0
    scores = _scores(teacher)
    student, _, kept = prune(teacher, scores, PruneTarget(moe_ffn_hidden_size=f - 4))
    for j, i in enumerate(kept.layers.tolist()):
        if i in moe_layer_indices(teacher.config):
            for e in range(EXPERTS):
                assert kept.expert_mlp[j, e].tolist() == [n for n in range(f) if n not in dead[e]]
    torch.testing.assert_close(logits(student, tokens), logits(teacher, tokens), rtol=0, atol=1e-5)


def test_qwen2_moe_shared_expert_and_dense_layer_are_pruned_like_mlps(tokens):
    teacher = tiny_model("qwen2_moe")
    dense_layer = teacher.config.mlp_only_layers[0]
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            mlp = layer.mlp.shared_expert if i != dense_layer else layer.mlp
            mlp.gate_proj.weight[:8] = 0  # neurons 0-7 of every shared expert and of the dense MLP
            mlp.up_proj.weight[:8] = 0
    scores = _scores(teacher)
    assert (scores.shared_mlp[dense_layer] == 0).all()  # a dense layer has no shared expert
    assert (scores.mlp[[i for i in range(4) if i != dense_layer]] == 0).all()  # MoE layers have no dense MLP
    student, _, kept = prune(teacher, scores, PruneTarget(shared_expert_ffn_hidden_size=56, ffn_hidden_size=88))
    assert student.config.shared_expert_intermediate_size == 56 and student.config.intermediate_size == 88
    assert kept.shared_mlp[0].tolist() == list(range(8, 64)) and kept.mlp[dense_layer].tolist() == list(range(8, 96))
    torch.testing.assert_close(logits(student, tokens), logits(teacher, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_expert_scores_add_up_as_routing_does(family):
    """Per token the router's probabilities sum to 1 and it picks TOP_K distinct experts; the experts' summed
    contributions bound the norm of what they add together (triangle inequality)."""
    teacher = tiny_model(family)
    outputs: dict[int, list] = {}
    hooks = [
        layer.mlp.experts.register_forward_hook(lambda _m, _a, out, i=i: outputs.setdefault(i, []).append(out))
        for i, layer in enumerate(teacher.model.layers)
        if hasattr(layer.mlp, "experts")
    ]
    scores = _scores(teacher)
    for hook in hooks:
        hook.remove()
    for i in moe_layer_indices(teacher.config):
        torch.testing.assert_close(scores.experts["router_prob"][i].sum(), torch.tensor(1.0))
        torch.testing.assert_close(scores.experts["frequency"][i].sum(), torch.tensor(float(TOP_K)))
        combined = torch.linalg.vector_norm(torch.cat(outputs[i]), dim=-1).mean()
        assert scores.experts["contribution"][i].sum() >= combined - 1e-5
        assert (scores.experts["reap"][i] >= scores.experts["contribution"][i] - 1e-7).all()


def test_expert_neuron_scores_reduce_over_each_samples_routed_tokens_then_over_samples():
    """mean over a sample's tokens routed to the expert, then L2 over the samples that routed any (the defaults),
    computed here from the routing the model really did."""
    teacher = tiny_model("mixtral")
    tokens = random_tokens(3, 8, seed=2)
    routed = []
    hook = teacher.model.layers[1].mlp.experts.register_forward_pre_hook(lambda _m, args: routed.append(args))
    scores = _scores(teacher, tokens)
    hook.remove()
    hidden, index, _ = routed[0]
    experts = teacher.model.layers[1].mlp.experts
    for e in range(EXPERTS):
        per_sample = []
        for sample in range(3):
            rows = [t for t in range(sample * 8, sample * 8 + 8) if e in index[t].tolist()]
            if rows:
                gate, up = (hidden[rows] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
                per_sample.append((experts.act_fn(gate) * up).abs().mean(0))
        want = torch.stack(per_sample).pow(2).sum(0).sqrt() if per_sample else torch.zeros(FFN["mixtral"])
        torch.testing.assert_close(scores.expert_mlp[1, e], want, rtol=1e-4, atol=1e-6)


def test_moe_scores_round_trip_and_dense_scores_are_refused(tmp_path):
    teacher = tiny_model("qwen2_moe")
    scores = _scores(teacher)
    loaded = ImportanceScores.load(scores.save(tmp_path / "scores.safetensors"))
    assert set(loaded.experts) == set(EXPERT_METRICS)
    for metric in EXPERT_METRICS:
        assert torch.equal(loaded.experts[metric], scores.experts[metric])
    assert torch.equal(loaded.expert_mlp, scores.expert_mlp) and torch.equal(loaded.shared_mlp, scores.shared_mlp)
    dense = ImportanceScores(mlp=scores.mlp, heads=scores.heads, hidden=scores.hidden, meta={"model": "a dense one"})
    with pytest.raises(CompactLMError, match="no experts.contribution scores"):
        prune(teacher, dense, PruneTarget(num_experts=4))


@pytest.mark.parametrize(
    ("family", "target", "message"),
    [
        ("llama", PruneTarget(num_experts=4), "--num-experts: llama is not a mixture-of-experts model"),
        ("mixtral", PruneTarget(num_experts=1), "--num-experts 1 is fewer than the 2 experts the router picks"),
        ("mixtral", PruneTarget(shared_expert_ffn_hidden_size=8), "mixtral has no shared expert"),
        ("mixtral", PruneTarget(ffn_hidden_size=48), "every layer of this mixtral model routes to experts"),
        ("qwen3_moe", PruneTarget(ffn_hidden_size=48), "prune the experts' width with --moe-ffn-hidden-size"),
        ("qwen3_moe", PruneTarget(num_experts=9), "num_experts 9 > 8"),
        ("qwen2_moe", PruneTarget(moe_ffn_hidden_size=33), "moe_ffn_hidden_size 33 > 32"),
    ],
)
def test_impossible_expert_targets_are_refused_before_any_work(family, target, message):
    from compactlm.compress.prune import plan
    from tests.helpers import tiny_config

    with pytest.raises(CompactLMError, match=message):
        plan(tiny_config(family), target)


def test_an_unknown_expert_metric_is_refused():
    with pytest.raises(CompactLMError, match="--expert-metric must be one of contribution, router_prob"):
        PruneTarget(num_experts=4, expert_metric="popularity")


def test_cli_prunes_experts_and_records_the_kept_ones(tmp_path):
    from safetensors.torch import load_file

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "moe")
    out = tmp_path / "student"
    result = cli("compress", "prune", tmp_path / "moe", out, "--num-experts", "4", "--moe-ffn-hidden-size", "16",
                 "--random-seed", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 4 and reloaded.config.moe_intermediate_size == 16
    import json

    step = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert step["target"]["num_experts"] == 4 and step["to_shape"]["num_experts"] == 4
    assert load_file(out / step["kept_indices"])["experts"].shape == (4, 4)
    result = cli("compress", "prune", tmp_path / "moe", tmp_path / "bad", "--num-experts", "1", "--random-seed", "0")
    assert result.exit_code != 0 and "fewer than the 2 experts" in str(result.exception)
    assert not (tmp_path / "bad").exists()


def test_the_architecture_search_says_it_covers_dense_models():
    from compactlm.compress.search_space import SearchSpace, enumerate_candidates
    from tests.helpers import tiny_config

    with pytest.raises(CompactLMError, match="covers dense models; this mixtral is a mixture of experts"):
        enumerate_candidates(tiny_config("mixtral"), SearchSpace(params=0.7))


def test_the_experts_table_lists_moe_layers_least_important_first():
    from rich.console import Console

    from compactlm.compress.tables import experts_table

    teacher = tiny_model("qwen2_moe")
    scores = _scores(teacher)
    table = experts_table(scores)
    moe = moe_layer_indices(teacher.config)
    assert [int(c) for c in table.columns[0]._cells] == list(moe)  # the dense layer has no row
    for layer, cells in zip(moe, table.columns[1]._cells, strict=True):
        first = int(cells.split()[0])
        assert first == int(scores.experts["contribution"][layer].argmin())
    console = Console(width=200, record=True)
    console.print(table)
    assert "least important first" in console.export_text()
    assert experts_table(_scores(tiny_model("llama"))) is None
