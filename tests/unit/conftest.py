"""Fixtures for the fast unit tests: tiny random models on disk, offline Hugging Face."""

from __future__ import annotations

import os

# Nothing in the unit tests may reach a model hub; set before transformers is imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CPU engine's exporter venv (made once by `make setup`, ~1 min) lives in the real cache, not in the
# throwaway COMPACTLM_HOME each test gets: pin its path before that is swapped.
from compactlm.engines.backends.openvino.export import VENV_ENV, venv_dir  # noqa: E402

os.environ.setdefault(VENV_ENV, str(venv_dir()))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import random_tokens, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads make
    every forward ~100x slower. Restored after each test, so the integration tests keep their threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path_factory):
    """Keep the bundled-model cache out of the user's home: no test may pull or read a real model."""
    monkeypatch.setenv("COMPACTLM_HOME", str(tmp_path_factory.mktemp("compactlm-home")))


@pytest.fixture(autouse=True)
def _fp32_training(monkeypatch):
    """`precision: auto` trains in bf16 on CPUs with bf16 units: pin the detection to "none", so that the suite's
    exact comparisons of training runs mean the same on every CPU (tests of bf16 ask for it)."""
    from compactlm.core import host

    monkeypatch.setattr(host, "cpu_bf16", lambda: None)


@pytest.fixture(scope="session")
def _fake_brotli_sdist(tmp_path_factory) -> Path:
    from tests.helpers import fake_brotli

    return fake_brotli(tmp_path_factory.mktemp("brotli") / "brotli-1.2.1.tar.gz")


@pytest.fixture(autouse=True)
def _offline_english(monkeypatch, _fake_brotli_sdist):
    """The general-English held-out set every evaluation reports is pulled from a local stand-in, never PyPI."""
    from compactlm.compress.english import BROTLI

    monkeypatch.setenv(BROTLI.env, str(_fake_brotli_sdist))


@pytest.fixture
def tokens() -> torch.Tensor:
    return random_tokens(3, 24, seed=1)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tiny Llama checkpoint (safetensors, no tokenizer) in a fresh folder."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture
def retrain_checkpoints(tiny_dir, tmp_path) -> dict[str, Path]:
    """A tiny teacher with a word-level tokenizer, its student pruned by compactlm (layer 1 dropped, so 3 of 4
    layers), and a JSONL corpus both can read: what the retraining jobs and commands take."""
    from compactlm.compress.checkpoint import load_model
    from compactlm.compress.operations import prune_checkpoint
    from compactlm.compress.prune import PruneTarget
    from tests.helpers import english_docs, save_word_tokenizer, write_jsonl

    texts = english_docs(80, words_per_doc=30)
    save_word_tokenizer(tiny_dir, texts)
    student = tmp_path / "student"
    prune_checkpoint(load_model(tiny_dir), student, PruneTarget(drop_layers=(1,)))
    return {"teacher": tiny_dir, "student": student, "corpus": write_jsonl(tmp_path / "corpus.jsonl", texts)}
