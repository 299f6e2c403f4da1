"""The request layer every front shares: a prompt too long for the engine is refused before it is tokenized, so a
huge request never holds the tokenizer for the requests behind it."""

from __future__ import annotations

import time

import pytest
import torch

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


class _Decoding:
    """A GenerationService's decode over a real byte-level BPE tokenizer (GPT-2 style, as SmolLM2's)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def decode(self, tokens):
        self.calls.append(len(tokens))
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["naïve café señor 東京 üben — emoji 🚀🎉 and plain words that repeat words"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_incremental_decoding_hands_out_exactly_the_whole_text_and_decodes_short_windows(byte_bpe):
    from compactlm.serve.requests import TextDecoder

    gen = torch.Generator().manual_seed(0)
    text = "naïve café señor 東京 üben — emoji 🚀🎉 and plain words, then 🚀 again"
    real = byte_bpe(text)["input_ids"]
    for tokens in (real, torch.randint(0, 300, (200,), generator=gen).tolist()):
        for chunk in (1, 2, 5):
            service = _Decoding(byte_bpe)
            decoder = TextDecoder(service)
            parts = [decoder.delta(tokens[i : i + chunk]) for i in range(0, len(tokens), chunk)]
            parts.append(decoder.delta([], final=True))
            assert "".join(parts) == byte_bpe.decode(tokens)
            assert all("\ufffd" not in p for p in parts[:-1]) or tokens is not real
            assert max(service.calls) <= 40 < len(tokens)  # short windows, not the whole list each time
