"""Text data: the bundled corpora (Debian doc packages) and user files, with a fixed held-out split, packed
into fixed-length token sequences.

The held-out split is decided per document by a hash of its id, so it never depends on listing order, on
the seed or on how many samples are asked for: a document is held out iff
`int(sha256(doc_id)[:8], 16) % 100 < HELDOUT_PERCENT`. Calibration and training read only the `train` split;
perplexity is measured only on `heldout`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compactlm.compress.mixture import is_mix, parse_mix
from compactlm.core.errors import CompactLMError

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
TEXT_BLOCK_CHARS = 4000
"""A plain text file is cut into documents of whole paragraphs, at least this long, to be split."""


@dataclass(frozen=True)
class Corpus:
    name: str
    root: str
    """Its folder; relative to $COMPACTLM_HOME for a pulled corpus."""
    debian_package: str | None
    license: str
    description: str
    pattern: str = "*.rst.txt"
    heldout_only: bool = False
    """Evaluation only: every document is held out, and its train split is refused."""
    pulled: bool = False
    """Downloaded on first use (compress/english.py) rather than installed from Debian."""

    def folder(self) -> Path:
        if not self.pulled:
            return Path(self.root)
        from compactlm.compress.english import pull_english

        return pull_english()


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            "python-docs",
            "/usr/share/doc/python3.11/html/_sources",
            "python3.11-doc",
            "PSF-2.0",
            "Python 3.11 documentation sources (497 .rst.txt files, ~11 MB of English prose and code)",
        ),
        Corpus(
            "linux-docs",
            "/usr/share/doc/linux-doc-6.1/html/_sources",
            "linux-doc-6.1",
            "GPL-2.0",
            "Linux 6.1 kernel documentation sources (3,183 .rst.txt files, ~24 MB)",
        ),
        Corpus(
            "english",
            "data/english",
            None,
            "public domain (Project Gutenberg texts; via PyPI brotli==1.2.1, MIT)",
            "General English held out whole: Carroll, Shakespeare, Milton and a 1992 report (the Canterbury "
            "corpus' four English texts, ~1.2 MB; compress/english.py)",
            pattern="*.txt",
            heldout_only=True,
            pulled=True,
        ),
    ]
}
GENERAL_ENGLISH = "english"
"""The held-out set every evaluation reports beside the in-domain one."""


def is_heldout(doc_id: str) -> bool:
    """The fixed held-out rule (see the module docstring)."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


@dataclass(frozen=True)
class Document:
    doc_id: str
    load: object
    """Callable returning the text; files are read lazily, only when their tokens are needed."""


def _corpus_documents(corpus: Corpus) -> list[Document]:
    root = corpus.folder()
    if corpus.pattern == "*.txt":  # plain text files, cut into documents of whole paragraphs
        return [doc for f in sorted(root.glob(corpus.pattern)) for doc in _text_documents(f, f"{corpus.name}/{f.name}")]
    if not root.is_dir():
        raise CompactLMError(
            f"corpus {corpus.name!r} needs the Debian package {corpus.debian_package}: "
            f"run `apt-get install {corpus.debian_package}` (or `make setup`)"
        )
    files = sorted(root.rglob(corpus.pattern))
    return [Document(f"{corpus.name}/{f.relative_to(root)}", lambda f=f: f.read_text(errors="replace")) for f in files]


def _jsonl_documents(path: Path, name: str) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompactLMError(f"{path}:{line_no} is not valid JSON ({exc.msg})") from exc
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise CompactLMError(f'{path}:{line_no} has no string field "text"')
            docs.append(Document(f"{name}:{line_no}", lambda text=text: text))
    return docs


def _text_documents(path: Path, name: str) -> list[Document]:
    text = path.read_text(errors="replace")
    blocks, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= TEXT_BLOCK_CHARS:
            blocks.append(current)
            current = ""
    if current.strip():
        blocks.append(current)
    return [Document(f"{name}:{i}", lambda b=b: b) for i, b in enumerate(blocks)]


SNIFF_BYTES = 1 << 16


def check_text(path: Path) -> None:
    """Refuse a file that is not UTF-8 text (a NUL byte or an invalid sequence in its first 64 KiB), before any
    tokenizer or model sees it."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        raise CompactLMError(f"data {path} is not text (a NUL byte at offset {nul}): give UTF-8 text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise CompactLMError(f"data {path} is not UTF-8 text (an invalid byte at offset {exc.start})") from exc


def _file_documents(path: Path, name: str) -> list[Document]:
    """Documents of one file; `name` (the path inside the data folder) prefixes their ids."""
    check_text(path)
    return _jsonl_documents(path, name) if path.suffix == ".jsonl" else _text_documents(path, name)


def documents(source: str | os.PathLike) -> list[Document]:
    """All documents of a named corpus, a .jsonl file ({"text": ...} per line), a text file or a folder of them."""
    if is_mix(source):
        raise CompactLMError(f"{source!r} is a data mix: give one source here (mixes make training sequences)")
    if str(source) in CORPORA:
        return _corpus_documents(CORPORA[str(source)])
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md", ".rst", ".jsonl"})
        return [doc for f in files for doc in _file_documents(f, f.relative_to(path).as_posix())]
    if path.is_file():
        return _file_documents(path, path.name)
    raise CompactLMError(
        f"data {source!s} is neither a bundled corpus ({', '.join(CORPORA)}) nor an existing file or folder"
    )


def split_documents(source: str | os.PathLike, split: str, seed: int = 0) -> list[Document]:
    """The documents of one split, shuffled with `seed` (the split itself never depends on the seed)."""
    if split not in SPLITS:
        raise CompactLMError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    _check_trainable(source, split)
    if str(source) in CORPORA and CORPORA[str(source)].heldout_only:
        docs = documents(source)
    else:
        docs = [d for d in documents(source) if is_heldout(d.doc_id) == (split == "heldout")]
    random.Random(seed).shuffle(docs)
    return docs


def iter_token_stream(docs: list[Document], tokenizer) -> Iterator[list[int]]:
    """Token ids of each non-empty document followed by the EOS separator."""
    eos = tokenizer.eos_token_id
    for doc in docs:
        text = doc.load()
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        yield ids + ([eos] if eos is not None else [])


def load_sequences(
    source: str | os.PathLike,
    tokenizer,
    *,
    num_sequences: int,
    seq_len: int,
    split: str = "train",
    seed: int = 0,
    allow_fewer: bool = False,
):
    """`num_sequences` packed sequences of exactly `seq_len` tokens, as a LongTensor [N, seq_len].

    Documents are concatenated (EOS between them) and cut into fixed-length rows; only as many documents
    as needed are read and tokenized. With `allow_fewer`, a smaller corpus gives all the rows it has.
    """
    import torch

    if num_sequences < 1 or seq_len < 2:
        raise CompactLMError("need at least 1 sequence of at least 2 tokens")
    if is_mix(source):
        mix = parse_mix(source)
        parts = []
        for (name, _), count in zip(mix.parts, mix.counts(num_sequences), strict=True):
            if count:
                try:
                    parts.append(
                        load_sequences(name, tokenizer, num_sequences=count, seq_len=seq_len, split=split, seed=seed)
                    )
                except CompactLMError as exc:
                    raise CompactLMError(f"data mix {source!r}: {name}'s share ({count} rows): {exc}") from exc
        rows = torch.cat(parts)
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    docs = split_documents(source, split, seed)
    if not docs:
        raise CompactLMError(f"data {source!s} has no documents in its {split!r} split")
    need = num_sequences * seq_len
    buffer: list[int] = []
    for ids in iter_token_stream(docs, tokenizer):
        buffer.extend(ids)
        if len(buffer) >= need:
            break
    if allow_fewer and len(buffer) >= seq_len:
        num_sequences = min(num_sequences, len(buffer) // seq_len)
        need = num_sequences * seq_len
    if len(buffer) < need:
        raise CompactLMError(
            f"data {source!s} has only {len(buffer):,} tokens in its {split!r} split, "
            f"{num_sequences} x {seq_len} = {need:,} are needed: ask for fewer or shorter sequences"
        )
    return torch.tensor(buffer[:need], dtype=torch.long).view(num_sequences, seq_len)


def _check_trainable(source, split: str) -> None:
    corpus = CORPORA.get(str(source))
    if corpus is not None and corpus.heldout_only and split == "train":
        raise CompactLMError(
            f"{corpus.name} is held out for evaluation only: no training, calibration or importance pass reads it "
            f"(train on {', '.join(c.name for c in CORPORA.values() if not c.heldout_only)} or your own text)"
        )


def check_data(source: str | os.PathLike, split: str = "train") -> None:
    """Cheap early check (no tokenization): the data exists and the split has documents with text (every source
    of a mix)."""
    if is_mix(source):
        for name, _ in parse_mix(source).parts:
            try:
                check_data(name, split)
            except CompactLMError as exc:
                raise CompactLMError(f"data mix {source!r}: {exc}") from exc
        return
    _check_trainable(source, split)
    docs = documents(source)
    if str(source) in CORPORA and CORPORA[str(source)].heldout_only:
        return
    if not any(doc.load().strip() for doc in docs[:1000]):
        raise CompactLMError(f"data {source!s} is empty: no document has any text")
    if not any(is_heldout(d.doc_id) == (split == "heldout") for d in docs):
        raise CompactLMError(
            f"data {source!s} has no documents in its {split!r} split ({len(docs)} documents in all; "
            f"{HELDOUT_PERCENT}% are held out by a fixed hash of their ids)"
        )


def describe(source: str | os.PathLike) -> dict:
    """A short description for records: which data, which split rule."""
    if is_mix(source):
        return {"source": str(source), "mix": [{**describe(n), "weight": w} for n, w in parse_mix(source).parts]}
    info = {"source": str(source), "heldout_rule": f"sha256(doc_id)[:8] % 100 < {HELDOUT_PERCENT}"}
    if str(source) in CORPORA:
        corpus = CORPORA[str(source)]
        info.update(license=corpus.license)
        if corpus.debian_package:
            info.update(debian_package=corpus.debian_package)
        if corpus.heldout_only:
            info.update(heldout_rule="held out whole (evaluation only)")
    return info
