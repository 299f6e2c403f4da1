"""run_benchmark: limits checked before anything runs, rows appended as points finish, faults become errors."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from compactlm.bench.fake import NullEngine, Script, ScriptedEngine
from compactlm.bench.loadgen import Load
from compactlm.bench.results import ResultsFile, read_results
from compactlm.bench.runner import plan, run_benchmark
from compactlm.bench.targets import EngineTarget
from compactlm.core.errors import CompactLMError


def test_shapes_beyond_the_engine_limits_are_refused_before_the_run(tmp_path):
    engine = ScriptedEngine(Script(decode_step=0.001), max_batch_size=4, max_input_len=64, max_seq_len=128)
    results = ResultsFile(tmp_path / "r.parquet")
    fits = plan([(32, 32)], [Load("concurrency", concurrency=4)], requests=4)
    too_long = plan([(32, 32), (64, 80)], [Load("concurrency", concurrency=1)], requests=4)
    too_wide = plan([(32, 32)], [Load("concurrency", concurrency=1), Load("concurrency", concurrency=8)], requests=8)
    spread = plan([(60, 8)], [Load("concurrency", concurrency=1)], requests=4, input_stdev=2)  # 60 + 4 sd > 64
    with EngineTarget(engine) as target:
        for points, message in (
            (too_long, "max_seq_len 128"),
            (too_wide, "max_batch_size 4"),
            (spread, "max_input_len 64"),
        ):
            with pytest.raises(CompactLMError, match=message):
                run_benchmark(target, points, results, progress=False)
        assert engine.admitted == 0 and not results.path.exists()  # nothing ran, nothing was written
        run_benchmark(target, fits, results, progress=False)
    assert len(results.read()) == 1


def test_an_engine_dying_mid_run_fails_its_requests_and_keeps_the_points_measured(tmp_path):
    engine = ScriptedEngine(Script(decode_step=0.002), fail_after=6)
    results = ResultsFile(tmp_path / "r.parquet")
    points = plan([(8, 4)], [Load("concurrency", concurrency=2)], requests=4, repeats=3)
    hook, threading.excepthook = threading.excepthook, (lambda args: None)  # the worker's traceback is expected
    try:
        with EngineTarget(engine) as target:
            run_benchmark(target, points, results, progress=False)
    finally:
        threading.excepthook = hook
    saved = results.read()
    assert saved["repeat"].tolist() == [0, 1, 2]
    assert saved["errors"].tolist()[0] == 0 and saved["completed"].tolist()[0] == 4
    assert saved["errors"].tolist()[2] == 4 and "scripted failure" in saved["error_example"].iloc[2]
    assert saved["errors"].sum() + saved["completed"].sum() == 12


def test_rows_are_appended_as_points_finish_so_a_crash_loses_one_point(tmp_path):
    results = ResultsFile(tmp_path / "r.csv")
    points = plan([(8, 2)], [Load("concurrency", concurrency=1), Load("offline")], requests=5, repeats=2)
    calls = []

    def workload_then_crash(target, spec):
        from compactlm.bench.runner import synthetic_workload

        calls.append(spec)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the run at the third point
        return synthetic_workload(target, spec)

    with EngineTarget(NullEngine()) as target, pytest.raises(KeyboardInterrupt):
        run_benchmark(target, points, results, progress=False, workload_for=workload_then_crash)
    saved = results.read()
    assert len(saved) == 2 and saved["mode"].tolist() == ["concurrency", "offline"]
    assert len({spec.seed for spec in calls}) == 3  # every point draws its own prompts
    for column in ("cpu", "python", "git_commit", "version_compactlm", "backend", "model_params", "source_sha256"):
        assert column in saved.columns
    assert saved["requests"].tolist() == [5, 5] and (saved["request_throughput"] > 0).all()


def test_results_files_concatenate_and_refuse_bad_names(tmp_path):
    a, b = ResultsFile(tmp_path / "a.parquet"), ResultsFile(tmp_path / "b.csv")
    a.append({"model": "x", "request_throughput": 1.0})
    a.append({"model": "x", "request_throughput": 2.0, "new_column": "y"})  # a new column keeps old rows
    b.append([{"model": "z", "request_throughput": 3.0}])
    frame = read_results([a.path, b.path])
    assert frame["request_throughput"].tolist() == [1.0, 2.0, 3.0]
    assert pd.isna(frame["new_column"].iloc[0]) and frame["new_column"].iloc[1] == "y"
    with pytest.raises(CompactLMError, match="must end in .parquet or .csv"):
        ResultsFile(tmp_path / "r.json")
    with pytest.raises(CompactLMError, match="does not exist"):
        read_results([tmp_path / "missing.csv"])


def test_a_real_engine_runs_through_the_command_with_text_prompts(tmp_path):
    from compactlm.engines.build import build_engine
    from compactlm.engines.config import BuildConfig, Limits
    from tests.helpers import cli, english_docs, save_word_tokenizer, tiny_model, write_jsonl

    docs = english_docs(40)
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    save_word_tokenizer(tmp_path / "ckpt", docs)
    limits = Limits(max_batch_size=2, max_input_len=16, max_seq_len=32, max_num_tokens=64)
    engine = build_engine(tmp_path / "ckpt", tmp_path / "engine", BuildConfig(backend="torch", limits=limits))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "r.csv"
    options = ["--isl", 12, "--osl", 5, "--requests", "2x", "--warmup", 1, "--source", corpus, "--out", out]
    result = cli("bench", "measure", engine, "--concurrency", "1,2", *options)
    assert result.exit_code == 0, result.output
    saved = pd.read_csv(out)
    assert saved["completed"].tolist() == [2, 4] and (saved["errors"] == 0).all()
    assert (saved["output_tokens_mean"] == 5).all() and (saved["input_tokens_mean"] == 12).all()  # exact, verified
    assert (saved["backend"] == "torch").all() and (saved["model"] == "ckpt").all()
    result = cli("bench", "measure", engine, "--isl", 12, "--osl", 5, "--concurrency", "4", "--out", tmp_path / "x.csv")
    assert isinstance(result.exception, CompactLMError) and "max_batch_size 2" in str(result.exception)
    assert not (tmp_path / "x.csv").exists()
