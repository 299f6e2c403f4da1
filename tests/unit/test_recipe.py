"""YAML recipes: keys checked against the command's options, errors that name the line, flags override."""

from __future__ import annotations

import json

import pytest

from compress.errors import CompactLMError
from compress.recipe import load_recipe, merge
from tests.unit.helpers import cli

ALLOWED = {"seq_len", "steps", "lr", "data", "loss", "from_scratch", "warmup_steps"}


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_dashed_and_underscored_keys_are_read_with_their_yaml_types(tmp_path):
    path = _recipe(
        tmp_path,
        "# a distillation\nseq-len: 32\nwarmup_steps: 3\nlr: 1.0e-3\ndata: corpus.jsonl\nloss: logit+hidden\n"
        "from-scratch: true\n",
    )
    assert load_recipe(path, ALLOWED) == {
        "seq_len": 32,
        "warmup_steps": 3,
        "lr": 1e-3,
        "data": "corpus.jsonl",
        "loss": "logit+hidden",
        "from_scratch": True,
    }


def test_an_empty_recipe_is_no_options(tmp_path):
    assert load_recipe(_recipe(tmp_path, ""), ALLOWED) == {}
    assert load_recipe(_recipe(tmp_path, "# only a comment\n"), ALLOWED) == {}


def test_an_unknown_key_names_the_file_line_and_the_closest_option(tmp_path):
    path = _recipe(tmp_path, "steps: 10\nlr: 1.0e-4\n\nseq-lenn: 64\n")
    with pytest.raises(CompactLMError) as info:
        load_recipe(path, ALLOWED)
    message = str(info.value)
    assert f"{path}:4: unknown key 'seq-lenn'" in message
    assert "(did you mean 'seq_len'?)" in message
    assert "known keys: data, from_scratch, loss, lr, seq_len, steps, warmup_steps" in message


def test_an_unknown_key_with_nothing_close_has_no_suggestion(tmp_path):
    with pytest.raises(CompactLMError, match=r"recipe.yaml:1: unknown key 'zzz'; known keys") as info:
        load_recipe(_recipe(tmp_path, "zzz: 1\n"), ALLOWED)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("steps: [1, 2\n", "is not valid YAML"),
        ("steps: 1\n  lr: 2\n", "is not valid YAML"),
        ("- steps\n- lr\n", "must be a mapping of option: value"),
        ("just a string\n", "must be a mapping of option: value"),
    ],
)
def test_invalid_yaml_and_a_non_mapping_are_refused(tmp_path, text, message):
    path = _recipe(tmp_path, text)
    with pytest.raises(CompactLMError, match=f"recipe {path} {message}"):
        load_recipe(path, ALLOWED)


def test_a_missing_recipe_is_refused(tmp_path):
    with pytest.raises(CompactLMError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml", ALLOWED)


def test_merge_precedence_is_defaults_then_recipe_then_given_flags():
    defaults = {"lr": 1e-4, "steps": None, "seq_len": 256, "loss": "auto", "data": "python-docs"}
    recipe = {"lr": 3e-4, "steps": 10, "seq_len": 64}
    flags = {"lr": 1e-3, "steps": None, "seq_len": None, "loss": "logit"}
    merged = merge(defaults, recipe, flags)
    assert merged == {"lr": 1e-3, "steps": 10, "seq_len": 64, "loss": "logit", "data": "python-docs"}
    assert defaults["lr"] == 1e-4 and recipe["lr"] == 3e-4  # inputs untouched
    # A falsy flag that was given (0, False) still overrides; only None means "not given".
    assert merge(defaults, {"warmup_steps": 5, "from_scratch": True}, {"warmup_steps": 0, "from_scratch": False}) == (
        defaults | {"warmup_steps": 0, "from_scratch": False}
    )


# --- recipes driving the commands -------------------------------------------------------------------------------


def _distill_recipe(tmp_path, ckpts, *extra_lines: str):
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
    return _recipe(tmp_path, "\n".join(lines) + "\n")


def _last_step(folder) -> dict:
    return json.loads((folder / "compactlm.json").read_text())["history"][-1]


def test_a_recipe_drives_distill_and_a_flag_overrides_it(retrain_checkpoints, tmp_path):
    recipe = _distill_recipe(tmp_path, retrain_checkpoints)
    result = cli("compress", "distill", "--recipe", recipe, "--steps", "3")
    assert result.exit_code == 0, result.output
    step = _last_step(tmp_path / "distilled")
    assert step["steps"] == 3 and step["train"]["steps"] == 3  # the flag wins
    assert step["train"]["lr"] == 2e-3 and step["train"]["warmup_steps"] == 1  # the recipe beats the defaults
    assert step["train"]["batch_size"] == 2 and step["seq_len"] == 16 and step["loss"] == "logit"
    assert step["train"]["min_lr"] == 1e-5 and step["distill"]["temperature"] == 1.0  # defaults fill the rest
    assert step["heldout_loss"] is None


def test_cache_logits_reads_the_distillation_recipe_so_the_rows_match(retrain_checkpoints, tmp_path):
    recipe = _distill_recipe(tmp_path, retrain_checkpoints)
    cache = tmp_path / "cache"
    result = cli("compress", "cache-logits", retrain_checkpoints["teacher"], "--out", cache, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    result = cli("compress", "distill", "--recipe", recipe, "--teacher-cache", cache)
    assert result.exit_code == 0, result.output
    assert _last_step(tmp_path / "distilled")["teacher_cache"] == str(cache)


def test_a_recipe_with_an_unknown_key_stops_distill_before_any_work(retrain_checkpoints, tmp_path):
    recipe = _distill_recipe(tmp_path, retrain_checkpoints, "temprature: 2.0")
    result = cli("compress", "distill", "--recipe", recipe)
    assert isinstance(result.exception, CompactLMError)
    assert f"{recipe}:12: unknown key 'temprature' (did you mean 'temperature'?)" in str(result.exception)
    assert not (tmp_path / "distilled").exists() and not (tmp_path / ".distilled.work").exists()


def test_a_recipe_may_write_a_learning_rate_as_1e_minus_3(retrain_checkpoints, tmp_path):
    recipe = _distill_recipe(tmp_path, retrain_checkpoints, "min-lr: 1e-4")
    result = cli("compress", "distill", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert _last_step(tmp_path / "distilled")["train"]["min_lr"] == 1e-4
