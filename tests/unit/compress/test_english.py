"""The general-English held-out set: pulled from a (fake) brotli sdist, held out whole, refused for training."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from compactlm.compress import english
from compactlm.compress.data import check_data, describe, documents, load_sequences, split_documents
from compactlm.core.errors import CompactLMError
from tests.helpers import CharTokenizer, fake_brotli


@pytest.fixture
def local_brotli(tmp_path, monkeypatch):
    monkeypatch.setenv(english.BROTLI.env, str(fake_brotli(tmp_path / "brotli-1.2.1.tar.gz")))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no download when the sdist is given"))


def test_pull_writes_the_four_texts_once_with_unix_line_ends(local_brotli):
    folder = english.pull_english()
    assert sorted(p.name for p in folder.glob("*.txt")) == sorted(english.TEXTS.values())
    assert b"\r" not in (folder / "alice29.txt").read_bytes()
    assert not list(folder.glob(".*.tmp-*"))
    assert "public domain" in (folder / ".compactlm-pulled").read_text()


def test_english_is_held_out_whole_and_never_trained_on(local_brotli):
    docs = documents("english")
    assert {d.doc_id.split(":")[0] for d in docs} == {f"english/{n}" for n in english.TEXTS.values()}
    assert len(split_documents("english", "heldout")) == len(docs)  # no hash split: every document
    check_data("english", "heldout")
    for refused in (lambda: check_data("english"), lambda: split_documents("english", "train")):
        with pytest.raises(CompactLMError, match="held out for evaluation only"):
            refused()
    rows = load_sequences("english", CharTokenizer(), num_sequences=8, seq_len=64, split="heldout")
    assert rows.shape == (8, 64)
    assert describe("english")["heldout_rule"] == "held out whole (evaluation only)"


def test_a_sdist_without_the_texts_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(english.BROTLI.env, str(fake_brotli(tmp_path / "b.tar.gz", texts=["alice29.txt"])))
    with pytest.raises(CompactLMError, match="lacks asyoulik.txt, lcet10.txt, plrabn12.txt"):
        english.pull_english()
    assert not english.english_dir().exists()


def test_a_download_is_checked_against_its_digest(tmp_path, monkeypatch):
    def pip(cmd, **kwargs):
        fake_brotli(english.Path(cmd[cmd.index("-d") + 1]) / english.BROTLI.filename)
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.delenv(english.BROTLI.env, raising=False)
    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(CompactLMError, match="does not have the expected SHA-256"):
        english.pull_english()
    assert not english.english_dir().exists()
