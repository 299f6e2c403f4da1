"""What each family adds to the Llama shape, and the whole compress path on each: importance, a width + depth cut,
a reload with AutoModelForCausalLM, and a distillation (logit, hidden and embedding losses) that lowers the loss.
The shape and exactness tests every family shares are in test_prune.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm.compress.arch import FAMILIES as SUPPORTED
from compactlm.compress.arch import count_params, family_of, shape_of
from compactlm.compress.checkpoint import save_checkpoint
from compactlm.compress.distill import Distillation, Lineage
from compactlm.compress.evaluate import count_model_params
from compactlm.compress.importance import ImportanceConfig, estimate_importance, random_scores
from compactlm.compress.prune import PruneTarget, prune
from compactlm.compress.train import Batch, TrainingData, train
from compactlm.compress.train_config import DistillConfig, TrainConfig
from compactlm.core.errors import CompactLMError
from tests.helpers import FAMILIES, GEMMA, MOE, logits, random_tokens, tiny_config, tiny_model

HD = 16
CUT = PruneTarget(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, num_layers=3)


def _scores(model, removal_loss: bool = False):
    config = ImportanceConfig(removal_loss=removal_loss, depth_samples=2)
    return estimate_importance(model, random_tokens(4, 16, seed=7), config)


def test_the_tests_build_every_supported_family_and_nothing_else():
    assert set(FAMILIES) | set(MOE) == set(SUPPORTED)


def _cut(config) -> PruneTarget:
    """CUT, and in a mixture of experts half the experts, half of each one's neurons and of the shared expert's,
    instead of the dense MLP (which Mixtral and Qwen3-MoE do not have)."""
    shape = shape_of(config)
    if not shape.num_experts:
        return CUT
    return replace(
        CUT,
        ffn_hidden_size=CUT.ffn_hidden_size if shape.moe_layers < shape.num_layers else None,
        num_experts=shape.num_experts // 2,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size // 2,
        shared_expert_ffn_hidden_size=shape.shared_expert_ffn_hidden_size // 2 or None,
    )


@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_a_cut_student_reloads_and_distillation_lowers_its_loss(family, tmp_path):
    teacher = tiny_model(family)
    scores = _scores(teacher, removal_loss=True)  # each layer's removal loss too
    student, record, kept = prune(teacher, scores, _cut(teacher.config))
    assert record["params_after"] == count_params(shape_of(student.config)) == count_model_params(student)
    out = save_checkpoint(student, tmp_path / "student", source=None, operation=record)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(teacher)
    probe_tokens = random_tokens(2, 24, seed=5)
    torch.testing.assert_close(logits(reloaded, probe_tokens), logits(student, probe_tokens), rtol=0, atol=1e-6)
    if getattr(teacher.config, "layer_types", None):  # the kept layers keep their sliding/full types
        assert reloaded.config.layer_types == [teacher.config.layer_types[i] for i in kept.layers.tolist()]

    loss = "logit+hidden+embedding"
    objective = Distillation(
        DistillConfig(loss=loss),
        loss,
        teacher=teacher,
        lineage=Lineage(layers=kept.layers.tolist(), hidden=kept.hidden),
        student_width=student.config.hidden_size,
        teacher_width=teacher.config.hidden_size,
    )
    data = TrainingData(random_tokens(4, 16, seed=4), seed=0)
    probe = Batch(torch.arange(4), data.sequences)
    with torch.no_grad():
        before, before_parts = objective.loss(student, probe)
    cfg = TrainConfig(steps=10, batch_size=4, lr=3e-3, min_lr=1e-4, warmup_steps=1, save_every=0)
    train(student, objective, data, cfg, tmp_path / "work")
    with torch.no_grad():
        after, after_parts = objective.loss(student, probe)
    assert after.item() < 0.8 * before.item(), (before_parts, after_parts)
    assert set(before_parts) >= {"kd", "hidden", "embedding"}


@pytest.mark.parametrize("family", GEMMA)
def test_a_gemma_hidden_cut_keeps_what_enters_the_residual_stream(family, tokens):
    """Gemma multiplies its embeddings by sqrt(hidden_size): the cut student's scaled embedding at the kept
    channels must be the teacher's, not the teacher's times sqrt(36 / 48)."""
    teacher = tiny_model(family)
    student, _, kept = prune(teacher, _scores(teacher), PruneTarget(hidden_size=36))
    with torch.no_grad():
        want = teacher.model.embed_tokens(tokens)[..., kept.hidden]
        got = student.model.embed_tokens(tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", GEMMA)
def test_a_gemma_hidden_cut_keeps_the_tied_heads_logits(family):
    """The LM head is the (rescaled) embedding matrix: the final norm takes the inverse scale, so a final hidden
    state gives the logits the teacher's norm and head give it at the kept channels."""
    teacher = tiny_model(family)
    assert teacher.config.tie_word_embeddings
    student, _, kept = prune(teacher, _scores(teacher), PruneTarget(hidden_size=36))
    x = torch.randn(3, 36, generator=torch.Generator().manual_seed(2))
    eps = teacher.config.rms_norm_eps
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    with torch.no_grad():
        want = (normed * (1.0 + teacher.model.norm.weight[kept.hidden])) @ teacher.lm_head.weight[:, kept.hidden].T
        got = student.lm_head(student.model.norm(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    factor = math.sqrt(48 / 36)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight[:, kept.hidden] * factor)


def test_olmo2_q_and_k_norms_are_sliced_with_their_heads():
    teacher = tiny_model("olmo2")
    with torch.no_grad():  # distinct entries, so that a wrong slice shows
        for layer in teacher.model.layers:
            layer.self_attn.q_norm.weight.copy_(torch.arange(6 * HD, dtype=torch.float32))
            layer.self_attn.k_norm.weight.copy_(torch.arange(3 * HD, dtype=torch.float32))
    student, _, kept = prune(teacher, random_scores(teacher.config, seed=1), PruneTarget(num_query_groups=2))
    for j, layer in enumerate(student.model.layers):
        q_rows = (kept.heads[j][:, None] * HD + torch.arange(HD)).reshape(-1)
        kv_rows = (kept.groups[j][:, None] * HD + torch.arange(HD)).reshape(-1)
        assert torch.equal(layer.self_attn.q_norm.weight, q_rows.float())
        assert torch.equal(layer.self_attn.k_norm.weight, kv_rows.float())
    assert not hasattr(student.model.layers[0], "input_layernorm")  # OLMo 2 normalizes after, not before


def test_phi3_fused_projections_are_sliced_part_by_part():
    teacher = tiny_model("phi3")
    student, _, kept = prune(teacher, _scores(teacher), PruneTarget(ffn_hidden_size=64, num_query_groups=2))
    hid = kept.hidden
    for j, old in enumerate(kept.layers.tolist()):
        p, s = teacher.model.layers[old], student.model.layers[j]
        q_rows = (kept.heads[j][:, None] * HD + torch.arange(HD)).reshape(-1)
        kv_rows = (kept.groups[j][:, None] * HD + torch.arange(HD)).reshape(-1)
        qkv = p.self_attn.qkv_proj.weight
        q, k, v = qkv[: 6 * HD], qkv[6 * HD : 9 * HD], qkv[9 * HD :]
        want = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])[:, hid]
        assert torch.equal(s.self_attn.qkv_proj.weight, want)
        gate, up = p.mlp.gate_up_proj.weight[:96], p.mlp.gate_up_proj.weight[96:]
        m = kept.mlp[j]
        assert torch.equal(s.mlp.gate_up_proj.weight, torch.cat([gate[m], up[m]])[:, hid])


def test_granite_keeps_its_multipliers():
    teacher = tiny_model("granite")
    student, _, _ = prune(teacher, _scores(teacher, removal_loss=True), PruneTarget(hidden_size=32, num_layers=3))
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert getattr(student.config, key) == getattr(teacher.config, key) != 1.0


def test_an_unsupported_architecture_is_named_with_the_supported_ones():
    config = tiny_config("llama")
    config.model_type = "gpt_neox"
    with pytest.raises(CompactLMError) as info:
        family_of(config)
    message = str(info.value)
    assert "unsupported architecture 'gpt_neox'" in message
    assert all(name in message for name in ("gemma2", "gemma3_text", "phi3", "olmo2", "granite"))
    assert "\n" not in message
