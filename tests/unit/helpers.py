"""Small helpers shared by the unit tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

ATOL = 1e-5
"""Removing a unit that contributes exactly zero changes only the order of float sums."""


@torch.inference_mode()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits


def expected_state_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter a model of this config must have, with its shape (derived here, not by the library)."""
    d, f = config.hidden_size, config.intermediate_size
    h, g, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention_bias = bool(getattr(config, "attention_bias", False))  # Llama/Qwen3: q/k/v/o biases
    qkv_bias = config.model_type == "qwen2" or attention_bias  # Qwen2: q/k/v only, always
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (config.vocab_size, d),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h * hd, d),
            p + "self_attn.k_proj.weight": (g * hd, d),
            p + "self_attn.v_proj.weight": (g * hd, d),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
        if qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (h * hd,),
                p + "self_attn.k_proj.bias": (g * hd,),
                p + "self_attn.v_proj.bias": (g * hd,),
            }
        if attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if getattr(config, "mlp_bias", False):
            shapes |= {
                p + "mlp.gate_proj.bias": (f,),
                p + "mlp.up_proj.bias": (f,),
                p + "mlp.down_proj.bias": (d,),
            }
        if config.model_type == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return shapes


def state_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def head_cols(head: int, head_dim: int) -> slice:
    return slice(head * head_dim, (head + 1) * head_dim)


class CharTokenizer:
    """A stand-in for a HF tokenizer: one id per character (ord), EOS = 0; counts its calls."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        self.calls += 1
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


WORDS = (
    "the model reads a page of text and learns which word comes next while the pruned student keeps the "
    "layers heads and neurons that matter most for the loss on held out documents"
).split()


def english_docs(n: int, words_per_doc: int = 40, seed: int = 0) -> list[str]:
    """Deterministic English-ish documents over a small vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (words_per_doc,), generator=gen).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + ".")
    return docs


def save_word_tokenizer(folder: Path, texts: list[str]) -> None:
    """Train a tiny word-level tokenizer (vocab <= 256) on `texts` and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=256, special_tokens=["<unk>", "<eos>"]))
    assert tok.get_vocab_size() <= 256
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)


def cli(*args):
    """Run `compactlm ARGS...` in-process (typer's CliRunner); returns the click Result."""
    from typer.testing import CliRunner

    from compactlm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def small_run(corpus: Path, steps: int = 3, eval_samples: int | None = 2) -> list[str]:
    """Options of a seconds-long retraining run on a tiny model: 16-token rows, batch 2, held-out on 2 rows."""
    args = ["--data", str(corpus), "--steps", str(steps), "--seq-len", "16", "--batch-size", "2"]
    return args + (["--eval-samples", str(eval_samples)] if eval_samples is not None else [])
