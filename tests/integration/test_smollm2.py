"""Integration: importance and pruning on the bundled real model (SmolLM2-135M) and real held-out text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm.compress.checkpoint import load_model, load_tokenizer
from compactlm.compress.data import load_sequences
from compactlm.compress.evaluate import count_model_params, perplexity
from compactlm.compress.importance import ImportanceConfig, estimate_importance, random_scores
from compactlm.compress.models import pull
from compactlm.compress.operations import prune_checkpoint
from compactlm.compress.prune import PruneTarget, plan, prune
from compactlm.core.errors import CompactLMError

pytestmark = pytest.mark.integration

WIDTH = PruneTarget(hidden_size=432, ffn_hidden_size=1024)
DEPTH = PruneTarget(num_layers=16)


@pytest.fixture(scope="module")
def teacher_path():
    return pull("smollm2-135m")


@pytest.fixture(scope="module")
def teacher(teacher_path):
    return load_model(teacher_path)


@pytest.fixture(scope="module")
def tokenizer(teacher_path):
    return load_tokenizer(teacher_path)


@pytest.fixture(scope="module")
def heldout(tokenizer):
    return load_sequences("python-docs", tokenizer, num_sequences=8, seq_len=256, split="heldout")


@pytest.fixture(scope="module")
def scores(teacher, tokenizer):
    calibration = load_sequences("python-docs", tokenizer, num_sequences=32, seq_len=128, split="train")
    return estimate_importance(teacher, calibration, ImportanceConfig(block_sizes=(1, 14), depth_samples=4))


def _greedy(model, tokenizer, prompt: str, tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_bundled_model_is_real(teacher, tokenizer, heldout):
    assert count_model_params(teacher) == 134_515_008
    assert "Paris" in _greedy(teacher, tokenizer, "The capital of France is")
    ppl = perplexity(teacher, heldout).perplexity
    assert 5 < ppl < 30  # ~13 measured on python-docs held out


@pytest.mark.parametrize(
    ("name", "target", "params_m"),
    [("width", WIDTH, (80.0, 82.0)), ("depth", DEPTH, (84.0, 86.0))],
)
def test_students_load_in_transformers_and_generate(
    name, target, params_m, teacher, scores, tokenizer, heldout, tmp_path
):
    out = tmp_path / name
    result = prune_checkpoint(teacher, out, target, scores=scores)
    # A standard checkpoint: plain transformers, no custom code.
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 64
    assert config["num_hidden_layers"] == (16 if name == "depth" else 30)
    assert config["hidden_size"] == (432 if name == "width" else 576)
    assert config["intermediate_size"] == (1024 if name == "width" else 1536)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert params_m[0] < count_model_params(student) / 1e6 < params_m[1]
    assert result["record"]["params_after"] == count_model_params(student)
    assert (out / "tokenizer.json").is_file()
    record = json.loads((out / "compactlm.json").read_text())
    assert record["history"][-1]["op"] == "prune"
    assert record["history"][-1]["importance"]["samples"] == 32
    assert len(_greedy(student, load_tokenizer(out), "The capital of France is").strip()) > 0
    assert math.isfinite(perplexity(student, heldout).perplexity)


@pytest.mark.parametrize("target", [WIDTH, DEPTH], ids=["width", "depth"])
def test_importance_beats_random_pruning(target, teacher, scores, heldout):
    guided, _, _ = prune(teacher, scores, target)
    guided_ppl = perplexity(guided, heldout).perplexity
    for seed in (0, 1):
        random_student, _, _ = prune(teacher, random_scores(teacher.config, seed, block_sizes=(1, 14)), target)
        assert guided_ppl < perplexity(random_student, heldout).perplexity


def test_identity_prune_on_the_real_model(teacher, scores, heldout):
    same, _, _ = prune(teacher, scores, PruneTarget(hidden_size=576, ffn_hidden_size=1536, num_layers=30))
    with torch.inference_mode():
        assert torch.equal(same(heldout[:2]).logits, teacher(heldout[:2]).logits)


def test_smollm2_hidden_size_must_be_a_multiple_of_its_nine_heads(teacher):
    with pytest.raises(CompactLMError, match="multiple of 9"):
        plan(teacher.config, PruneTarget(hidden_size=384))
    plan(teacher.config, PruneTarget(hidden_size=384, num_attention_heads=6, num_query_groups=2))  # heads too: fine


def test_depth_scores_rank_real_layers(scores):
    per_layer = scores.removal_loss[1]
    assert per_layer.shape == (30,)
    assert bool((per_layer > scores.base_loss - 1e-3).all())  # removing a real layer never helps much
    assert scores.block_influence[14].shape == (17,)
    assert scores.removal_loss[14].min() > per_layer.min()


def test_a_few_distillation_steps_win_back_held_out_loss(teacher_path, teacher, scores, tokenizer, tmp_path):
    from compactlm.compress.retrain import distill_checkpoint
    from compactlm.compress.train_config import DistillConfig, TrainConfig

    student = prune_checkpoint(teacher, tmp_path / "depth", DEPTH, scores=scores)["path"]
    heldout = load_sequences("python-docs", tokenizer, num_sequences=4, seq_len=128, split="heldout")
    before = perplexity(load_model(student), heldout).loss
    record = distill_checkpoint(
        teacher_path,
        student,
        tmp_path / "depth-kd",
        train_cfg=TrainConfig(steps=4, seq_len=128, batch_size=2, lr=3e-4, min_lr=3e-5),
        distill_cfg=DistillConfig(loss="logit+hidden"),
        eval_samples=4,
    )
    assert record["loss"] == "logit+hidden" and record["steps"] == 4
    assert record["heldout_loss"] < before - 0.3  # 7.5 -> ~6 nats after 4 steps, measured
    history = json.loads((tmp_path / "depth-kd" / "compactlm.json").read_text())["history"]
    assert [op["op"] for op in history] == ["prune", "distill"]


def test_the_run_command_plans_the_repo_recipe_and_refuses_bad_input_in_one_line(teacher_path):
    from tests.helpers import REPO

    RECIPE = REPO / "recipes" / "smollm2-minitron.yaml"
    import subprocess
    import sys

    compactlm = Path(sys.executable).with_name("compactlm")
    plan = subprocess.run([compactlm, "run", RECIPE, "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert plan.returncode == 0, plan.stderr
    shown = plan.stdout + plan.stderr
    assert "distill/width" in shown and "sweep/depth-int8" in shown and "draft" in shown and "26 stages" in shown
    bad = subprocess.run(
        [compactlm, "run", RECIPE, "--set", "distill.tokenz=1"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2
    assert (
        "--set distill.tokenz=1: unknown key 'tokenz' in distill" in bad.stdout + bad.stderr
        and "Traceback" not in bad.stderr
    )
