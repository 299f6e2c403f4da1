"""One TrainConfig: the retraining commands, chain files and the job recipe take the same training keys with the
same defaults; a command's --config file is read by the same loader, with flags laid over it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer

import compactlm.compress.retrain
from compactlm.cli.root import app
from compactlm.compress.chain import load_chain
from compactlm.compress.train_config import CACHE_FIELDS, DistillConfig, DistillRun, TrainConfig
from compactlm.core.config import fields_of
from compactlm.core.errors import CompactLMError
from compactlm.job.pipeline import estimates
from compactlm.job.recipe import Correction, Distill, load_job_recipe
from tests.helpers import cli

TRAIN = set(fields_of(TrainConfig))
OBJECTIVE = set(fields_of(DistillConfig))


def _options(*path: str) -> dict:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p.default for p in command.params}


def test_the_retraining_commands_take_every_training_option_with_no_default_of_their_own():
    distill, correct, cache = (_options("compress", c) for c in ("distill", "correct-teacher", "cache-logits"))
    assert TRAIN | OBJECTIVE <= set(distill) and TRAIN <= set(correct)
    assert set(cache) & TRAIN == set(CACHE_FIELDS)  # only what decides the rows a distillation reads
    # not given = None: the dataclass's own default applies
    assert all(distill[k] is None for k in TRAIN | OBJECTIVE) and all(correct[k] is None for k in TRAIN)


def test_a_command_left_to_its_defaults_trains_with_the_dataclass_defaults(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(compactlm.compress.retrain, "distill_checkpoint", lambda *a, **k: calls.append(k) or {})
    monkeypatch.setattr("compactlm.cli.train._report", lambda record, out: None)
    result = cli("compress", "distill", "--teacher", "t", "--student", "s", "--out", tmp_path / "o", "--tokens", "64")
    assert result.exit_code == 0, result.output
    assert calls[0]["train_cfg"] == TrainConfig(tokens=64) and calls[0]["distill_cfg"] == DistillConfig()
    result = cli("compress", "distill", "--teacher", "t", "--student", "s", "--out", tmp_path / "o", "--lr", "0")
    assert isinstance(result.exception, CompactLMError) and "need 0 < --min-lr (1e-05) <= --lr (0.0)" in str(
        result.exception
    )


def test_chain_stages_take_the_same_keys_with_the_same_defaults(tmp_path):
    every = {f.name: f.default for f in dataclasses.fields(DistillRun)} | {"tokens": 64}
    stage = "{name: a, prune: {num_layers: 2}, distill: " + json.dumps(every) + "}"
    path = tmp_path / "chain.yaml"
    path.write_text(f"teacher: t\nstages:\n  - {stage}\n  - {{name: b, prune: {{}}, distill: {{steps: 3}}}}\n")
    first, second = load_chain(path).stages
    assert first.distill.train == TrainConfig(tokens=64) and first.distill.objective == DistillConfig()
    assert second.distill.train == TrainConfig(steps=3)
    path.write_text("teacher: t\nstages:\n  - {name: a, prune: {}, distill: {tokens: 8, paralel: ddp}}\n")
    with pytest.raises(CompactLMError, match=r"chain.yaml:3: unknown key 'paralel' .*did you mean 'parallel'"):
        load_chain(path)


def test_the_job_recipe_sections_take_the_same_keys_and_defaults(tmp_path):
    assert set(fields_of(Correction)) == TRAIN
    assert set(fields_of(Distill)) == TRAIN | OBJECTIVE | {"teacher_cache", "top_k", "data"}
    path = tmp_path / "recipe.yaml"
    path.write_text("name: job\nstudents: {small: {num_layers: 2}}\n")
    recipe = load_job_recipe(path)
    # the job's own defaults: its lengths and a checkpoint every 10 steps; everything else is TrainConfig's
    assert TrainConfig.of(recipe.correction) == TrainConfig(tokens=16384, save_every=10)
    assert recipe.distill.train == TrainConfig(tokens=24576, save_every=10)
    assert recipe.distill.objective == DistillConfig()
    path.write_text("name: job\nstudents: {small: {num_layers: 2}}\ndistill: {steps: 7, grad_accum: 2}\n")
    recipe = load_job_recipe(path)
    assert recipe.distill.train == TrainConfig(steps=7, grad_accum=2, save_every=10, tokens=None)
    # a length in steps plans like one in tokens: 7 steps of 4 x 2 sequences of 256 tokens
    assert recipe.distill.planned_tokens() == 7 * 8 * 256 and estimates(recipe, True)["distill/small"] > 20


# --- --config FILE: a command's options written down --------------------------------------------------------------


def _config_file(tmp_path, ckpts, *extra_lines: str):
    lines = [
        f"teacher: {ckpts['teacher']}",
        f"student: {ckpts['student']}",
        f"out: {tmp_path / 'distilled'}",
        f"data: {ckpts['corpus']}",
        "steps: 2",
        "seq-len: 16",
        "batch_size: 2",
        "loss: logit",
        "lr: 2.0e-3",
        "warmup-steps: 1",
        "eval-samples: 0",
        *extra_lines,
    ]
    path = tmp_path / "distill.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _last_step(folder) -> dict:
    return json.loads((folder / "compactlm.json").read_text())["history"][-1]


def test_a_config_file_drives_distill_and_a_flag_overrides_it(retrain_checkpoints, tmp_path):
    config = _config_file(tmp_path, retrain_checkpoints)
    result = cli("compress", "distill", "--config", config, "--steps", "3")
    assert result.exit_code == 0, result.output
    step = _last_step(tmp_path / "distilled")
    assert step["steps"] == 3 and step["train"]["steps"] == 3  # the flag wins
    assert step["train"]["lr"] == 2e-3 and step["train"]["warmup_steps"] == 1  # the file beats the defaults
    assert step["train"]["batch_size"] == 2 and step["seq_len"] == 16 and step["loss"] == "logit"
    assert step["train"]["min_lr"] == 1e-5 and step["distill"]["temperature"] == 1.0  # defaults fill the rest
    assert step["heldout_loss"] is None


def test_cache_logits_reads_the_distillation_config_so_the_rows_match(retrain_checkpoints, tmp_path):
    config = _config_file(tmp_path, retrain_checkpoints)
    cache = tmp_path / "cache"
    result = cli("compress", "cache-logits", retrain_checkpoints["teacher"], "--out", cache, "--config", config)
    assert result.exit_code == 0, result.output
    result = cli("compress", "distill", "--config", config, "--teacher-cache", cache)
    assert result.exit_code == 0, result.output
    assert _last_step(tmp_path / "distilled")["teacher_cache"] == str(cache)


def test_a_config_file_with_an_unknown_key_stops_distill_before_any_work(retrain_checkpoints, tmp_path):
    config = _config_file(tmp_path, retrain_checkpoints, "temprature: 2.0")
    result = cli("compress", "distill", "--config", config)
    assert isinstance(result.exception, CompactLMError)
    assert f"{config}:12: unknown key 'temprature' in the options file (did you mean 'temperature'?)" in str(
        result.exception
    )
    assert not (tmp_path / "distilled").exists() and not (tmp_path / ".distilled.work").exists()


def test_a_config_file_may_write_a_learning_rate_as_1e_minus_4(retrain_checkpoints, tmp_path):
    config = _config_file(tmp_path, retrain_checkpoints, "min-lr: 1e-4")
    result = cli("compress", "distill", "--config", config)
    assert result.exit_code == 0, result.output
    assert _last_step(tmp_path / "distilled")["train"]["min_lr"] == 1e-4


def test_a_bad_value_in_a_config_file_names_its_line(retrain_checkpoints, tmp_path):
    config = _config_file(tmp_path, retrain_checkpoints, "min-lr: 1.0")
    result = cli("compress", "distill", "--config", config)
    assert isinstance(result.exception, CompactLMError)
    assert f"{config}:12: need 0 < --min-lr (1.0) <= --lr (0.002)" in str(result.exception)
