"""Data mixtures: parsed and checked before any work, exact row counts, each source's own held-out split."""

from __future__ import annotations

import pytest
import torch

from compactlm.compress.data import check_data, describe, load_sequences
from compactlm.compress.mixture import is_mix, mix_string, parse_mix
from compactlm.core.errors import CompactLMError
from tests.helpers import CharTokenizer, write_jsonl


def _source(path, letter: str, n: int = 60):
    """Documents made of one letter only, so that a row tells which source it came from."""
    return write_jsonl(path, [f"{letter * 30} {i}" for i in range(n)])


def test_rows_follow_the_weights_exactly_and_come_shuffled(tmp_path):
    a, b = _source(tmp_path / "a.jsonl", "a"), _source(tmp_path / "b.jsonl", "b")
    tok = CharTokenizer()
    mix = f"{a}:3,{b}:1"
    assert is_mix(mix) and not is_mix(str(a))
    rows = load_sequences(mix, tok, num_sequences=8, seq_len=16)
    a_id, b_id = (ord(c) % 250 + 1 for c in "ab")  # CharTokenizer's ids
    letters = ["a" if (r == a_id).sum() > (r == b_id).sum() else "b" for r in rows]
    assert letters.count("a") == 6 and letters.count("b") == 2
    assert letters != sorted(letters)  # interleaved, not a then b
    assert torch.equal(rows, load_sequences(mix, tok, num_sequences=8, seq_len=16))  # reproducible
    held = load_sequences(mix, tok, num_sequences=4, seq_len=8, split="heldout")
    only_a = load_sequences(str(a), tok, num_sequences=3, seq_len=8, split="heldout")
    assert {tuple(r.tolist()) for r in only_a} <= {tuple(r.tolist()) for r in held}  # each source's own held-out rows
    assert [p["weight"] for p in describe(mix)["mix"]] == [3.0, 1.0]


def test_counts_sum_to_the_total_with_the_largest_remainders_rounded_up():
    mix = parse_mix("x:1,y:1,z:1")
    assert mix.counts(10) == [4, 3, 3] or sorted(mix.counts(10)) == [3, 3, 4]
    assert sum(mix.counts(10)) == 10
    assert parse_mix("x:0,y:2").counts(5) == [0, 5]


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("python-docs:0,linux-docs:0", "weights must sum to a positive number"),
        ("python-docs:-1,linux-docs:2", "must be a number >= 0"),
        ("python-docs:abc", "is not a number"),
        ("python-docs:1,python-docs:2", "named twice"),
        ("python-docs:1,nosuch-corpus:1", "nosuch-corpus is neither a bundled corpus"),
        ("python-docs:1,english:1", "english is held out for evaluation only"),
    ],
)
def test_bad_mixes_are_one_clear_error(mix, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompactLMError, match=message):
        check_data(mix)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_yaml_mapping_becomes_the_string_form():
    assert mix_string({"python-docs": 0.7, "linux-docs": 0.3}) == "python-docs:0.7,linux-docs:0.3"
    assert mix_string("python-docs") == "python-docs"
    with pytest.raises(CompactLMError, match="must be a number"):
        mix_string({"python-docs": "lots"})


def test_a_source_short_of_its_share_is_named(tmp_path):
    a, b = _source(tmp_path / "a.jsonl", "a"), _source(tmp_path / "b.jsonl", "b", n=2)
    with pytest.raises(CompactLMError, match=r"b.jsonl's share \(4 rows\)"):
        load_sequences(f"{a}:1,{b}:1", CharTokenizer(), num_sequences=8, seq_len=64)
