"""The one run mechanism: stages are fingerprinted, reused when nothing they read changed, re-run with everything
downstream when something did, resumed after a kill; a run folder belongs to one run."""

from __future__ import annotations

import json

import pytest

from compactlm.core.errors import CompactLMError
from compactlm.core.runs import MARKER, Run, claim_run_folder


def _two_stages(out, first_config: dict, calls: list, second_config=None):
    run = Run.claim(out, "chain", "c")

    def work(name):
        return lambda resume: calls.append((name, resume)) or {"value": name}

    run.stage("a", first_config, [], work("a"))
    run.stage("b", second_config or {}, ["a"], work("b"))
    return run


def test_a_rerun_reuses_and_a_change_reruns_what_depends_on_it(tmp_path):
    calls = []
    _two_stages(tmp_path / "r", {"x": 1}, calls)
    assert calls == [("a", False), ("b", False)]
    run = _two_stages(tmp_path / "r", {"x": 1}, calls)
    assert len(calls) == 2 and all(r.reused for r in run.records.values())
    _two_stages(tmp_path / "r", {"x": 2}, calls)  # a changed: a and b (which reads a) run again
    assert calls[2:] == [("a", False), ("b", False)]
    _two_stages(tmp_path / "r", {"x": 2}, calls, second_config={"y": 1})  # only b changed
    assert calls[4:] == [("b", False)]
    record = json.loads((tmp_path / "r" / "stages" / "b.json").read_text())
    assert record["config"] == {"y": 1} and set(record["deps"]) == {"a"} and record["outputs"] == {"value": "b"}


def test_a_killed_stage_is_resumed_when_its_fingerprint_is_the_same(tmp_path):
    run = Run.claim(tmp_path / "r", "job", "j")

    def killed(resume):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.stage("train", {"lr": 1}, [], killed)
    seen = []
    Run.claim(tmp_path / "r", "job", "j").stage("train", {"lr": 1}, [], lambda resume: seen.append(resume) or {})
    assert seen == [True]
    with pytest.raises(KeyboardInterrupt):
        Run.claim(tmp_path / "r", "job", "j").stage("other", {"lr": 1}, [], killed)
    Run.claim(tmp_path / "r", "job", "j").stage("other", {"lr": 2}, [], lambda resume: seen.append(resume) or {})
    assert seen == [True, False]  # another config: a fresh start


def test_outputs_that_are_gone_make_a_stage_run_again(tmp_path):
    file = tmp_path / "out.txt"

    def write(resume):
        file.write_text("x")
        return {"path": str(file)}

    present = lambda o: (tmp_path / "out.txt").is_file()  # noqa: E731
    run = Run.claim(tmp_path / "r", "demo", "d")
    run.stage("s", {}, [], write, present)
    assert run.is_done("s", {}, [], present)
    file.unlink()
    assert not Run.claim(tmp_path / "r", "demo", "d").is_done("s", {}, [], present)


def test_a_run_folder_belongs_to_one_run(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("keep")
    with pytest.raises(CompactLMError, match="is not a compactlm run folder"):
        claim_run_folder(tmp_path / "data", "job", "j")
    claim_run_folder(tmp_path / "r", "search", "model-a")
    with pytest.raises(CompactLMError, match="run folder of a search, not of a chain"):
        claim_run_folder(tmp_path / "r", "chain", "c")
    with pytest.raises(CompactLMError, match="run folder of search 'model-a', not 'model-b'"):
        claim_run_folder(tmp_path / "r", "search", "model-b")
    (tmp_path / "r" / "old").write_text("x")
    claim_run_folder(tmp_path / "r", "search", "model-b", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [MARKER]
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep"


def test_a_job_folder_from_before_the_shared_mechanism_is_still_its_jobs(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "job.json").write_text(json.dumps({"recipe": "smollm2-minitron"}))
    claim_run_folder(tmp_path / "r", "job", "smollm2-minitron")
    with pytest.raises(CompactLMError, match="not 'other'"):
        claim_run_folder(tmp_path / "r", "job", "other")
