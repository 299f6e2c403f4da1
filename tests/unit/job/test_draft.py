"""The job's speculative-decoding stage (compactlm/job/draft.py) on a tiny model and cpu engines: every student is
tried as the teacher's draft, the one with the highest acceptance is timed beside the teacher alone and built into a
servable engine folder that keeps the teacher's greedy tokens (fp32), the report gains the section, a re-run does
no work; and the recipe refuses a draft it cannot run, before any work."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from compactlm.bench.speculative import acceptance, choose_draft, speedup_bound
from compactlm.core.errors import CompactLMError
from compactlm.engines.backends.openvino.export import is_ready
from compactlm.job.recipe import load_job_recipe


def _recipe(folder: Path, teacher: Path, corpus: Path, **changes) -> Path:
    recipe = {
        "name": "tiny-draft",
        "teacher": str(teacher),
        "data": str(corpus),
        "correction": {"tokens": 0},
        "importance": {"samples": 4, "seq_len": 16},
        "students": {"depth": {"num_layers": 3}, "narrow": {"ffn_hidden_size": 32}},
        "distill": {"tokens": 64, "seq_len": 16, "batch_size": 2, "top_k": 8},
        "evaluate": {"samples": 2, "seq_len": 16, "tasks": [], "general": None},
        "engines": {"backend": "cpu", "precisions": ["fp32"]},
        "sweep": {"shapes": [[8, 12]], "batch_sizes": [1, 2], "requests": 2, "warmup": 0},
        "draft": {"tokens": [2, 3], "batch_sizes": [1, 2], "prompts": 3, "repeats": 1},
        **changes,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _completion(tokens: int, steps: int):
    """A completion of `tokens` tokens read over `steps` engine steps (the first from the prefill)."""
    times = [float(min(i, steps - 1)) for i in range(tokens)]
    return SimpleNamespace(tokens=list(range(tokens)), token_times=times)


def test_acceptance_counts_the_kept_proposals_of_each_decode_step():
    # 9 tokens over 4 steps: the prefill's token, then 3 decode steps yielding 8 -> 5 of 3 x 2 proposals kept
    assert acceptance([_completion(9, 4)], 2) == pytest.approx(5 / 6)
    assert acceptance([_completion(5, 5)], 3) == 0.0  # one token a step: nothing kept
    assert acceptance([_completion(1, 1)], 3) == 0.0  # no decode step at all
    assert speedup_bound(0.25, 3) == pytest.approx(4 / 1.75) and speedup_bound(1.0, 4) == 1.0


def test_the_draft_kept_most_on_average_is_chosen():
    table = pd.DataFrame(
        {"draft": ["a", "a", "b", "b"], "tokens": [2, 3, 2, 3], "acceptance": [0.9, 0.1, 0.5, 0.6]}
    )  # a: 0.50 on average, b: 0.55
    assert choose_draft(table) == "b"
    with pytest.raises(CompactLMError, match="no draft"):
        choose_draft(table.iloc[:0])


def _draft_results(folder: Path, drafted: float) -> Path:
    """A draft stage's results as draft.json holds them: the teacher alone at 50 tok/s, k=2 at `drafted`."""
    speed = [
        {
            "config": c,
            "tokens": k,
            "batch_size": 1,
            "tokens_per_s": v,
            "speedup": v / 50,
            "acceptance": a,
            "same_tokens": s,
            "requests": 1,
        }
        for c, k, v, a, s in [
            ("alone", 0, 50.0, None, None),
            ("k=2", 2, drafted, 0.6, 1),
            ("draft alone", 0, 100.0, None, None),
        ]
    ]
    result = {
        "teacher": "teacher",
        "precision": "int8",
        "draft": "depth",
        "tokens": 2,
        "isl": 8,
        "osl": 8,
        "data": "python-docs",
        "repeats": 1,
        "engine": str(folder / "engines" / "teacher-int8+draft"),
        "speed": speed,
        "acceptance": [
            {"draft": "depth", "tokens": 2, "acceptance": 0.6, "tokens_per_step": 2.2, "tokens_per_s": drafted}
        ],
    }
    (folder / "draft").mkdir(parents=True)
    (folder / "draft" / "draft.json").write_text(json.dumps(result))
    return folder


@pytest.mark.parametrize("drafted, says", [(40.0, "the draft does not pay"), (65.0, "runs 1.30x the teacher alone")])
def test_the_report_says_whether_the_draft_pays(tmp_path, drafted, says):
    from compactlm.job.report import draft_blocks

    blocks = dict(draft_blocks(_draft_results(tmp_path, drafted)))
    assert says in blocks["p"]
    assert "no acceptance can give more than k=2 1.50x" in blocks["p"]  # cost 0.5: (2 + 1) / (2 x 0.5 + 1)
    assert ("serve engines/teacher-int8" in blocks["p"]) == (drafted < 50)
    assert draft_blocks(tmp_path / "elsewhere") == []  # no draft stage: no section


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"engines": {"backend": "torch", "precisions": ["fp32"]}}, "runs on the cpu engine"),
        ({"draft": {"tokens": [2], "precision": "int8"}}, "not one of engines.precisions"),
        ({"draft": {"tokens": [0]}}, "draft.tokens: draft tokens must be an integer in 1..16"),
        ({"draft": {"tokens": [2, 2]}}, "names a value twice"),
        ({"draft": {"tokens": [2], "batch_sizes": []}}, "draft.batch_sizes"),
        ({"draft": {"tokens": [2], "prompts": 0}}, "draft.prompts must be >= 1"),
    ],
)
def test_a_draft_the_job_cannot_run_is_refused_before_any_work(retrain_checkpoints, tmp_path, changes, message):
    path = _recipe(tmp_path, retrain_checkpoints["teacher"], retrain_checkpoints["corpus"], **changes)
    with pytest.raises(CompactLMError, match=message):
        load_job_recipe(path)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not is_ready(), reason="the OpenVINO exporter venv is not set up")
def test_the_job_picks_a_student_as_draft_times_it_and_builds_a_servable_engine(retrain_checkpoints, tmp_path):
    from compactlm.engines import load_engine
    from compactlm.engines.manifest import read_manifest
    from compactlm.job.pipeline import run_job

    out = tmp_path / "run"
    recipe = load_job_recipe(_recipe(tmp_path, retrain_checkpoints["teacher"], retrain_checkpoints["corpus"]))
    run_job(recipe, out)

    result = json.loads((out / "draft" / "draft.json").read_text())
    trials = pd.DataFrame(result["acceptance"])
    assert sorted(zip(trials["draft"], trials["tokens"], strict=True)) == [
        ("depth", 2),
        ("depth", 3),
        ("narrow", 2),
        ("narrow", 3),
    ]
    assert trials["acceptance"].between(0, 1).all()
    means = trials.groupby("draft")["acceptance"].mean()
    assert result["draft"] == means.idxmax()  # the students' own measurements decided
    speed = pd.DataFrame(result["speed"])
    assert len(speed) == 2 * 4  # two batch sizes x (alone, k=2, k=3, the draft alone)
    drafted = speed[speed["tokens"] > 0]
    assert (drafted["same_tokens"] == drafted["requests"]).all()  # fp32: the teacher's own greedy tokens
    assert (speed["tokens_per_s"] > 0).all()
    first = drafted[drafted["batch_size"] == 1]
    assert result["tokens"] == int(first.loc[first["speedup"].idxmax(), "tokens"])

    built = Path(result["engine"])
    assert built == out / "engines" / "teacher-fp32+draft"
    record = read_manifest(built).backend_info["draft"]
    assert record["num_assistant_tokens"] == result["tokens"]
    assert record["source"]["path"] == str((out / "models" / result["draft"]).resolve())
    prompts = [[5, 9, 14, 3, 8], [21, 4, 7]]
    with load_engine(built) as engine, load_engine(out / "engines" / "teacher-fp32") as alone:
        assert engine.draft is not None and engine.draft.tokens == result["tokens"]
        assert [c.tokens for c in engine.generate(prompts, 10, ignore_eos=True)] == [
            c.tokens for c in alone.generate(prompts, 10, ignore_eos=True)
        ]

    markdown = (out / "report" / "report.md").read_text()
    section = markdown.split("## Speculative decoding", 1)[1].split("\n## ", 1)[0]
    assert f"| teacher + {result['draft']} as draft (k={result['tokens']}) [built] |" in section
    assert "teacher fp32 alone" in section and "no acceptance can give more than" in section
    assert "teacher-fp32+draft: engine manifest (with its draft)" in markdown

    # nothing changed: the draft stage is reused, not run again
    again = run_job(recipe, out)
    assert again.is_file()
    stage = json.loads((out / "stages" / "draft.json").read_text())
    assert stage["outputs"]["draft"] == result["draft"]
    assert json.loads((out / "draft" / "draft.json").read_text()) == result
    assert "Work done in this run: 0.0 min (every stage's own time: " in (out / "report" / "report.md").read_text()
