"""The report (figures, speedups over a baseline, accuracy beside throughput) and the `bench` commands."""

from __future__ import annotations

import pandas as pd
import pytest

from compactlm.bench.fake import Script, ScriptedEngine
from compactlm.bench.loadgen import Load
from compactlm.bench.report import choose_baseline, point_table, speedups, summary_table, write_report
from compactlm.bench.runner import plan, run_benchmark
from compactlm.bench.targets import EngineTarget
from compactlm.bench.workload import load_jsonl
from compactlm.core.errors import CompactLMError
from tests.helpers import cli


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """A teacher and a student twice as fast, 2 shapes x batch 1, 2 x 2 repeats."""
    points = plan([(8, 3), (16, 3)], [Load("concurrency", concurrency=b) for b in (1, 2)], requests=4, repeats=2)
    frames = []
    for name, step, params in (("teacher", 0.008, 2_000_000), ("student", 0.004, 1_000_000)):
        engine = ScriptedEngine(Script(decode_step=step))
        engine.manifest.model["params"] = params
        with EngineTarget(engine, name=name) as target:
            frames.append(run_benchmark(target, points, progress=False))
    return pd.concat(frames, ignore_index=True)


def test_points_average_repeats_and_speedups_divide_by_the_baseline(frame):
    points = point_table(frame)
    assert len(points) == 2 * 2 * 2 and (points["repeats"] == 2).all()
    assert points["request_throughput_ci"].notna().all()
    assert choose_baseline(points, None) == "teacher"  # the most parameters
    assert choose_baseline(points, "student") == "student"
    with pytest.raises(CompactLMError, match="choose one of: student, teacher"):
        choose_baseline(points, "nobody")
    table = speedups(points, "teacher")
    assert len(table) == 4 and list(table.columns) == ["isl", "osl", "batch_size", "student"]
    tput = points.set_index(["label", "isl", "batch_size"])["request_throughput"]
    for _, row in table.iterrows():
        expected = tput["student", row["isl"], row["batch_size"]] / tput["teacher", row["isl"], row["batch_size"]]
        assert row["student"] == pytest.approx(expected)
    # twice as fast per step; measured wall-clock on a shared 2-core machine (1.37 seen under a full CI load), so
    # only the direction is held here, the exact division above
    assert (table["student"] > 1.2).all()


def test_the_report_has_figures_tables_and_accuracy(frame, tmp_path):
    evals = pd.DataFrame({"model": ["teacher", "student"], "perplexity": [10.0, 14.0], "acc_winowhy": [0.6, 0.55]})
    md, page = write_report(frame, tmp_path / "report", evals=evals, command="compactlm bench report r.parquet")
    text = md.read_text()
    for figure in ("throughput", "speedup", "latency", "accuracy"):
        assert (tmp_path / "report" / "figures" / f"{figure}.png").stat().st_size > 1000
        assert f"figures/{figure}.png" in text and f'src="figures/{figure}.png"' in page.read_text()
    assert "## Speedup over teacher" in text and "compactlm bench report r.parquet" in text
    accuracy = text.split("## Accuracy beside throughput")[1]
    assert "| student |" in accuracy and "0.55" in accuracy and "14" in accuracy
    assert "<table>" in page.read_text()


def test_summary_table_has_a_row_per_point(frame):
    table = summary_table(frame)
    assert table.row_count == 8 and table.columns[0].header == "engine"


def test_bench_commands_run_sweep_report_and_make_datasets(tmp_path):
    out = tmp_path / "r.parquet"
    result = cli("bench", "measure", "null", "--requests", "20", "--concurrency", "1,4", "--osl", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(out)["concurrency"].tolist() == [1, 4]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f'shapes: [[16, 4]]\nbatch_sizes: [1, 2]\nrequests: 4\nengines: {{nil: "null"}}\nout: {out}\n')
    result = cli("bench", "sweep", sweep)
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(out)["model"].tolist() == ["null", "null", "nil", "nil"]
    result = cli("bench", "report", out, "--out", tmp_path / "rep", "--baseline", "nil")
    assert result.exit_code == 0, result.output
    assert "Speedup over nil" in (tmp_path / "rep" / "report.md").read_text()
    data = tmp_path / "set.jsonl"
    result = cli("bench", "dataset", data, "--requests", "5", "--isl", "7", "--osl", "2", "--vocab-size", "50")
    assert result.exit_code == 0, result.output
    assert [len(i.input_ids) for i in load_jsonl(data)] == [7] * 5
    result = cli("bench", "measure", "null", "--dataset", data, "--requests", "3", "--warmup", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(out)["source"].iloc[-1] == str(data)


def test_bench_command_errors_are_one_line(tmp_path):
    result = cli("bench", "measure", "null", "--rate", "1", "--offline", "--out", tmp_path / "r.csv")
    assert isinstance(result.exception, CompactLMError) and "choose one load" in str(result.exception)
    result = cli("bench", "measure", "null", "--out", tmp_path / "r.txt")
    assert isinstance(result.exception, CompactLMError) and "must end in .parquet or .csv" in str(result.exception)
    result = cli(
        "bench", "measure", "null", "--dataset", tmp_path / "set.jsonl", "--requests", "9", "--out", tmp_path / "r.csv"
    )
    assert isinstance(result.exception, CompactLMError) and "does not exist" in str(result.exception)
