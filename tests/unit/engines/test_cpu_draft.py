"""Speculative decoding on the cpu engine (engines/backends/openvino/draft.py): a draft built into the engine folder
or named at load time keeps fp32 greedy tokens exactly, whatever the draft; a draft the model agrees with cuts the
steps; the worker process runs it too; bad drafts are refused before any work."""

from __future__ import annotations

import pytest
import torch

from compactlm.core.errors import CompactLMError
from compactlm.engines import BuildConfig, Limits, build_engine, load_engine
from compactlm.engines.backends.openvino.export import is_ready
from compactlm.engines.manifest import read_manifest
from compactlm.serve.server import ServeConfig
from tests.helpers import cli, hf_greedy, random_tokens, tiny_model

pytestmark = pytest.mark.skipif(not is_ready(), reason="the OpenVINO exporter venv is not set up")
LIMITS = Limits(max_batch_size=4, max_input_len=32, max_seq_len=96, max_num_tokens=256)
NEW = 16


def _steps(completion) -> int:
    """Engine steps that produced the completion's tokens (tokens read after one step share a time)."""
    return len(set(completion.token_times))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    teacher = tiny_model("llama")
    with torch.no_grad():  # a fourth layer that adds little, so that the first three make a draft it often agrees with
        teacher.model.layers[3].mlp.down_proj.weight.mul_(0.1)
        teacher.model.layers[3].self_attn.o_proj.weight.mul_(0.1)
    teacher.save_pretrained(root / "teacher")
    near = tiny_model("llama", num_hidden_layers=3)
    near.load_state_dict(teacher.state_dict(), strict=False)  # the teacher's first three layers
    near.save_pretrained(root / "cut")
    tiny_model("llama", seed=5).save_pretrained(root / "stranger")  # same vocabulary, unrelated weights
    tiny_model("llama", vocab_size=300).save_pretrained(root / "other-vocab")
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 12, 20, 9)]
    config = BuildConfig(backend="cpu", precision="fp32", limits=LIMITS)
    plain = build_engine(root / "teacher", root / "plain", config)
    drafted = build_engine(
        root / "teacher", root / "drafted", BuildConfig(**{**vars(config), "draft": str(root / "cut")})
    )
    stranger = build_engine(root / "stranger", root / "stranger-cpu", config)
    return {
        "root": root,
        "plain": plain,
        "drafted": drafted,
        "stranger": stranger,
        "prompts": prompts,
        "want": hf_greedy(teacher, prompts, NEW),
    }


def test_a_built_in_draft_keeps_the_greedy_tokens_in_fewer_steps(models):
    manifest = read_manifest(models["drafted"])
    record = manifest.backend_info["draft"]
    assert record["model"]["num_layers"] == 3 and record["num_assistant_tokens"] == 3
    assert "+ draft" in manifest.describe()
    with load_engine(models["drafted"]) as engine:
        assert engine.draft is not None and engine.draft.tokens == 3
        done = engine.generate(models["prompts"], NEW, ignore_eos=True)
    assert [c.tokens for c in done] == models["want"]
    with load_engine(models["drafted"], draft_tokens=0) as engine:  # 0: the model alone
        assert engine.draft is None
        alone = engine.generate(models["prompts"], NEW, ignore_eos=True)
    assert [c.tokens for c in alone] == models["want"]
    assert all(_steps(c) == NEW for c in alone)
    assert sum(_steps(c) for c in done) < sum(_steps(c) for c in alone)  # the 3-layer draft is mostly right


def test_any_draft_named_at_load_keeps_the_greedy_tokens(models):
    with load_engine(models["plain"], draft=models["plain"], draft_tokens=3) as engine:  # itself: all accepted
        itself = engine.generate(models["prompts"], NEW, ignore_eos=True)
    assert [c.tokens for c in itself] == models["want"]
    assert all(_steps(c) <= 1 + -(-(NEW - 1) // 4) for c in itself)  # the prefill's token, then 3 + 1 a step
    with load_engine(models["plain"], draft=models["stranger"], draft_tokens=4) as engine:  # nearly all refused
        stranger = engine.generate(models["prompts"], NEW, ignore_eos=True)
    assert [c.tokens for c in stranger] == models["want"]


def test_the_worker_process_runs_the_draft(models):
    with load_engine(models["drafted"], recycle=True) as engine:
        assert engine.worker is not None and engine.draft is not None
        done = engine.generate(models["prompts"], NEW, ignore_eos=True)
    assert [c.tokens for c in done] == models["want"]
    assert sum(_steps(c) for c in done) < len(done) * NEW


def test_bad_drafts_are_refused_before_any_work(models, tmp_path):
    root = models["root"]
    config = BuildConfig(backend="cpu", precision="fp32", limits=LIMITS)
    with pytest.raises(CompactLMError, match="vocabulary of 300 tokens"):
        build_engine(
            root / "teacher", tmp_path / "a", BuildConfig(**{**vars(config), "draft": str(root / "other-vocab")})
        )
    with pytest.raises(CompactLMError, match="takes no draft model"):
        build_engine(
            root / "teacher", tmp_path / "b", BuildConfig(backend="torch", limits=LIMITS, draft=str(root / "cut"))
        )
    with pytest.raises(CompactLMError):
        build_engine(root / "teacher", tmp_path / "c", BuildConfig(**{**vars(config), "draft": str(tmp_path / "none")}))
    with pytest.raises(CompactLMError, match="draft tokens must be"):
        BuildConfig(draft=str(root / "cut"), draft_tokens=0)
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(CompactLMError, match="has no draft model"):
        load_engine(models["plain"], draft_tokens=2)
    with pytest.raises(CompactLMError, match="draft tokens must be"):  # `compactlm serve --draft-tokens 99`
        ServeConfig(draft_tokens=99)
    assert ServeConfig(draft_tokens=0).draft_tokens == 0
    torch_engine = build_engine(root / "teacher", tmp_path / "torch", BuildConfig(backend="torch", limits=LIMITS))
    with pytest.raises(CompactLMError, match="must be a cpu engine"):
        load_engine(models["plain"], draft=torch_engine)


def test_the_cli_builds_an_engine_with_a_draft(models, tmp_path):
    root = models["root"]
    result = cli(
        "engines",
        "build",
        root / "teacher",
        tmp_path / "e",
        "--precision",
        "fp32",
        "--max-seq-len",
        "96",
        "--max-input-len",
        "32",
        "--max-batch-size",
        "4",
        "--draft",
        root / "cut",
        "--draft-tokens",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "+ draft (" in result.output
    assert read_manifest(tmp_path / "e").backend_info["draft"]["num_assistant_tokens"] == 2
