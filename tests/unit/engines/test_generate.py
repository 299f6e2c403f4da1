"""Teacher-generated data: sampled through an engine, filtered, reproducible from its seed, a data source like any."""

from __future__ import annotations

import json

import pytest

from compactlm.compress.data import check_data, is_heldout, load_sequences
from compactlm.core.errors import CompactLMError
from compactlm.engines.generate import CORPUS_FILE, RECORD_FILE, GenerateConfig, _Filter, generate_corpus
from tests.helpers import tiny_engine


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("gen"))


def _texts(folder):
    return [json.loads(line)["text"] for line in (folder / CORPUS_FILE).read_text().splitlines()]


def test_generates_a_seeded_corpus_with_its_record(engine_dir, tmp_path):
    cfg = GenerateConfig(tokens=600, max_new_tokens=40, min_tokens=8, batch_size=4, seed=3)
    record = generate_corpus(str(engine_dir), tmp_path / "gen", cfg)
    assert record["tokens"]["kept"] >= 600 and record["samples"]["kept"] == len(_texts(tmp_path / "gen"))
    assert json.loads((tmp_path / "gen" / RECORD_FILE).read_text())["config"]["seed"] == 3
    assert record["engine"]["backend"] == "torch" and record["generated_tokens_per_second"] > 0
    generate_corpus(str(engine_dir), tmp_path / "again", cfg)
    assert _texts(tmp_path / "again") == _texts(tmp_path / "gen")  # the same seed, the same corpus
    other = generate_corpus(str(engine_dir), tmp_path / "other", GenerateConfig(**{**cfg.__dict__, "seed": 4}))
    assert _texts(tmp_path / "other") != _texts(tmp_path / "gen")
    assert record["samples"]["submitted"] >= other["samples"]["kept"] - 4
    # an ordinary data source with the fixed held-out split (about 10% of the lines)
    check_data(tmp_path / "gen")
    lines = len(_texts(tmp_path / "gen"))
    held = sum(is_heldout(f"{CORPUS_FILE}:{i}") for i in range(1, lines + 1))
    assert held < lines
    from compactlm.engines.registry import load_engine

    with load_engine(engine_dir) as engine:
        rows = load_sequences(tmp_path / "gen", engine.tokenizer, num_sequences=4, seq_len=16)
    assert rows.shape == (4, 16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_the_filter_drops_short_degenerate_and_repeated_samples():
    keep = _Filter(min_tokens=4)
    story = list(range(40))
    assert keep.keep(story)
    assert not keep.keep(story[:3])  # short
    assert not keep.keep([1, 2, 3] * 20)  # loops on itself
    assert not keep.keep(story[:36] + [99, 98, 97, 96])  # most of its 8-grams seen before
    assert keep.keep(list(range(100, 140)))
    assert keep.dropped == {"short": 1, "degenerate": 1, "near_duplicate": 1}


def test_an_existing_output_is_kept_without_overwrite(engine_dir, tmp_path):
    (tmp_path / "gen").mkdir()
    with pytest.raises(CompactLMError, match="exists: give --overwrite"):
        generate_corpus(str(engine_dir), tmp_path / "gen", GenerateConfig(tokens=10))
