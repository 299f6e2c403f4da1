"""The `cpu` (OpenVINO GenAI) and `torch` engines on tiny random models: build, parity with transformers, limits,
manifest, CLI. Each OpenVINO export takes ~10-15 s (the exporter runs in its own venv), so engines are built
once per module."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from compactlm.core.errors import CompactLMError
from compactlm.engines import BuildConfig, Limits, Request, build_engine, load_engine, read_manifest
from compactlm.engines.backends.openvino.export import is_ready
from tests.helpers import MOE, cli, english_docs, hf_greedy, random_tokens, save_word_tokenizer, tiny_model

pytestmark = pytest.mark.skipif(
    not is_ready(), reason="the OpenVINO exporter venv is not set up (`compactlm engines setup`, done by make setup)"
)
LIMITS = Limits(max_batch_size=8, max_input_len=48, max_seq_len=96, max_num_tokens=256)
NEW = 32


def prompts_of(seed: int) -> list[list[int]]:
    """8 prompts of different lengths (the torch engine left-pads them into one batch)."""
    rows = random_tokens(8, 24, seed=seed).tolist()
    return [row[: 8 + 2 * i] for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (head_dim 16 != hidden 48 / 6 heads, tied embeddings) with a word tokenizer, and its cpu
    fp32 engine built through the CLI, plus a torch engine."""
    root = tmp_path_factory.mktemp("tiny-engines")
    model = tiny_model("llama").eval()
    model.save_pretrained(root / "ckpt")
    save_word_tokenizer(root / "ckpt", english_docs(40))
    result = cli(
        "engines", "build", root / "ckpt", root / "cpu", "--max-batch-size", 8, "--max-input-len", 48,
        "--max-seq-len", 96, "--max-num-tokens", 256,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    build_engine(root / "ckpt", root / "torch", BuildConfig(backend="torch", limits=LIMITS))
    return {"root": root, "model": model, "ckpt": root / "ckpt", "cpu": root / "cpu", "torch": root / "torch"}


def test_cpu_and_torch_engines_match_transformers_greedy(tiny):
    prompts = prompts_of(seed=5)
    expected = hf_greedy(tiny["model"], prompts, NEW)
    for backend in ("cpu", "torch"):
        with load_engine(tiny[backend]) as engine:
            completions = engine.generate(prompts, max_new_tokens=NEW, ignore_eos=True)
        assert [c.tokens for c in completions] == expected, backend
        assert all(c.finish_reason == "length" and len(c.token_times) == NEW for c in completions)


def test_manifest_records_source_limits_and_runtime(tiny):
    manifest = read_manifest(tiny["cpu"])
    assert manifest.backend == "cpu" and manifest.precision == "fp32"
    assert manifest.limits == LIMITS
    assert manifest.source["path"] == str(tiny["ckpt"].resolve()) and len(manifest.source["sha256"]) == 64
    assert manifest.model["head_dim"] == 16 and manifest.model["num_layers"] == 4
    assert manifest.backend_info["properties"] == {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    assert manifest.backend_info["fused_qkv_layers"] == 0  # fp32 weights keep the stock graph
    assert {"openvino", "openvino-genai", "torch", "transformers"} <= set(manifest.libraries)
    assert manifest.host["cpu_count"] >= 1 and manifest.build_seconds > 0
    assert (tiny["cpu"] / "model" / "openvino_model.xml").is_file()
    assert (tiny["cpu"] / "tokenizer" / "tokenizer.json").is_file()


def test_engine_refuses_prompts_beyond_its_limits(tiny):
    with load_engine(tiny["cpu"]) as engine:
        with pytest.raises(CompactLMError, match="max_input_len 48"):
            engine.submit(Request(tuple(range(49)), 4))
        with pytest.raises(CompactLMError, match="max_seq_len 96"):
            engine.submit(Request(tuple(range(40)), 57))
    result = cli("engines", "generate", tiny["cpu"], "--prompt", " ".join(["the"] * 60))
    assert result.exit_code != 0 and "max_input_len 48" in str(result.exception)


def test_stop_at_eos_unless_ignored(tiny, tmp_path):
    prompt = prompts_of(seed=9)[0]
    greedy = hf_greedy(tiny["model"], [prompt], 12)[0]
    eos = greedy[4]
    first = greedy.index(eos)
    model = tiny_model("llama")
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(tmp_path / "ckpt")
    for backend in ("cpu", "torch"):
        out = build_engine(tmp_path / "ckpt", tmp_path / backend, BuildConfig(backend=backend, limits=LIMITS))
        with load_engine(out) as engine:
            assert engine.eos_token_ids == (eos,)
            stopped, full = engine.generate([prompt], 12)[0], engine.generate([prompt], 12, ignore_eos=True)[0]
        assert stopped.tokens == greedy[: first + 1] and stopped.finish_reason == "stop", backend
        assert full.tokens == greedy and full.finish_reason == "length", backend


def test_qwen3_student_with_biases_and_qk_norm_matches(tmp_path):
    model = tiny_model("qwen3", attention_bias=True, num_hidden_layers=3).eval()
    model.save_pretrained(tmp_path / "ckpt")
    out = build_engine(tmp_path / "ckpt", tmp_path / "cpu", BuildConfig(limits=LIMITS))
    prompts = prompts_of(seed=2)[:4]
    with load_engine(out) as engine:
        got = [c.tokens for c in engine.generate(prompts, 16, ignore_eos=True)]
    assert got == hf_greedy(model, prompts, 16)


@pytest.mark.parametrize(
    "family",
    ["mistral", "qwen2", "granite", "olmo2", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"],
)
def test_a_pruned_student_of_each_family_matches_transformers_on_both_engines(family, tmp_path):
    """Each family's quirks on (Gemma's sliding window of 8 tokens inside these prompts, soft-capping, Granite's
    multipliers, Phi-3's fused projections, OLMo 2's post-norms), cut in width, heads and depth by compactlm."""
    from compactlm.compress.checkpoint import save_checkpoint
    from compactlm.compress.importance import random_scores
    from compactlm.compress.prune import PruneTarget, prune

    teacher = tiny_model(family).eval()
    target = PruneTarget(hidden_size=36, ffn_hidden_size=64, num_query_groups=2, drop_layers=(1,))
    if family in MOE:  # half the experts and half of each one's neurons instead of the dense MLP (see test_moe.py)
        moe_ffn = teacher.config.intermediate_size if family == "mixtral" else teacher.config.moe_intermediate_size
        target = replace(target, ffn_hidden_size=None, num_experts=4, moe_ffn_hidden_size=moe_ffn // 2)
    student, record, _ = prune(teacher, random_scores(teacher.config, seed=4), target)
    ckpt = save_checkpoint(student, tmp_path / "ckpt", source=None, operation=record)
    prompts = prompts_of(seed=3)[:4]
    expected = hf_greedy(student, prompts, 16)
    for backend in ("cpu", "torch"):
        out = build_engine(ckpt, tmp_path / backend, BuildConfig(backend=backend, limits=LIMITS))
        with load_engine(out) as engine:
            completions = engine.generate(prompts, 16, ignore_eos=True)
        assert [c.error for c in completions] == [None] * len(prompts), backend
        assert [c.tokens for c in completions] == expected, backend


def test_int4_engine_is_smaller_and_generates(tiny, tmp_path):
    config = BuildConfig(precision="int4", limits=LIMITS, calib_samples=4, calib_seq_len=32)
    out = build_engine(tiny["ckpt"], tmp_path / "int4", config)
    info = read_manifest(out).backend_info
    assert info["weight_format"] == "int4" and info["int4_group_size"] == 16
    assert info["int4_method"] == "AWQ + scale estimation on 4 calibration texts"
    assert info["fused_qkv_layers"] == 4  # compressed weights: one q/k/v matmul per layer

    def size(folder):
        return sum(f.stat().st_size for f in (folder / "model").glob("openvino_model.bin"))

    assert size(out) < 0.6 * size(tiny["cpu"])
    prompts = prompts_of(seed=3)[:3]
    with load_engine(out) as engine:
        completions = engine.generate(prompts, 10, ignore_eos=True)
    assert [len(c.tokens) for c in completions] == [10, 10, 10]
    assert all(0 <= t < 256 for c in completions for t in c.tokens)


def test_engine_perplexity_matches_transformers_in_fp32(tiny):
    from compactlm.engines.quality import engine_perplexity

    seqs = random_tokens(3, 32, seed=4)
    with torch.inference_mode():
        loss = tiny["model"](seqs, labels=seqs).loss.item()
    for backend in ("cpu", "torch"):
        assert engine_perplexity(tiny[backend], seqs.numpy()) == pytest.approx(np.exp(loss), rel=1e-4), backend


def test_cli_run_streams_text_and_info_shows_the_manifest(tiny):
    result = cli("engines", "generate", tiny["cpu"], "--prompt", "the cat", "--max-new-tokens", 5, "--ignore-eos")
    assert result.exit_code == 0, result.output
    assert "5 tokens (length)" in result.output
    info = cli("engines", "info", tiny["cpu"])
    assert info.exit_code == 0 and "cpu / fp32" in info.output and "max_batch_size 8" in info.output
    raw = json.loads(cli("engines", "info", tiny["cpu"], "--json").output)
    assert raw["limits"]["max_seq_len"] == 96


def test_cli_refuses_bad_input_before_any_work(tiny, tmp_path):
    result = cli("engines", "build", tiny["ckpt"], tiny["cpu"])
    assert result.exit_code != 0 and "already exists; pass --overwrite" in str(result.exception)
    result = cli("engines", "build", tiny["ckpt"], tmp_path / "x", "--precision", "fp8")
    assert "no precision 'fp8'; choose from fp32, bf16, int8, int4" in str(result.exception)
    result = cli("engines", "build", tiny["ckpt"], tmp_path / "x", "--backend", "vllm")
    assert "unknown backend 'vllm'" in str(result.exception)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = cli("engines", "build", tmp_path / "gpt2", tmp_path / "x")
    assert "unsupported architecture 'gpt2'" in str(result.exception)
    result = cli("engines", "build", tiny["ckpt"], tmp_path / "x", "--max-seq-len", 4096)
    assert "exceeds the model's max_position_embeddings 128" in str(result.exception)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.tmp")]


def test_for_sweep_sizes_the_engine_to_the_sweep(tiny, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("shapes: [[64, 32], [32, 64]]\nscale: 2\nbatch_sizes: [1, 4]\ninput_stdev: 2\n")
    result = cli("engines", "build", tiny["ckpt"], tmp_path / "eng", "--backend", "torch", "--for-sweep", sweep)
    assert result.exit_code == 0, result.output
    limits = read_manifest(tmp_path / "eng").limits
    assert (limits.max_batch_size, limits.max_input_len, limits.max_seq_len) == (4, 32 + 8, 48 + 8)


def test_build_survives_a_failing_export_without_leaving_files(tiny, tmp_path, monkeypatch):
    import compactlm.engines.backends.openvino.export as export

    def broken(*args, **kwargs):
        raise CompactLMError("exporting failed (exit 1):\nboom")

    monkeypatch.setattr(export, "export_openvino", broken)
    with pytest.raises(CompactLMError, match="boom"):
        build_engine(tiny["ckpt"], tmp_path / "eng", BuildConfig(limits=LIMITS))
    assert list(tmp_path.iterdir()) == []


def test_fused_qkv_engine_gives_the_stock_engines_tokens_and_the_benchmark_rebuilds_it(tiny, tmp_path):
    from compactlm.bench.perf.cpu_engine import ensure_engine

    fused = build_engine(tiny["ckpt"], tmp_path / "fused", BuildConfig(limits=LIMITS, fuse_qkv=True))
    assert read_manifest(fused).backend_info["fused_qkv_layers"] == 4
    prompts = prompts_of(seed=9)
    tokens = {}
    for label, path in (("fused", fused), ("stock", tiny["cpu"])):
        with load_engine(path) as engine:
            tokens[label] = [c.tokens for c in engine.generate(prompts, max_new_tokens=NEW, ignore_eos=True)]
    assert tokens["fused"] == tokens["stock"]
    # the benchmark reuses an engine built as it would build it, and rebuilds one built otherwise
    built = (tiny["cpu"] / "engine.json").read_text()
    assert ensure_engine(tiny["ckpt"], tiny["cpu"], "fp32", LIMITS, stock=True) == tiny["cpu"]
    assert (tiny["cpu"] / "engine.json").read_text() == built
    ensure_engine(tiny["ckpt"], fused, "fp32", LIMITS)
    assert read_manifest(fused).backend_info["fused_qkv_layers"] == 0


def test_both_engines_sample_by_seed_stop_on_ids_hold_min_tokens_and_give_logprobs(tiny):
    """What the OpenAI API asks of an engine: seeded sampling (the same tokens for the same seed, whatever is batched
    beside it), extra stop ids, min_new_tokens, the chosen tokens' log-probabilities (the model's log-softmax), and
    cancellation; the cpu engine refuses what it cannot do (prompt scores) at submit."""
    from compactlm.engines import Sampling

    prompt = tuple(prompts_of(seed=9)[3])
    ids = torch.tensor([list(prompt)])
    for backend in ("cpu", "torch"):
        with load_engine(tiny[backend]) as engine:
            sampling = Sampling(temperature=1.3, top_p=0.95, seed=11)
            alone = engine.submit(Request(prompt, 16, sampling=sampling)).result().tokens
            crowd = [engine.submit(Request(prompt, 16, sampling=Sampling(temperature=1.3, seed=s))) for s in range(4)]
            again = engine.submit(Request(prompt, 16, sampling=sampling))
            assert again.result().tokens == alone, backend
            assert len({tuple(c.result().tokens) for c in crowd}) > 1, backend  # seeds differ, tokens differ

            (greedy,) = engine.generate([prompt], 12, ignore_eos=True)
            first = greedy.tokens[0]
            quick = engine.submit(Request(prompt, 12, ignore_eos=False, stop_token_ids=(first,))).result()
            assert quick.tokens == [first] and quick.finish_reason == "stop", backend
            held = engine.submit(Request(prompt, 12, ignore_eos=False, stop_token_ids=(first,), min_new_tokens=4))
            assert first not in held.result().tokens[:4], backend

            scored = engine.submit(Request(prompt, 6, logprobs=0)).result()
            with torch.no_grad():
                logits = tiny["model"](torch.cat([ids, torch.tensor([scored.tokens[:-1]])], dim=1)).logits[0]
            want = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 :].gather(
                1, torch.tensor(scored.tokens)[:, None]
            )
            assert scored.logprobs == pytest.approx(want[:, 0].tolist(), abs=2e-3), backend

            long = engine.submit(Request(prompt, 60, ignore_eos=True))
            long.cancel()
            done = long.result(timeout=60)
            assert done.finish_reason == "cancelled" and len(done.tokens) < 60, backend
    with load_engine(tiny["cpu"]) as engine:
        with pytest.raises(CompactLMError, match="cannot score the prompt"):
            engine.submit(Request(prompt, 2, prompt_logprobs=1))
        with pytest.raises(CompactLMError, match="alternatives"):
            engine.submit(Request(prompt, 2, logprobs=2))


def test_a_step_budget_set_at_load_reaches_the_scheduler_and_keeps_the_tokens(tiny):
    """`load_engine(..., max_num_tokens=N)` (serve --max-num-tokens, bench/perf/step_budget.py): the pipeline runs
    with the new budget, prompts longer than it are prefilled in chunks with the same greedy tokens, and a budget
    below the batch is refused before anything loads."""
    prompts = prompts_of(7)[:3]  # 8-12 token prompts, three of them: 30 tokens, beyond a budget of 8
    with load_engine(tiny["cpu"]) as stock, load_engine(tiny["cpu"], max_num_tokens=8, recycle=True) as small:
        assert stock.scheduler["max_num_batched_tokens"] == 256 and stock.limits == LIMITS
        assert small.scheduler["max_num_batched_tokens"] == 8 and small.limits == replace(LIMITS, max_num_tokens=8)
        want = [c.tokens for c in stock.generate(prompts, 8, ignore_eos=True)]
        assert [c.tokens for c in small.generate(prompts, 8, ignore_eos=True)] == want
    for bad in (4, 0, 8.5, True):
        with pytest.raises(CompactLMError, match="step budget must be an integer of at least"):
            load_engine(tiny["cpu"], max_num_tokens=bad)
