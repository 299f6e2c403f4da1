"""Post-training quantization: fake-quant logits, the unified HF checkpoint it is saved as (read back without a
pickle and compared with modelopt's own fake-quant), calibration errors, and what the engine builders do with it."""

from __future__ import annotations

import json

import pytest
import torch

from compactlm.compress.checkpoint import load_model
from compactlm.compress.quantize import (
    QuantizeConfig,
    int4_block_size,
    quantize_checkpoint,
    quantize_model,
    quantized_modules,
    save_quantized,
)
from compactlm.compress.quantized import quantized_format
from compactlm.core.errors import CompactLMError
from compactlm.engines import BuildConfig, Limits, build_engine
from tests.helpers import cli, logits, random_tokens, tiny_model

SMALL_LIMITS = Limits(max_batch_size=2, max_input_len=32, max_seq_len=64, max_num_tokens=64)


def gentle_model():
    """The tiny model with weights of std 0.05: activations of a plausible size, so quantization error is not
    dominated by the exploding activations of the factory's std-0.2 weights."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05, generator=generator)
    return model


@pytest.mark.parametrize("fmt,max_relative", [("fp8", 0.15), ("int8-sq", 0.35)])
def test_quantized_logits_differ_from_full_precision_but_stay_close(fmt, max_relative, tokens):
    model = gentle_model()
    reference = logits(model, tokens)
    info = quantize_model(model, fmt, random_tokens(4, 24, seed=3).split(2))
    quantized = logits(model, tokens)
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0.001 < error < max_relative
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > 0.6
    assert info["calibration_tokens"] == 4 * 24 and quantized_modules(model) > 0


@pytest.mark.parametrize("fmt,algo", [("fp8", "FP8"), ("int8-sq", "W8A8_SQ_PER_CHANNEL"), ("int4-awq", "W4A16_AWQ")])
def test_a_quantized_checkpoint_is_the_unified_format_and_reads_back_without_a_pickle(fmt, algo, tmp_path, tokens):
    model = gentle_model()
    source = tmp_path / "source"
    model.save_pretrained(source)
    reference = logits(model, tokens)
    info = quantize_model(model, fmt, random_tokens(4, 24, seed=3).split(2))
    fake = logits(model, tokens)
    out = save_quantized(model, tmp_path / "q", source, {"op": "quantize", **info}, dtype="float16")
    assert not list(out.glob("*.pth")) and not list(out.glob("*.bin"))
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == algo
    record = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert record["unified"]["quant_algo"] == algo and record["export_dtype"] == "float16"
    assert quantized_format(out) == fmt and quantized_format(source) is None
    again = load_model(out)
    back = logits(again, tokens)
    assert quantized_modules(again) == 0  # a plain model: weights dequantized, inputs rounded by hooks
    assert (again.compactlm_quantized_inputs > 0) == (fmt != "int4-awq")  # W4A16 keeps 16-bit activations

    # The unified checkpoint is modelopt's export of the fake-quant model (fp16 tensors; for AWQ the smoothing
    # re-done across q/k/v and gate/up, which share an input): its logits sit nearer the fake-quant model's than
    # the quantization error, INT8 SQ's near-exactly (measured ratios: fp8 0.5, int8-sq 0.06, int4-awq 0.68).
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    quant_error = rel(fake, reference)
    factor = {"fp8": 0.75, "int8-sq": 0.2, "int4-awq": 0.9}[fmt]
    assert rel(back, fake) < factor * quant_error, (rel(back, fake), quant_error)
    assert 0.3 * quant_error < rel(back, reference) < 2 * quant_error  # quantized, and by about as much


def test_a_quantized_checkpoint_from_an_older_compactlm_is_refused_not_unpickled(tiny_dir, tmp_path):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_dir, legacy)
    (legacy / "modelopt_state.pth").write_bytes(b"\x80\x04not a real pickle")  # never opened
    with pytest.raises(CompactLMError, match="no longer loads .a pickle from someone else can run code"):
        load_model(legacy)


def test_the_int4_group_size_divides_every_weight_width():
    model = tiny_model()  # widths 48 and 96
    assert int4_block_size(model) == 16
    assert int4_block_size(tiny_model(hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4)) == 64
    with pytest.raises(CompactLMError, match="does not divide"):
        int4_block_size(model, 32)


def test_calibration_that_is_too_small_is_refused_with_the_numbers(retrain_checkpoints, tmp_path):
    with pytest.raises(CompactLMError, match="too few for int4-awq: it needs at least 4096"):
        QuantizeConfig("int4-awq", calib_samples=2, calib_seq_len=128)
    with pytest.raises(CompactLMError, match="unknown quantization format 'int3'"):
        QuantizeConfig("int3")
    corpus = retrain_checkpoints["corpus"]  # ~2,500 tokens in its train split
    with pytest.raises(CompactLMError, match="too small: its train split has about") as error:
        quantize_checkpoint(
            retrain_checkpoints["teacher"],
            tmp_path / "q",
            QuantizeConfig("fp8", calib_data=str(corpus), calib_samples=64, calib_seq_len=128),
        )
    assert "asks for 8,192" in str(error.value)
    assert not (tmp_path / "q").exists()


def test_quantize_command_then_eval_measures_the_cost(retrain_checkpoints, tmp_path):
    teacher, corpus = retrain_checkpoints["teacher"], retrain_checkpoints["corpus"]
    out = tmp_path / "fp8"
    args = ["--format", "fp8", "--calib-data", corpus, "--calib-samples", "32", "--calib-seq-len", "32"]
    result = cli("compress", "quantize", teacher, out, *args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compactlm.json").read_text())["history"][-1]
    assert record["op"] == "quantize" and record["format"] == "fp8" and record["calibration_tokens"] == 32 * 32
    table = tmp_path / "eval.csv"
    args = ["--data", corpus, "--samples", "2", "--seq-len", "16", "--out", table]
    result = cli("compress", "eval", teacher, out, *args)
    assert result.exit_code == 0, result.output
    import pandas as pd

    frame = pd.read_csv(table)
    assert frame["heldout_loss"].iloc[0] != frame["heldout_loss"].iloc[1]  # the fake-quant model was evaluated
    assert abs(frame["heldout_loss"].iloc[1] - frame["heldout_loss"].iloc[0]) < 0.5


def test_a_pruned_student_quantizes_and_reloads(retrain_checkpoints, tmp_path, tokens):
    student, corpus = retrain_checkpoints["student"], retrain_checkpoints["corpus"]
    out = tmp_path / "q"
    quantize_checkpoint(student, out, QuantizeConfig("fp8", calib_data=str(corpus), calib_samples=32, calib_seq_len=32))
    model = load_model(out)  # the student's kept-indices file beside the weights is not read as weights
    assert quantized_format(out) == "fp8" and model.compactlm_quantized_inputs > 0
    assert logits(model, tokens).shape[-1] == logits(load_model(student), tokens).shape[-1]


def test_backends_that_would_lose_the_quantization_refuse_it(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    info = quantize_model(model, "fp8", [random_tokens(2, 16)])
    source = save_quantized(model, tmp_path / "q", tiny_dir, {"op": "quantize", **info})
    with pytest.raises(CompactLMError, match="quantized with modelopt .fp8.; the torch backend"):
        build_engine(source, tmp_path / "e1", BuildConfig("torch", limits=SMALL_LIMITS))
    with pytest.raises(CompactLMError, match="build it with --precision fp8, not fp16"):
        build_engine(source, tmp_path / "e2", BuildConfig("trtllm", "fp16", SMALL_LIMITS, checkpoint_only=True))
    with pytest.raises(CompactLMError, match="already quantized"):
        quantize_checkpoint(source, tmp_path / "qq", QuantizeConfig("int8-sq", calib_samples=16, calib_seq_len=128))
