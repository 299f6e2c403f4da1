"""Text data: the fixed held-out split, document sources, packing into [N, L] token sequences."""

from __future__ import annotations

import hashlib

import pytest
import torch

import compactlm.compress.data as data
from compactlm.compress.data import (
    Corpus,
    check_data,
    describe,
    documents,
    is_heldout,
    iter_token_stream,
    load_sequences,
    split_documents,
)
from compactlm.core.errors import CompactLMError
from tests.helpers import CharTokenizer, english_docs, write_jsonl


def _ids(docs) -> list[str]:
    return [d.doc_id for d in docs]


def test_is_heldout_is_the_documented_hash_rule_and_about_ten_percent():
    ids = [f"corpus/doc-{i}.rst.txt" for i in range(2000)]
    flags = [is_heldout(i) for i in ids]
    assert flags == [is_heldout(i) for i in ids]  # deterministic
    assert flags == [int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % 100 < 10 for i in ids]
    assert 0.07 <= sum(flags) / len(flags) <= 0.13


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", english_docs(200, words_per_doc=8))


def test_splits_are_disjoint_cover_everything_and_ignore_the_seed(jsonl):
    every = _ids(documents(jsonl))
    assert len(every) == 200 and len(set(every)) == 200
    train, heldout = _ids(split_documents(jsonl, "train")), _ids(split_documents(jsonl, "heldout"))
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(every)
    assert len(train) + len(heldout) == 200
    assert 0 < len(heldout) < 40
    assert all(is_heldout(i) for i in heldout) and not any(is_heldout(i) for i in train)
    other_seed = _ids(split_documents(jsonl, "train", seed=123))
    assert set(other_seed) == set(train)  # the split never depends on the seed ...
    assert other_seed != train  # ... only the order does
    assert _ids(split_documents(jsonl, "train", seed=123)) == other_seed  # and that order is reproducible


def test_split_does_not_depend_on_what_else_is_in_the_file(tmp_path):
    texts = english_docs(120, words_per_doc=5)
    small = write_jsonl(tmp_path / "docs.jsonl", texts[:60])
    small_heldout = set(_ids(split_documents(small, "heldout")))
    big = write_jsonl(tmp_path / "docs.jsonl", texts)
    big_heldout = set(_ids(split_documents(big, "heldout")))
    assert small_heldout == {i for i in big_heldout if int(i.rsplit(":", 1)[1]) <= 60}


def test_unknown_split_is_refused(jsonl):
    with pytest.raises(CompactLMError, match="unknown split 'test'; splits: train, heldout"):
        split_documents(jsonl, "test")


def test_load_sequences_packs_documents_with_eos_between(tmp_path):
    texts = [f"document number {i} says hello" for i in range(50)]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    tokenizer = CharTokenizer()
    sequences = load_sequences(source, tokenizer, num_sequences=6, seq_len=20, seed=5)
    assert sequences.shape == (6, 20) and sequences.dtype == torch.long
    stream: list[int] = []
    for doc in split_documents(source, "train", seed=5):
        stream += CharTokenizer()(doc.load())["input_ids"] + [CharTokenizer.eos_token_id]
    assert sequences.flatten().tolist() == stream[:120]
    assert (sequences == 0).sum() == stream[:120].count(0) > 0  # EOS separates the documents
    # the seed changes which documents come first, not the shape
    assert not torch.equal(sequences, load_sequences(source, CharTokenizer(), num_sequences=6, seq_len=20, seed=6))


def test_load_sequences_tokenizes_only_the_documents_it_needs(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [f"text {i} " * 10 for i in range(100)])
    tokenizer = CharTokenizer()
    load_sequences(source, tokenizer, num_sequences=1, seq_len=100)
    assert tokenizer.calls <= 2


def test_blank_documents_add_no_separator(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", ["   ", "\n"] * 20 + [f"doc {i}" for i in range(30)])
    tokens = [t for ids in iter_token_stream(split_documents(source, "train"), CharTokenizer()) for t in ids]
    pairs = list(zip(tokens, tokens[1:], strict=False))
    assert (0, 0) not in pairs and tokens[0] != 0


def test_text_files_are_cut_into_documents_of_whole_paragraphs(tmp_path):
    paragraphs = [f"paragraph {i} " + "words " * 100 for i in range(40)]  # ~600 chars each
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs))
    docs = documents(path)
    assert _ids(docs) == [f"book.txt:{i}" for i in range(len(docs))]
    texts = [d.load() for d in docs]
    assert all(len(t) >= data.TEXT_BLOCK_CHARS for t in texts[:-1])
    assert "\n\n".join(texts) == path.read_text()  # nothing lost, no paragraph cut
    assert 4 <= len(docs) <= 7


def test_a_folder_reads_text_markdown_and_jsonl_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha text")
    (folder / "sub" / "b.md").write_text("beta text")
    write_jsonl(folder / "c.jsonl", ["gamma", "delta"])
    (folder / "ignored.csv").write_text("x,y")
    docs = documents(folder)
    assert sorted(_ids(docs)) == ["a.txt:0", "c.jsonl:1", "c.jsonl:2", "sub/b.md:0"]
    assert sorted(d.load() for d in docs) == ["alpha text", "beta text", "delta", "gamma"]


def test_document_ids_in_a_folder_are_unique(tmp_path):
    for sub in ("2023", "2024"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "notes.txt").write_text(f"notes of {sub}")
        write_jsonl(tmp_path / sub / "mail.jsonl", [f"mail of {sub}"])
    ids = _ids(documents(tmp_path))
    assert len(ids) == 4
    assert len(set(ids)) == 4, ids


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text here"}\n')
    with pytest.raises(CompactLMError, match=r'bad\.jsonl:3 has no string field "text"'):
        documents(path)
    path.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(CompactLMError, match=r'bad\.jsonl:2 has no string field "text"'):
        documents(path)


def test_jsonl_with_bad_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(CompactLMError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_sequences(path, CharTokenizer(), num_sequences=1, seq_len=4)


def test_empty_text_file_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(CompactLMError, match="has no documents in its 'train' split"):
        load_sequences(path, CharTokenizer(), num_sequences=1, seq_len=4)


def test_too_little_data_reports_the_token_count(tmp_path):
    texts = [f"doc {i}" for i in range(300)]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    have = sum(len(d.load()) + 1 for d in split_documents(source, "train"))  # chars + EOS
    assert have > 1000  # the message's thousands separator is exercised
    with pytest.raises(CompactLMError) as info:
        load_sequences(source, CharTokenizer(), num_sequences=10, seq_len=500)
    message = str(info.value)
    assert f"has only {have:,} tokens in its 'train' split" in message
    assert "10 x 500 = 5,000 are needed" in message


@pytest.mark.parametrize("kwargs", [dict(num_sequences=0, seq_len=8), dict(num_sequences=1, seq_len=1)])
def test_load_sequences_refuses_empty_shapes(jsonl, kwargs):
    with pytest.raises(CompactLMError, match="at least 1 sequence of at least 2 tokens"):
        load_sequences(jsonl, CharTokenizer(), **kwargs)


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(CompactLMError, match="neither a bundled corpus .*python-docs.* nor an existing file"):
        documents(tmp_path / "missing.jsonl")
    with pytest.raises(CompactLMError, match="neither a bundled corpus"):
        load_sequences("wikipedia", CharTokenizer(), num_sequences=1, seq_len=4)


def test_bundled_corpora_read_rst_sources(tmp_path, monkeypatch):
    root = tmp_path / "_sources"
    (root / "library").mkdir(parents=True)
    for i in range(30):
        (root / "library" / f"mod{i}.rst.txt").write_text(f"Module {i}\n========\n\nIt does thing {i}.")
    (root / "index.html").write_text("<html>ignored</html>")
    corpus = Corpus("toy-docs", str(root), "toy-doc", "MIT", "toy sources")
    monkeypatch.setattr(data, "CORPORA", {"toy-docs": corpus})
    docs = documents("toy-docs")
    assert sorted(_ids(docs)) == sorted(f"toy-docs/library/mod{i}.rst.txt" for i in range(30))
    sequences = load_sequences("toy-docs", CharTokenizer(), num_sequences=4, seq_len=16)
    assert sequences.shape == (4, 16)
    info = describe("toy-docs")
    assert info["debian_package"] == "toy-doc" and info["license"] == "MIT"
    assert info["heldout_rule"] == "sha256(doc_id)[:8] % 100 < 10"


def test_missing_corpus_says_which_debian_package_to_install(tmp_path, monkeypatch):
    corpus = Corpus("toy-docs", str(tmp_path / "absent"), "toy-doc", "MIT", "toy sources")
    monkeypatch.setattr(data, "CORPORA", {"toy-docs": corpus})
    with pytest.raises(CompactLMError, match="needs the Debian package toy-doc: run `apt-get install toy-doc`"):
        documents("toy-docs")


def test_check_data_refuses_empty_data_and_an_empty_split(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", english_docs(30, words_per_doc=5))
    check_data(good)
    check_data(good, split="heldout")
    blank = write_jsonl(tmp_path / "blank.jsonl", ["  ", "\n"])
    with pytest.raises(CompactLMError, match="is empty: no document has any text"):
        check_data(blank)
    # a single document that the fixed hash holds out: the train split is empty
    name = next(f"one{i}.jsonl" for i in range(1000) if is_heldout(f"one{i}.jsonl:1"))
    lonely = write_jsonl(tmp_path / name, ["the only document"])
    check_data(lonely, split="heldout")
    with pytest.raises(CompactLMError, match=r"has no documents in its 'train' split \(1 documents in all; 10%"):
        check_data(lonely)


def test_describe_a_file_has_no_package():
    assert describe("some.jsonl") == {"source": "some.jsonl", "heldout_rule": "sha256(doc_id)[:8] % 100 < 10"}
