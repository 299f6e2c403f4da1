"""Checkpoints: the compactlm.json record, validation before loading (resolved once), name resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compactlm.compress.checkpoint import (
    check_weights,
    inspect_checkpoint,
    load_model,
    load_tokenizer,
    read_config,
    save_checkpoint,
)
from compactlm.compress.models import BUNDLED, cached_path, compactlm_home, resolve
from compactlm.compress.record import RECORD_FILE
from compactlm.core.errors import CompactLMError
from tests.helpers import FAMILIES, logits, tiny_model


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_checkpoint_writes_weights_and_extends_the_parents_history(tmp_path, tokens):
    parent = tmp_path / "parent"
    tiny_model("llama").save_pretrained(parent)
    (parent / RECORD_FILE).write_text(json.dumps({"format": "compactlm/1", "history": [{"op": "pull"}]}))
    (parent / "tokenizer.json").write_text('{"fake": true}')
    written = []
    model = tiny_model("llama", seed=1)
    out = save_checkpoint(
        model,
        tmp_path / "child",
        source=parent,
        operation={"op": "prune", "target": {"num_layers": 3}},
        extra_files={"kept": lambda folder: written.append(folder) or (folder / "kept.bin").write_bytes(b"k")},
    )
    assert out == tmp_path / "child"
    names = set(_listing(out))
    assert {"config.json", "model.safetensors", RECORD_FILE, "tokenizer.json", "kept.bin"} <= names
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert len(written) == 1 and written[0] != out  # extra files are written inside the temp folder
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["format"] == "compactlm/1"
    assert record["parent"] == str(parent.resolve())
    assert record["history"] == [{"op": "pull"}, {"op": "prune", "target": {"num_layers": 3}}]
    assert json.loads((parent / RECORD_FILE).read_text())["history"] == [{"op": "pull"}]  # parent untouched
    reloaded = load_model(out)
    torch.testing.assert_close(logits(reloaded, tokens), logits(model, tokens), rtol=0, atol=1e-6)

    grandchild = save_checkpoint(reloaded, tmp_path / "grandchild", source=out, operation={"op": "distill"})
    history = json.loads((grandchild / RECORD_FILE).read_text())["history"]
    assert [h["op"] for h in history] == ["pull", "prune", "distill"]


def test_save_checkpoint_without_a_parent_starts_the_history(tmp_path):
    out = save_checkpoint(tiny_model("qwen2"), tmp_path / "m", source=None, operation={"op": "init"})
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["parent"] is None and record["history"] == [{"op": "init"}]
    with pytest.raises(CompactLMError, match="already exists"):
        save_checkpoint(tiny_model("qwen2"), out, source=None, operation={"op": "again"})
    assert json.loads((out / RECORD_FILE).read_text())["history"] == [{"op": "init"}]


def test_load_model_validates_and_returns_an_eval_model(tiny_dir, tokens):
    model = load_model(tiny_dir)
    assert not model.training
    assert model.compactlm_path == str(tiny_dir)
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits(model, tokens), logits(tiny_model("llama"), tokens), rtol=0, atol=1e-6)


def test_check_weights_rejects_a_truncated_file(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    assert check_weights(tiny_dir) == [weights]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompactLMError, match="is corrupt or truncated"):
        check_weights(tiny_dir)
    with pytest.raises(CompactLMError, match="is corrupt or truncated"):
        load_model(tiny_dir)


def test_check_weights_leaves_out_compactlms_side_files(retrain_checkpoints):
    student = retrain_checkpoints["student"]  # pruned: its kept indices are a safetensors file beside the weights
    assert any(student.glob("compactlm.kept*.safetensors"))
    assert check_weights(student) == [student / "model.safetensors"]


def test_check_weights_rejects_garbage(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CompactLMError, match="corrupt or truncated"):
        check_weights(tiny_dir)


def test_check_weights_rejects_a_folder_without_weights(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(CompactLMError, match="has no safetensors weights$"):
        check_weights(tiny_dir)
    (tiny_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CompactLMError, match="only PyTorch .bin weights found: convert them to safetensors"):
        inspect_checkpoint(tiny_dir)


def test_check_weights_follows_the_shard_index(tiny_dir):
    index = tiny_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002.safetensors"}}))
    with pytest.raises(CompactLMError, match="model-00002.safetensors listed in the index is missing"):
        check_weights(tiny_dir)
    index.write_text("{not json")
    with pytest.raises(CompactLMError, match="index.json is corrupt"):
        check_weights(tiny_dir)


def test_read_config_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(CompactLMError, match="is not a Hugging Face checkpoint: config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CompactLMError, match="config.json is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(CompactLMError, match="cannot be read by transformers"):
        read_config(tmp_path)


def test_inspect_checkpoint_names_the_supported_families_for_another_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    with pytest.raises(CompactLMError) as info:
        inspect_checkpoint(folder)
    message = str(info.value)
    assert "unsupported architecture 'gpt2'" in message
    assert "families llama, mistral, qwen2, qwen3" in message


def test_inspect_checkpoint_accepts_every_supported_family(tmp_path):
    for family in FAMILIES:
        folder = tmp_path / family
        tiny_model(family).save_pretrained(folder)
        checkpoint = inspect_checkpoint(folder)
        path, config = checkpoint.path, checkpoint.config
        assert path == folder and config.model_type == family


def test_load_tokenizer_without_tokenizer_files_is_a_clear_error(tiny_dir):
    with pytest.raises(CompactLMError, match="has no usable tokenizer"):
        load_tokenizer(tiny_dir)


def test_resolve_takes_folders_and_cached_bundled_names(tmp_path, monkeypatch):
    assert resolve(tmp_path) == tmp_path
    with pytest.raises(CompactLMError, match="neither a checkpoint directory nor a bundled model .*smollm2-135m"):
        resolve(tmp_path / "missing")
    monkeypatch.setenv("COMPACTLM_HOME", str(tmp_path / "home"))
    assert compactlm_home() == tmp_path / "home"
    name = next(iter(BUNDLED))
    cached = cached_path(name)
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert resolve(name) == cached  # already cached: nothing is pulled
