"""Post-training quantization with nvidia-modelopt: FP8 (E4M3), INT8 SmoothQuant, INT4 AWQ, calibrated on text.

On CPU modelopt quantizes by simulation ("fake quant"): weights and activations are rounded to the format's grid
in every forward. The calibrated model is written as ModelOpt's unified HF checkpoint (compactlm.compress.unified:
quantized safetensors + hf_quant_config.json), which TensorRT-LLM, vLLM and SGLang load directly and
`compactlm.compress.checkpoint.load_model` reads back on CPU (dequantized, activations rounded as the engine does)
so that `compress eval` measures the accuracy cost. Backends that cannot run the format refuse the folder. The
`quantize` record in `compactlm.json` says what was done.

All modelopt imports happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from compactlm.compress.unified import quiet
from compactlm.core.errors import CompactLMError

BLOCK_SIZES = (128, 64, 32, 16)
"""INT4 group sizes, largest first: TensorRT-LLM's W4A16 AWQ kernels take 128 and 64 (SmolLM2's 576 needs 64)."""


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format: its modelopt config and what TensorRT-LLM calls it."""

    name: str
    description: str
    modelopt_config: str
    """Name of the config in modelopt.torch.quantization."""
    trtllm_algo: str
    """The quant_algo TensorRT-LLM's checkpoint config gets."""
    min_calib_tokens: int
    """Below this, the calibrated statistics are too thin to trust: refused."""
    min_compute: str
    """The GPU generation the engine needs for real (not simulated) kernels."""


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in [
        QuantFormat(
            "fp8",
            "FP8 E4M3 weights and activations, per-tensor scales (max calibration)",
            "FP8_DEFAULT_CFG",
            "FP8",
            1024,
            "Ada/Hopper (SM 8.9+)",
        ),
        QuantFormat(
            "int8-sq",
            "INT8 SmoothQuant: per-channel INT8 weights, per-tensor INT8 activations, smoothing folded in weights",
            "INT8_SMOOTHQUANT_CFG",
            "W8A8_SQ_PER_CHANNEL",
            2048,
            "Turing+ (SM 7.5+)",
        ),
        QuantFormat(
            "int4-awq",
            "INT4 AWQ: 4-bit weights in groups with activation-aware scales, 16-bit activations",
            "INT4_AWQ_CFG",
            "W4A16_AWQ",
            4096,
            "Turing+ (SM 7.5+)",
        ),
    ]
}


def get_format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise CompactLMError(f"unknown quantization format {name!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass
class QuantizeConfig:
    """How a model is quantized."""

    format: str
    """fp8 | int8-sq | int4-awq."""
    calib_data: str = "python-docs"
    """Calibration text (train split): a bundled corpus, a file or a folder."""
    calib_samples: int = 32
    calib_seq_len: int = 256
    batch_size: int = 4
    """Sequences per calibration forward."""
    block_size: int | None = None
    """int4-awq group size; default: the largest of 128/64/32/16 dividing every weight's input width."""
    dtype: str | None = None
    """float16 | bfloat16: the dtype of the unquantized tensors written; default: the source's when 16-bit, else
    bfloat16."""

    def __post_init__(self):
        fmt = get_format(self.format)
        if self.calib_samples < 1 or self.calib_seq_len < 2 or self.batch_size < 1:
            raise CompactLMError("calibration needs at least 1 sample of at least 2 tokens, and a batch of 1")
        tokens = self.calib_samples * self.calib_seq_len
        if tokens < fmt.min_calib_tokens:
            raise CompactLMError(
                f"{tokens} calibration tokens ({self.calib_samples} x {self.calib_seq_len}) are too few for "
                f"{self.format}: it needs at least {fmt.min_calib_tokens}; raise --calib-samples or --calib-seq-len"
            )
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise CompactLMError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.dtype is not None:
            from compactlm.compress.unified import export_dtype

            export_dtype(None, self.dtype)


def weight_widths(model) -> set[int]:
    """Input widths of the decoder's linear layers (what an INT4 group must divide)."""
    import torch

    return {
        m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    }


def int4_block_size(model, requested: int | None = None) -> int:
    widths = weight_widths(model)
    if requested is not None:
        bad = sorted(w for w in widths if w % requested)
        if bad:
            raise CompactLMError(f"INT4 group size {requested} does not divide the weight widths {bad}")
        return requested
    for size in BLOCK_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise CompactLMError(
        f"no INT4 group size of {', '.join(map(str, BLOCK_SIZES))} divides the widths {sorted(widths)}"
    )


def modelopt_config(model, fmt: QuantFormat, block_size: int | None = None) -> dict:
    """The modelopt quantization config of a format, fitted to the model (INT4 group size)."""
    with quiet():
        import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, fmt.modelopt_config))
    if fmt.name == "int4-awq":
        size = int4_block_size(model, block_size)
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"] = {-1: size, "type": "static"}
    return config


def quantize_model(model, fmt: str, calibration: Iterable, block_size: int | None = None) -> dict:
    """Quantize `model` in place with modelopt, calibrated on `calibration` (token tensors [T] or [B, T]).

    Returns what was done: format, calibration tokens, INT4 group size, seconds.
    """
    import torch

    spec = get_format(fmt)
    if quantized_modules(model):
        raise CompactLMError("the model is already quantized: quantize its unquantized parent instead")
    batches = [torch.as_tensor(t).reshape(-1, torch.as_tensor(t).shape[-1]).long() for t in calibration]
    if not batches:
        raise CompactLMError(f"{fmt} calibration needs at least one token sequence")
    config = modelopt_config(model, spec, block_size)
    device = next(model.parameters()).device

    def forward_loop(m) -> None:
        with torch.inference_mode():
            for batch in batches:
                m(input_ids=batch.to(device), use_cache=False)

    with quiet():
        import modelopt.torch.quantization as mtq

        started = time.perf_counter()
        mtq.quantize(model, config, forward_loop=forward_loop)
    info = {
        "format": fmt,
        "trtllm_algo": spec.trtllm_algo,
        "modelopt_config": spec.modelopt_config,
        "calibration_tokens": sum(b.numel() for b in batches),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if fmt == "int4-awq":
        info["block_size"] = int4_block_size(model, block_size)
    return info


def quantized_modules(model) -> int:
    """How many modelopt quantized modules `model` holds (0: a plain model)."""
    return sum(1 for m in model.modules() if type(m).__name__.startswith("Quant"))


def calibration_batches(model_path, cfg: QuantizeConfig):
    """calib_samples x calib_seq_len tokens of the calibration data's train split, in batches; a clear error when
    the data holds fewer."""
    import torch

    from compactlm.compress.checkpoint import load_tokenizer
    from compactlm.compress.data import load_sequences

    rows = load_sequences(
        cfg.calib_data,
        load_tokenizer(model_path),
        num_sequences=cfg.calib_samples,
        seq_len=cfg.calib_seq_len,
        split="train",
        allow_fewer=True,
    )
    if len(rows) < cfg.calib_samples:
        have = len(rows) * cfg.calib_seq_len
        need = cfg.calib_samples * cfg.calib_seq_len
        raise CompactLMError(
            f"calibration data {cfg.calib_data} is too small: its train split has about {have:,} tokens "
            f"({len(rows)} sequences of {cfg.calib_seq_len}), {cfg.format} calibration asks for {need:,} "
            f"({cfg.calib_samples} x {cfg.calib_seq_len}); give more text or fewer --calib-samples "
            f"(at least {get_format(cfg.format).min_calib_tokens:,} tokens)"
        )
    return list(torch.split(rows, cfg.batch_size))


def save_quantized(model, out: Path, source: Path, record: dict, dtype: str = "bfloat16", overwrite=False) -> Path:
    """Save a modelopt-quantized model as a unified HF checkpoint (compactlm.compress.unified) with the source's
    tokenizer and the record (the quantization section written goes into it)."""
    from compactlm.compress.checkpoint import save_checkpoint
    from compactlm.compress.unified import export_unified

    def write(folder: Path) -> None:
        record["unified"] = export_unified(model, folder, dtype)

    record["export_dtype"] = dtype
    return save_checkpoint(model, out, source=source, operation=record, write_weights=write, overwrite=overwrite)


def quantize_checkpoint(model, out: str | os.PathLike, cfg: QuantizeConfig, overwrite: bool = False) -> dict:
    """Quantize a checkpoint (path or bundled name) into `out`; returns the record written."""
    from compactlm.compress.checkpoint import inspect_checkpoint, load_model
    from compactlm.compress.data import describe
    from compactlm.core.io import check_output

    out = check_output(out, overwrite)
    checkpoint = inspect_checkpoint(model)
    path = checkpoint.path
    if checkpoint.quantized:
        raise CompactLMError(f"{path} is already quantized ({checkpoint.quantized}): quantize its parent instead")
    batches = calibration_batches(path, cfg)  # before loading the model: too little data fails fast
    from compactlm.compress.unified import export_dtype

    dtype = export_dtype(checkpoint.config, cfg.dtype)
    student = load_model(checkpoint)
    info = quantize_model(student, cfg.format, batches, cfg.block_size)
    record = {"op": "quantize", **info, "config": asdict(cfg), "calib_data": describe(cfg.calib_data), "split": "train"}
    save_quantized(student, out, path, record, dtype=dtype, overwrite=overwrite)
    return record
