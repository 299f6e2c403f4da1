"""The accuracy-throughput front: which points are on it, the points built from a headline table, and the figure's
points as drawn."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from compactlm.bench.front import front_points, pareto, plot_front


def test_pareto_keeps_the_points_nothing_beats_on_both_axes():
    frame = pd.DataFrame(
        {
            "x": [1.0, 2.0, 3.0, 3.0, 0.5, math.nan],
            "ppl": [10.0, 20.0, 15.0, 16.0, 30.0, 1.0],
        }
    )
    # 1: the best perplexity; 3: the fastest and better than 4 at the same speed; 2 is beaten by 3 on both
    assert pareto(frame, "x", "ppl", higher_better=False).tolist() == [True, False, True, False, False, False]
    acc = frame.assign(acc=[0.5, 0.6, 0.4, 0.4, 0.9, 0.99])
    assert pareto(acc, "x", "acc", higher_better=True).tolist() == [False, True, True, True, True, False]  # 2, 3 equal
    tie = pd.DataFrame({"x": [1.0, 1.0], "y": [2.0, 2.0]})
    assert pareto(tie, "x", "y", higher_better=True).tolist() == [True, True]  # equal points do not beat each other


def _headline() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"model": "teacher", "perplexity": 13.2, "acc_a": 0.3, "acc_b": 0.5},  # as shipped: no engine
            {"model": "big", "perplexity": 10.0, "acc_a": 0.4, "acc_b": 0.5, "req/s bf16": 3.0, "req/s int8": 3.6},
            {"model": "small", "perplexity": 99.0, "acc_a": 0.2, "acc_b": 0.4, "req/s bf16": 7.0, "req/s int8": 8.0},
            {"model": "bad", "perplexity": 120.0, "acc_a": 0.1, "acc_b": 0.3, "req/s bf16": 5.0, "req/s int8": 5.5},
        ]
    )


def test_front_points_are_one_per_model_and_precision_from_the_table():
    points = front_points(_headline(), ["bf16", "int8"])
    assert list(zip(points["model"], points["precision"], strict=True)) == [
        ("big", "bf16"), ("big", "int8"), ("small", "bf16"), ("small", "int8"), ("bad", "bf16"), ("bad", "int8"),
    ]  # fmt: skip
    assert points["request_throughput"].tolist() == [3.0, 3.6, 7.0, 8.0, 5.0, 5.5]
    assert points["mean accuracy"].tolist() == pytest.approx([0.45, 0.45, 0.3, 0.3, 0.2, 0.2])
    # big int8 beats big bf16 (same quality, faster); small int8 is the fastest; bad is beaten by small
    assert points["front perplexity"].tolist() == [False, True, False, True, False, False]
    assert points["front mean accuracy"].tolist() == [False, True, False, True, False, False]


def test_the_figure_and_its_points_as_drawn(tmp_path):
    points = front_points(_headline(), ["bf16", "int8"])
    path = plot_front(points, tmp_path / "front.png", teacher="big", references={"perplexity": {"shipped": 13.2}})
    assert path.is_file() and path.stat().st_size > 10_000
    drawn = pd.read_csv(tmp_path / "front.csv")
    assert set(drawn["panel"]) == {"perplexity", "mean accuracy"} and len(drawn) == 2 * len(points)
    for panel in ("perplexity", "mean accuracy"):
        mine = drawn[drawn["panel"] == panel].sort_values(["model", "precision"]).reset_index(drop=True)
        want = points.sort_values(["model", "precision"]).reset_index(drop=True)
        assert mine["x"].tolist() == pytest.approx(want["request_throughput"].tolist())
        assert mine["y"].tolist() == pytest.approx(want[panel].tolist())
    assert plot_front(points.iloc[0:0], tmp_path / "none.png") is None
