"""The general-English held-out set: text no training, calibration or importance pass reads, to see whether a
student kept the teacher's language and not just the distillation corpus.

Source: the four English texts of the Canterbury corpus (Arnold & Bell, 1997), which the PyPI source package
`brotli==1.2.1` (MIT) ships as test data: `alice29.txt` (Lewis Carroll, Alice's Adventures in Wonderland, 152 KB),
`asyoulik.txt` (Shakespeare, As You Like It, 125 KB), `plrabn12.txt` (Milton, Paradise Lost, 482 KB) and
`lcet10.txt` (Library of Congress, Workshop on Electronic Texts proceedings, 1992, 427 KB). The texts are Project
Gutenberg etexts of public-domain works. Fiction, drama, verse and a report: ~1.2 MB, ~300k SmolLM2 tokens.
`pull_english` downloads the 7.4 MB sdist once with `pip download` (never installs it), checks its SHA-256, and
writes the four files (line ends normalized) to `$COMPACTLM_HOME/data/english/`; offline, point
`COMPACTLM_BROTLI_SDIST` at a downloaded `brotli-1.2.1.tar.gz`.

The corpus is held out whole (compress/data.py: `heldout_only`): asking for its train split is an error.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from compactlm.compress.models import compactlm_home
from compactlm.core import sdist
from compactlm.core.errors import CompactLMError

NAME = "english"
BROTLI = sdist.Sdist(
    spec="brotli==1.2.1",
    filename="brotli-1.2.1.tar.gz",
    sha256="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
    size="7.4 MB",
    env="COMPACTLM_BROTLI_SDIST",
)
TEXTS = {
    "tests/testdata/alice29.txt": "alice29.txt",
    "tests/testdata/asyoulik.txt": "asyoulik.txt",
    "tests/testdata/lcet10.txt": "lcet10.txt",
    "tests/testdata/plrabn12.txt": "plrabn12.txt",
}


def english_dir() -> Path:
    return compactlm_home() / "data" / NAME


def pull_english(sdist_path: str | None = None) -> Path:
    """The folder of the four texts, downloaded and extracted on first use."""
    folder = english_dir()
    if all((folder / name).is_file() for name in TEXTS.values()):
        return folder
    from compactlm.core.console import download_progress

    with download_progress() as progress, tempfile.TemporaryDirectory(prefix="compactlm-brotli-") as tmp:
        path = sdist.fetch(BROTLI, Path(tmp), progress, local=sdist_path)
        found = sdist.members(path, TEXTS, progress, "extracting the Canterbury corpus' English texts")
        missing = sorted(TEXTS[k] for k in set(TEXTS) - set(found))
        if missing:
            raise CompactLMError(f"{path} lacks {', '.join(missing)}: is it {BROTLI.filename}?")
        texts = {TEXTS[k]: v.replace(b"\r\n", b"\n") for k, v in found.items()}
        sdist.write_atomically(folder, texts)
    (folder / ".compactlm-pulled").write_text(
        f"{BROTLI.spec} ({BROTLI.filename}), the Canterbury corpus' English texts\n"
        f"license: public domain texts (Project Gutenberg); brotli itself MIT\npulled: {time.strftime('%Y-%m-%d')}\n"
    )
    return folder
