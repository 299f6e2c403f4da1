"""Architecture search: the enumerated space (budget, deployability, budget errors), selection, the Pareto front,
and a whole resumable search on a tiny model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import compactlm.compress.retrain
from compactlm.compress.arch import count_params, shape_of
from compactlm.compress.checkpoint import load_model
from compactlm.compress.evaluate import count_model_params
from compactlm.compress.importance import random_scores
from compactlm.compress.prune import plan, prune
from compactlm.compress.search import SearchConfig, pareto_front, run_search, select
from compactlm.compress.search_space import SearchSpace, enumerate_candidates, grid, parse_axes, parse_budget
from compactlm.core.errors import CompactLMError
from tests.helpers import cli, logits, random_tokens, tiny_config, tiny_model


def test_budgets_and_axes_are_read_as_written():
    assert parse_budget("50%") == 0.5
    assert parse_budget("67M") == 67e6
    assert parse_budget("0.4") == 0.4
    assert parse_axes("hidden,layers") == ("depth", "width")
    with pytest.raises(CompactLMError, match="unknown search axis depht"):
        parse_axes("depht,width")


def test_a_grid_starts_at_the_original_and_keeps_to_multiples():
    assert grid(30, 1, 0.125, 0.25) == [30, 26, 22, 19, 15, 11, 8]
    assert grid(576, 144, 0.125, 0.25) == [576, 432, 288, 144]
    assert all(v % 16 == 0 for v in grid(1536, 16, 0.1, 0.3)[1:])


def test_every_candidate_is_within_the_budget_and_deployable():
    config = tiny_config(num_hidden_layers=8, hidden_size=96, intermediate_size=192)
    total = count_params(shape_of(config))
    space = SearchSpace(0.6, tolerance=0.05, multiple_of=8)
    candidates = enumerate_candidates(config, space)
    assert len(candidates) > 5
    assert len({c.name for c in candidates}) == len(candidates)
    for c in candidates:
        assert 0.57 * total <= c.params <= 0.63 * total
        assert c.params == count_params(c.shape)
        shape = c.shape
        assert shape.head_dim == 16  # kept
        assert shape.num_attention_heads % shape.num_query_groups == 0
        assert shape.num_attention_heads // shape.num_query_groups <= 2  # at most the model's heads per group
        assert shape.hidden_size % 8 == 0 and shape.ffn_hidden_size % 8 == 0
        assert shape.hidden_size % shape.num_attention_heads == 0  # LlamaConfig insists
        assert plan(config, c.target)[0] == shape
    # the space really spans the axes
    assert len({c.shape.num_layers for c in candidates}) > 1
    assert len({c.shape.hidden_size for c in candidates}) > 1
    assert len({c.shape.num_query_groups for c in candidates}) > 1


def test_a_candidate_prunes_into_a_model_of_exactly_its_counted_size():
    model = tiny_model(num_hidden_layers=6, hidden_size=96, intermediate_size=192)
    candidate = enumerate_candidates(model.config, SearchSpace(0.55, multiple_of=8))[0]
    student, _, _ = prune(model, random_scores(model.config, block_sizes=(1, 2, 3, 4, 5)), candidate.target)
    assert count_model_params(student) == candidate.params
    assert logits(student, random_tokens(2, 8)).isfinite().all()


def test_a_budget_depth_alone_cannot_reach_names_the_axis_and_what_to_add():
    config = tiny_config(num_hidden_layers=8, hidden_size=96, vocab_size=2048)  # embeddings: 196k of 456k
    with pytest.raises(CompactLMError) as error:
        enumerate_candidates(config, SearchSpace(0.4, axes=("depth",), multiple_of=8))
    message = str(error.value)
    assert "depth alone reaches at most -" in message
    assert "embedding table shrinks only with width" in message
    assert "add --axes depth,width" in message


def test_a_budget_between_grid_points_asks_for_a_wider_tolerance():
    config = tiny_config(num_hidden_layers=4)
    with pytest.raises(CompactLMError, match="widen --tolerance"):
        enumerate_candidates(config, SearchSpace(0.9, tolerance=0.001, axes=("depth",)))
    with pytest.raises(CompactLMError, match="not below the model's"):
        enumerate_candidates(config, SearchSpace(2e9))


def test_selection_takes_the_best_of_each_structure_before_the_second_best():
    screen = pd.DataFrame(
        {
            "candidate": ["a", "b", "c", "d"],
            "layers": [4, 4, 3, 3],
            "heads": [6, 6, 6, 6],
            "kv_groups": [3, 3, 3, 3],
            "zero_shot_loss": [1.0, 1.1, 2.0, 3.0],
        }
    )
    assert select(screen, 2) == ["a", "c"]  # not a, b: they differ only in width
    assert select(screen, 3) == ["a", "c", "b"]


def test_the_pareto_front_keeps_only_undominated_points():
    frame = pd.DataFrame({"heldout_loss": [1.0, 2.0, 1.5, 3.0, 1.0], "request_throughput": [1.0, 3.0, 2.0, 2.5, 0.5]})
    assert pareto_front(frame).tolist() == [True, True, True, False, False]


def test_search_config_refuses_what_cannot_work():
    with pytest.raises(CompactLMError, match="--rank-by"):
        SearchConfig(0.5, rank_by="speed")
    with pytest.raises(CompactLMError, match="same objective"):
        SearchConfig(0.5, loss="auto")
    with pytest.raises(CompactLMError, match="--tolerance"):
        SearchConfig(0.5, tolerance=1.5)


def _search_config(corpus, **overrides) -> SearchConfig:
    values = dict(
        params=0.6,
        tolerance=0.06,
        axes=("depth", "width", "heads", "ffn"),
        candidates=2,
        retrain_tokens=64,
        multiple_of=8,
        data=str(corpus),
        seq_len=16,
        batch_size=2,
        importance_samples=4,
        depth_samples=2,
        screen_samples=2,
        eval_samples=2,
        top_k=8,
    )
    return SearchConfig(**(values | overrides))


def _fake_measure(calls):
    def measure(models):
        results = []
        for checkpoint, _engine in models:
            calls.append(str(checkpoint))
            params = count_model_params(load_model(checkpoint))
            results.append({"request_throughput": 1e8 / params, "output_throughput": 1e10 / params})
        return results

    return measure


def test_a_search_ranks_retrains_resumes_and_publishes_its_winner(retrain_checkpoints, tmp_path, monkeypatch):
    corpus, teacher = retrain_checkpoints["corpus"], retrain_checkpoints["teacher"]
    out = tmp_path / "search"
    distills, measured = [], []
    real_distill = compactlm.compress.retrain.distill_checkpoint
    monkeypatch.setattr(
        compactlm.compress.retrain, "distill_checkpoint", lambda *a, **k: distills.append(a[1]) or real_distill(*a, **k)
    )
    cfg = _search_config(corpus, candidates=1, rank_by="loss+throughput")
    first = run_search(teacher, out, cfg, measure=_fake_measure(measured))
    assert len(distills) == 1
    assert first.candidates["zero_shot_loss"].notna().all()  # more candidates than K: all screened
    board = first.leaderboard
    cands = board[board["role"] == "candidate"]
    assert len(cands) == 1 and cands["heldout_loss"].notna().all() and cands["retrain_tokens"].iloc[0] >= 64
    assert set(board["role"]) == {"candidate", "source"}
    assert (out / "leaderboard.csv").is_file() and (out / "leaderboard.parquet").is_file()
    assert (out / "search.png").stat().st_size > 10_000
    assert (out / "teacher-cache" / "cache.json").is_file()

    # K=2 on the same folder: the finished candidate is reused, only the new one is distilled and measured
    second = run_search(
        teacher, out, _search_config(corpus, candidates=2, rank_by="loss+throughput"), measure=_fake_measure(measured)
    )
    assert len(distills) == 2
    assert len(measured) == 2 + 1  # two candidates and the source, each once
    cands = second.leaderboard[second.leaderboard["role"] == "candidate"]
    assert len(cands) == 2 and cands["rank"].tolist() == [1, 2]
    assert cands["heldout_loss"].is_monotonic_increasing
    assert cands["on_front"].any()
    winner = load_model(second.winner)  # the pruned checkpoint of the winner, loadable as is
    row = cands[cands["winner"]].iloc[0]
    assert count_model_params(winner) == row["params"]
    assert json.loads((out / "winner.json").read_text())["candidate"] == row["candidate"]

    # ranked by loss alone (no engines): the same candidates, the best loss wins
    by_loss = run_search(teacher, out, _search_config(corpus, candidates=2)).leaderboard
    assert len(distills) == 2 and "request_throughput" not in by_loss
    cands = by_loss[by_loss["role"] == "candidate"]
    assert cands.loc[cands["heldout_loss"].idxmin(), "winner"]

    # other retraining settings: both candidates are retrained; the importance pass and the screen are reused
    scores_written = (out / "scores.safetensors").stat().st_mtime_ns
    longer = run_search(teacher, out, _search_config(corpus, candidates=2, retrain_tokens=128)).leaderboard
    assert len(distills) == 4 and (out / "scores.safetensors").stat().st_mtime_ns == scores_written
    assert (longer.loc[longer["role"] == "candidate", "retrain_tokens"] >= 128).all()
    # another model in the same folder is another search: refused
    with pytest.raises(CompactLMError, match="run folder of search"):
        run_search(retrain_checkpoints["student"], out, _search_config(corpus))


def test_the_search_command_shows_the_table_and_refuses_an_unreachable_budget(retrain_checkpoints, tmp_path):
    teacher = retrain_checkpoints["teacher"]
    result = cli(
        "compress", "search", teacher, "--out", tmp_path / "s", "--params", "60%", "--multiple-of", "8", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "candidates within 60%" in result.output and "L4-" in result.output
    assert not (tmp_path / "s").exists()  # a dry run spends nothing
    result = cli("compress", "search", teacher, "--out", tmp_path / "s", "--params", "20%", "--axes", "depth")
    assert isinstance(result.exception, CompactLMError)
    assert "depth alone reaches at most" in str(result.exception)


def test_throughput_is_measured_interleaved_on_engines_built_once(tiny_dir, tmp_path):
    from compactlm.bench.candidates import ThroughputSpec, measure_throughput

    spec = ThroughputSpec(isl=8, osl=4, batch=2, repeats=2, backend="torch")
    models = [(tiny_dir, tmp_path / "a"), (tiny_dir, tmp_path / "b")]
    first = measure_throughput(models, spec)
    assert [len(r["request_throughput_runs"]) for r in first] == [2, 2]  # the warm-up round is not counted
    assert all(r["request_throughput"] > 0 and r["output_throughput"] > r["request_throughput"] for r in first)
    built = (tmp_path / "a" / "engine.json").stat().st_mtime_ns
    measure_throughput(models[:1], spec)
    assert (tmp_path / "a" / "engine.json").stat().st_mtime_ns == built  # reused, not rebuilt
