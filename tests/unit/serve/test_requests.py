"""The request layer every front shares: a prompt too long for the engine is refused before it is tokenized, so a
huge request never holds the tokenizer for the requests behind it."""

from __future__ import annotations

import time

import pytest

from compactlm.engines.registry import load_engine
from compactlm.serve.requests import BadRequest, GenerationService, longest_token
from tests.helpers import tiny_engine


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    engine = load_engine(tiny_engine(tmp_path_factory.mktemp("requests")))
    yield GenerationService(engine, "tiny")
    engine.close()


def test_a_text_that_cannot_fit_is_refused_untokenized_and_at_once(service, monkeypatch):
    cap = service.max_prompt_chars
    assert cap == service.engine.limits.max_input_len * longest_token(service._tokenizer)
    calls = []
    real = service._tokenizer.__call__
    monkeypatch.setattr(
        type(service._tokenizer), "__call__", lambda self, text, **k: calls.append(len(text)) or real(text, **k)
    )
    started = time.perf_counter()
    with pytest.raises(BadRequest, match=r"more than the 48 input tokens this engine takes can hold"):
        service.prompt_ids(text="the cat " * 2_000_000)  # 16 MB
    assert time.perf_counter() - started < 0.5 and calls == []
    assert service.prompt_ids(text="the cat sat") and calls == [len("the cat sat")]


def test_the_cap_is_a_true_bound_every_text_within_it_may_fit(service):
    """A text at the cap made of the longest token tokenizes to at most max_input_len tokens plus specials."""
    vocab = service._tokenizer.get_vocab()
    word = max((t for t in vocab if t.isalpha()), key=len)
    text = " ".join([word] * (service.engine.limits.max_input_len // 2))
    assert len(text) <= service.max_prompt_chars
    service.prompt_ids(text=text)  # not refused by the cap
