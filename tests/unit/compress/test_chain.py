"""Iterative compression recipes: key checking with lines, the chain itself (each student the next teacher),
resumption, and the family table."""

from __future__ import annotations

import json
import textwrap

import pytest

import compactlm.compress.retrain
from compactlm.compress.chain import check_chain, load_chain, run_chain
from compactlm.compress.record import read_record
from compactlm.core.errors import CompactLMError
from tests.helpers import cli


def write(tmp_path, text: str, name: str = "chain.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def recipe_text(teacher, corpus, first_tokens: int = 32) -> str:
    return f"""
        teacher: {teacher}
        data: {corpus}
        importance: {{samples: 4, seq_len: 16, depth_samples: 2}}
        distill:
          seq_len: 16
          batch_size: 2
          lr: 1e-3
        eval: {{samples: 2, seq_len: 16}}
        stages:
          - name: narrow
            prune: {{ffn_hidden_size: 64}}
            distill: {{tokens: {first_tokens}}}
          - name: shallow
            prune: {{num_layers: 3, hidden_size: 24}}
            distill: {{tokens: 32}}
        """


@pytest.mark.parametrize(
    "body,line,key,where",
    [
        ("teacher: x\nstagez: []\n", 2, "stagez", "the chain file"),
        ("teacher: x\nstages:\n  - name: a\n    prune: {}\n    distil: {tokens: 4}\n", 5, "distil", "stages[0]"),
        ("teacher: x\nstages:\n  - name: a\n    prune:\n      hiden_size: 8\n", 5, "hiden_size", "stages[0].prune"),
        ("teacher: x\neval:\n  samples: 4\n  task: [winowhy]\n", 4, "task", "eval"),
    ],
)
def test_an_unknown_key_is_named_with_its_place_and_line(tmp_path, body, line, key, where):
    path = write(tmp_path, body)
    with pytest.raises(CompactLMError) as error:
        load_chain(path)
    message = str(error.value)
    assert f"{path}:{line}: unknown key {key!r} in {where}" in message


def test_mistyped_values_and_missing_parts_are_refused(tmp_path):
    with pytest.raises(
        CompactLMError, match=r":4: stages\[0\].prune.num_layers must be an integer or null, not 'many'"
    ):
        load_chain(write(tmp_path, "teacher: x\nstages:\n  - name: a\n    prune: {num_layers: many}\n"))
    with pytest.raises(CompactLMError, match=r"stages\[0\] needs prune"):
        load_chain(write(tmp_path, "teacher: x\nstages:\n  - name: a\n"))
    with pytest.raises(CompactLMError, match="needs a distillation length"):
        load_chain(write(tmp_path, "teacher: x\nstages:\n  - name: a\n    prune: {num_layers: 2}\n"))
    text = "teacher: x\ndistill: {tokens: 8, lr: 1e-4}\nstages:\n  - {name: a, prune: {}}\n"
    recipe = load_chain(write(tmp_path, text))
    assert recipe.stages[0].distill.lr == 1e-4  # YAML 1.2 floats, as everywhere


def test_a_stage_that_grows_its_parent_is_refused_before_any_work(retrain_checkpoints, tmp_path):
    teacher, corpus = retrain_checkpoints["teacher"], retrain_checkpoints["corpus"]
    text = recipe_text(teacher, corpus).replace("num_layers: 3, hidden_size: 24", "ffn_hidden_size: 80")
    with pytest.raises(CompactLMError, match="stage 'shallow': pruning targets must not .*ffn_hidden_size 80 > 64"):
        check_chain(load_chain(write(tmp_path, text)))


def test_a_chain_distills_each_student_from_the_one_before_and_resumes(retrain_checkpoints, tmp_path, monkeypatch):
    teacher, corpus = retrain_checkpoints["teacher"], retrain_checkpoints["corpus"]
    out = tmp_path / "chain"
    calls = []
    real = compactlm.compress.retrain.distill_checkpoint
    monkeypatch.setattr(
        compactlm.compress.retrain, "distill_checkpoint", lambda *a, **k: calls.append(a[:2]) or real(*a, **k)
    )
    recipe = load_chain(write(tmp_path, recipe_text(teacher, corpus)))
    family = run_chain(recipe, out)

    assert [c[0] for c in calls] == [teacher, out / "1-narrow" / "distilled"]  # each student the next teacher
    assert family["model"].tolist() == ["teacher", "narrow", "shallow"]
    assert family["params"].is_monotonic_decreasing and family["params"].nunique() == 3
    assert family["layers"].tolist() == [4, 4, 3] and family["hidden"].tolist() == [48, 48, 24]
    assert family["total_tokens"].tolist() == [0, 32, 64]
    assert family["perplexity"].notna().all()
    last = read_record(out / "2-shallow" / "distilled")
    assert [op["op"] for op in last["history"]] == ["prune", "distill", "prune", "distill"]
    assert (out / "family.csv").is_file()

    # a re-run does nothing but print the table
    assert run_chain(recipe, out)["perplexity"].tolist() == family["perplexity"].tolist()
    assert len(calls) == 2
    # change the last stage: only it runs again (the first stage and its evaluation are reused)
    head, _, tail = recipe_text(teacher, corpus).rpartition("distill: {tokens: 32}")
    text = head + "distill: {tokens: 64}" + tail
    changed = load_chain(write(tmp_path, text))
    assert run_chain(changed, out)["total_tokens"].tolist() == [0, 32, 96]
    assert [c[0] for c in calls[2:]] == [out / "1-narrow" / "distilled"]
    # another chain file is another chain: refused unless asked to start over
    other = load_chain(write(tmp_path, text, "other.yaml"))
    with pytest.raises(CompactLMError, match="run folder of chain 'chain', not 'other'"):
        run_chain(other, out)
    assert run_chain(other, out, overwrite=True)["total_tokens"].tolist() == [0, 32, 96]


def test_the_chain_command_prints_the_family_table(retrain_checkpoints, tmp_path):
    teacher, corpus = retrain_checkpoints["teacher"], retrain_checkpoints["corpus"]
    text = recipe_text(teacher, corpus).split("          - name: shallow")[0] + f"        out: {tmp_path / 'c'}\n"
    result = cli("compress", "chain", write(tmp_path, text))
    assert result.exit_code == 0, result.output
    assert "family" in result.output and "narrow" in result.output
    assert json.loads((tmp_path / "c" / "chain.json").read_text())["recipe"]["stages"][0]["name"] == "narrow"
