"""The `compactlm` command: every --help, prune/importance/eval end to end on a tiny model, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from compactlm.cli.root import app
from compactlm.compress.checkpoint import load_model
from compactlm.compress.importance import ImportanceScores
from compactlm.core.errors import CompactLMError
from tests.helpers import english_docs, save_word_tokenizer, write_jsonl

runner = CliRunner()
COMPACTLM = Path(sys.executable).with_name("compactlm")


def _command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command under `command` (typer vendors its own click: duck-type the groups)."""
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _command_paths(sub, (*prefix, name))
    return paths


COMMAND_PATHS = _command_paths(typer.main.get_command(app))


def test_the_command_tree_is_walked():
    assert {
        ("compress", "prune"),
        ("compress", "importance"),
        ("compress", "eval"),
        ("models", "list"),
    } <= set(COMMAND_PATHS)
    assert ("demo",) in COMMAND_PATHS and ("run",) in COMMAND_PATHS and () in COMMAND_PATHS


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "compactlm")
def test_every_command_has_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert result.exception is None


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prune_with_random_scores_writes_a_loadable_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "student"
    args = ["compress", "prune", str(tiny_dir), str(out), "--ffn-hidden-size", "64", "--num-layers", "3"]
    result = runner.invoke(app, [*args, "--random-seed", "0"])
    assert result.exit_code == 0, result.output
    student = load_model(out)
    assert student.config.intermediate_size == 64 and student.config.num_hidden_layers == 3
    assert student.model.layers[0].mlp.down_proj.weight.shape == (48, 64)
    record = json.loads((out / "compactlm.json").read_text())
    assert record["parent"] == str(tiny_dir.resolve())
    step = record["history"][-1]
    assert step["op"] == "prune" and step["importance"] == {"random": True, "seed": 0}
    assert step["target"]["ffn_hidden_size"] == 64 and step["target"]["num_layers"] == 3
    assert len(step["dropped_layers"]) == 1
    kept = load_file(out / step["kept_indices"])
    assert kept["layers"].tolist() == [i for i in range(4) if i not in step["dropped_layers"]]
    assert kept["mlp"].shape == (3, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "tiny"]  # no temp folder left


def test_prune_refuses_an_existing_out_and_leaves_it_untouched(tiny_dir, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["compress", "prune", str(tiny_dir), str(out), "--random-seed", "0"])
    assert result.exit_code != 0
    assert isinstance(result.exception, CompactLMError)
    assert "already exists; pass --overwrite" in str(result.exception)
    assert _snapshot(out) == {"notes.txt": b"mine"}

    result = runner.invoke(
        app,
        [
            "compress",
            "prune",
            str(tiny_dir),
            str(out),
            "--random-seed",
            "0",
            "--num-layers",
            "2",
            "--overwrite",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_prune_refuses_an_impossible_target_before_writing_anything(tiny_dir, tmp_path):
    out = tmp_path / "student"
    before = _snapshot(tmp_path)
    result = runner.invoke(
        app, ["compress", "prune", str(tiny_dir), str(out), "--ffn-hidden-size", "1000", "--random-seed", "0"]
    )
    assert isinstance(result.exception, CompactLMError)
    assert "ffn_hidden_size 1000 > 96" in str(result.exception)
    assert not out.exists()
    assert _snapshot(tmp_path) == before


def test_prune_refuses_a_bad_layer_list(tiny_dir, tmp_path):
    result = runner.invoke(app, ["compress", "prune", str(tiny_dir), str(tmp_path / "o"), "--drop-layers", "2-x"])
    assert isinstance(result.exception, CompactLMError)
    assert "cannot read layer list '2-x'" in str(result.exception)


def test_prune_by_named_layers_needs_neither_scores_nor_data(tiny_dir, tmp_path):
    out = tmp_path / "student"
    # no --scores, no --random-seed, no usable --data, no tokenizer: nothing is chosen by importance
    result = runner.invoke(app, ["compress", "prune", str(tiny_dir), str(out), "--drop-layers", "1-2"])
    assert result.exit_code == 0, result.output
    step = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert step["dropped_layers"] == [1, 2]
    assert "not_needed" in step["importance"]
    assert load_model(out).config.num_hidden_layers == 2


def test_prune_checks_the_data_before_loading_the_model(tiny_dir, tmp_path, monkeypatch):
    import compactlm.compress.operations

    started = []
    monkeypatch.setattr(compactlm.compress.operations, "prune_checkpoint", lambda *a, **k: started.append(a))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [
        "compress",
        "prune",
        str(tiny_dir),
        str(tmp_path / "o"),
        "--num-layers",
        "3",
        "--seq-len",
        "16",
        "--data",
        str(empty),
    ]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, CompactLMError)
    assert "is empty: no document has any text" in str(result.exception)
    assert not (tmp_path / "o").exists()
    assert started == []


@pytest.fixture
def tiny_with_tokenizer(tiny_dir, tmp_path) -> tuple[Path, Path]:
    """The tiny checkpoint with a word-level tokenizer beside it, and a JSONL corpus it can read."""
    texts = english_docs(80, words_per_doc=30)
    save_word_tokenizer(tiny_dir, texts)
    return tiny_dir, write_jsonl(tmp_path / "corpus.jsonl", texts)


def test_importance_then_prune_with_the_scores_file(tiny_with_tokenizer, tmp_path):
    model_dir, corpus = tiny_with_tokenizer
    scores_file = tmp_path / "scores.safetensors"
    result = runner.invoke(
        app,
        [
            "compress",
            "importance",
            str(model_dir),
            "--out",
            str(scores_file),
            "--data",
            str(corpus),
            "--samples",
            "6",
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--block-sizes",
            "1,2",
            "--depth-samples",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    scores = ImportanceScores.load(scores_file)
    assert scores.mlp.shape == (4, 96) and scores.heads.shape == (4, 6) and scores.hidden.shape == (48,)
    assert set(scores.removal_loss) == {1, 2} and set(scores.block_influence) == {1, 2}
    assert scores.meta["samples"] == 6 and scores.meta["depth_samples"] == 3
    assert scores.meta["data"]["source"] == str(corpus) and scores.meta["split"] == "train"
    assert scores.meta["model"] == str(model_dir)

    out = tmp_path / "student"
    result = runner.invoke(
        app,
        [
            "compress",
            "prune",
            str(model_dir),
            str(out),
            "--scores",
            str(scores_file),
            "--num-layers",
            "2",
            "--ffn-hidden-size",
            "64",
            "--num-attention-heads",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    start = int(scores.removal_loss[2].argmin())
    step = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert step["dropped_layers"] == [start, start + 1]  # the block whose removal hurt least
    assert step["importance"]["model"] == str(model_dir)
    student = load_model(out)
    assert (student.config.num_hidden_layers, student.config.num_attention_heads) == (2, 3)
    assert (out / "tokenizer.json").is_file()  # the parent's tokenizer travels with the student

    result = runner.invoke(
        app,
        [
            "compress",
            "prune",
            str(model_dir),
            str(tmp_path / "s1"),
            "--scores",
            str(scores_file),
            "--num-layers",
            "1",
        ],
    )
    assert isinstance(result.exception, CompactLMError)
    assert "--block-sizes including 3" in str(result.exception)
    assert not (tmp_path / "s1").exists()

    result = runner.invoke(
        app,
        [
            "compress",
            "eval",
            str(model_dir),
            str(out),
            "--data",
            str(corpus),
            "--samples",
            "2",
            "--seq-len",
            "8",
            "--out",
            str(tmp_path / "ppl.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "ppl.csv").read_text().splitlines()
    assert rows[0].startswith("model,path,params,heldout_loss,perplexity")
    assert len(rows) == 3


@pytest.mark.parametrize(
    "metric,removal_loss,block_sizes", [("layer-loss", True, [1]), ("block-influence", False, [1, 2])]
)
def test_prune_computes_importance_when_no_scores_are_given(
    tiny_with_tokenizer, tmp_path, metric, removal_loss, block_sizes
):
    model_dir, corpus = tiny_with_tokenizer
    out = tmp_path / "student"
    num_layers = "3" if metric == "layer-loss" else "2"
    args = [
        "compress",
        "prune",
        str(model_dir),
        str(out),
        "--num-layers",
        num_layers,
        "--depth-metric",
        metric,
    ]
    result = runner.invoke(app, [*args, "--data", str(corpus), "--samples", "4", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    importance = json.loads((out / "compactlm.json").read_text())["history"][-1]["importance"]
    assert importance["data"]["source"] == str(corpus) and importance["samples"] == 4
    assert importance["config"]["removal_loss"] is removal_loss  # only the depth metric's own needs are paid
    assert importance["config"]["block_sizes"] == block_sizes
    assert load_model(out).config.num_hidden_layers == int(num_layers)


def test_importance_refuses_bad_options_before_loading(tiny_dir, tmp_path):
    out = tmp_path / "scores.safetensors"
    result = runner.invoke(app, ["compress", "importance", str(tiny_dir), "--out", str(out), "--seq-agg", "max"])
    assert isinstance(result.exception, CompactLMError) and "seq_agg must be one of" in str(result.exception)
    result = runner.invoke(app, ["compress", "importance", str(tiny_dir), "--out", str(out), "--block-sizes", "1,a"])
    assert isinstance(result.exception, CompactLMError) and "--block-sizes must be" in str(result.exception)
    out.write_bytes(b"keep")
    result = runner.invoke(app, ["compress", "importance", str(tiny_dir), "--out", str(out)])
    assert isinstance(result.exception, CompactLMError) and "already exists" in str(result.exception)
    assert out.read_bytes() == b"keep"


def test_eval_refuses_a_bad_out_suffix_before_evaluating(tiny_dir, tmp_path, monkeypatch):
    import compactlm.compress.operations

    evaluated = []
    monkeypatch.setattr(
        compactlm.compress.operations, "evaluate_models", lambda *a, **k: evaluated.append(a) or _empty_frame()
    )
    result = runner.invoke(app, ["compress", "eval", str(tiny_dir), "--out", str(tmp_path / "table.txt")])
    assert isinstance(result.exception, CompactLMError)
    assert "--out must end in .csv or .parquet" in str(result.exception)
    assert evaluated == []  # a user error must not cost a whole evaluation first


def _empty_frame():
    import pandas as pd

    return pd.DataFrame([{"model": "m", "path": "p", "params": 1, "heldout_loss": 1.0, "perplexity": 2.7}])


def test_models_list_shows_the_bundled_model(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTLM_HOME", str(tmp_path))
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output


def _run_compactlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert COMPACTLM.is_file(), f"{COMPACTLM} is missing: install the package (make setup)"
    # what rich reads to size or colour its output: the test wants what a plain pipe gets
    ignored = ("COLUMNS", "LINES", "JUPYTER_COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in os.environ.items() if k not in ignored}
    # stdin too: rich asks every standard stream for a terminal size
    return subprocess.run(
        [str(COMPACTLM), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def missing_model_error(tmp_path) -> subprocess.CompletedProcess:
    return _run_compactlm(
        "compress", "prune", str(tmp_path / "no-such-model-folder"), "OUT", "--num-layers", "2", cwd=tmp_path
    )


def test_user_errors_exit_2_with_an_error_line_and_no_traceback(missing_model_error, tmp_path):
    assert missing_model_error.returncode == 2
    assert missing_model_error.stderr.startswith("error: ")
    stderr = missing_model_error.stderr
    assert "neither a checkpoint directory nor a bundled model" in stderr.replace("\n", " ")
    assert "Traceback" not in stderr + missing_model_error.stdout
    assert len(stderr.strip().splitlines()) == 1, stderr  # one line, even through a pipe (no wrapping)
    assert not (tmp_path / "OUT").exists()
