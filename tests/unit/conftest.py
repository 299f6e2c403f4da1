"""Fixtures for the fast unit tests: tiny random models on disk, offline Hugging Face."""

from __future__ import annotations

import os

# Nothing in the unit tests may reach a model hub; set before transformers is imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.factory import random_tokens, tiny_model  # noqa: E402


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


@pytest.fixture
def tokens() -> torch.Tensor:
    return random_tokens(3, 24, seed=1)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tiny Llama checkpoint (safetensors, no tokenizer) in a fresh folder."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    return folder
