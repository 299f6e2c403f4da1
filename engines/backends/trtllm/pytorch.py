"""The `trtllm` backend: TensorRT-LLM as it is now (PyTorch backend, no engine-build step).

TensorRT-LLM loads a Hugging Face checkpoint, or ModelOpt's unified HF checkpoint for FP8 / INT4 AWQ, directly:
`tensorrt_llm.LLM(model=DIR, **llm_args)`, `trtllm-serve DIR --config llm_args.yaml`, `trtllm-bench ...
--backend pytorch`, and Triton's `llmapi` Python model. vLLM and SGLang load the same folder (`quantization:
modelopt` is read from its config.json). So `build` writes, into the engine folder:

    checkpoint/      the folder TensorRT-LLM loads: the HF model in fp16/bf16, or the unified checkpoint
                     (safetensors + hf_quant_config.json) calibrated here on `calib_dataset`; with its tokenizer
    llm_args.yaml    the LLM arguments sized from the limits (field names and types: llm_args.py)
    engine.json      the manifest, with the exact trtllm-serve / trtllm-bench / vllm command lines

and verifies on CPU that the checkpoint reads back to the source: fp16/bf16 through transformers (max |dlogit|),
quantized through compactlm's unified reader (held-out loss delta, activations rounded as the engine does). A
checkpoint that `compress quantize` already wrote in the unified format is copied as it is. `load` drives
`tensorrt_llm.LLM` when TensorRT-LLM and a GPU are here, and names what is missing elsewhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError
from compactlm.engines.backend import Backend
from compactlm.engines.backends.trtllm import shared
from compactlm.engines.backends.trtllm.commands import command_lines
from compactlm.engines.backends.trtllm.llm_args import LLM_ARGS_FILE, llm_args, read_llm_args, write_llm_args
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest
from compactlm.engines.runtime import Engine

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint

from compactlm.engines.backends.trtllm.commands import CHECKPOINT_DIR

CONTAINER = "NVIDIA's TensorRT-LLM release container (see the Dockerfile) on a GPU host"
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
QUANTIZED = ("fp8", "int4-awq")
"""Formats written as ModelOpt unified checkpoints that TensorRT-LLM's PyTorch backend, vLLM and SGLang all run
(FP8 on Ada/Hopper and later; W4A16 AWQ on Ampere and later). INT8 SmoothQuant stays with the legacy flow."""
SOURCE_FILES = ("config.json", "generation_config.json", "hf_quant_config.json")


class TrtllmBackend(Backend):
    name = "trtllm"
    precisions = ("fp16", "bf16", *QUANTIZED)
    default_precision = "fp16"
    description = (
        "TensorRT-LLM, current flow (PyTorch backend): the HF or ModelOpt unified FP8/INT4-AWQ checkpoint it loads "
        "directly, LLM-arguments YAML, trtllm-serve/trtllm-bench/vLLM command lines; tensor parallel"
    )

    def check_available(self, config: BuildConfig) -> None:
        if config.precision in QUANTIZED:
            shared.require_modelopt(f"{config.precision} calibration and the unified checkpoint export")

    def check_model(self, model_config, config: BuildConfig) -> None:
        shared.check_family(model_config, shared.PYTORCH_FAMILIES, "current TensorRT-LLM (PyTorch backend)")
        shared.check_model(model_config, config)
        if config.precision == "int4-awq":
            from compactlm.compress.arch import shape_of

            shape = shape_of(model_config)
            widths = (
                ("hidden size", shape.hidden_size),
                ("MLP width", shape.ffn_hidden_size),
                ("expert FFN width", shape.moe_ffn_hidden_size),
            )
            for what, width in widths:
                if width % 64:
                    raise CompactLMError(f"INT4 AWQ groups of 64 or 128 inputs need the {what} ({width}) to divide")

    def check_quantized(self, fmt: str, config: BuildConfig) -> None:
        """A unified checkpoint from `compress quantize` is what TensorRT-LLM loads: copied at its own format."""
        if config.precision != fmt:
            raise CompactLMError(
                f"the checkpoint is a ModelOpt unified {fmt} checkpoint (compress quantize): build it with "
                f"--precision {fmt}, not {config.precision}"
            )
        if fmt not in QUANTIZED:
            raise CompactLMError(
                f"TensorRT-LLM's PyTorch backend does not run {fmt} unified checkpoints; build the unquantized parent "
                f"with --backend trtllm-engine --precision {fmt} (legacy) or --precision fp8"
            )

    def build(self, checkpoint: Checkpoint, out: Path, config: BuildConfig) -> dict:
        target = out / CHECKPOINT_DIR
        target.mkdir()
        if checkpoint.quantized:
            info = copy_unified(checkpoint, target)
        else:
            info = export(checkpoint, target, config)
        if checkpoint.has_tokenizer:
            shared.tokenizer_of(checkpoint).save_pretrained(target)
        args = llm_args(config)
        write_llm_args(out / LLM_ARGS_FILE, args)
        info |= {
            "checkpoint_dir": CHECKPOINT_DIR,
            "llm_args": LLM_ARGS_FILE,
            "commands": command_lines(config, checkpoint.path.name),
        }
        missing = shared.runtime_missing()
        info["runtime_missing"] = missing
        if missing:
            info["notice"] = (
                f"checkpoint and LLM arguments ready and verified on CPU; TensorRT-LLM cannot run here ({missing}): "
                f"serve it in {CONTAINER} with `cd <engine folder> && {info['commands']['trtllm_serve']}`"
            )
        return info

    def load(self, path: Path, manifest: Manifest) -> Engine:
        info = manifest.backend_info
        if "trtllm_build_command" in info:  # built by an older compactlm, whose trtllm backend was the legacy flow
            from compactlm.engines.registry import get_backend

            return get_backend("trtllm-engine").load(path, manifest)
        missing = shared.runtime_missing()
        if missing:
            command = info.get("commands", {}).get("trtllm_serve", "trtllm-serve checkpoint --config llm_args.yaml")
            raise CompactLMError(
                f"cannot run the TensorRT-LLM checkpoint in {path}: {missing}; run it in {CONTAINER}: "
                f"cd {path} && {command}"
            )
        return shared.TrtllmEngine(path, manifest, lambda: open_llm(path, info))


def open_llm(path: Path, info: dict):
    """tensorrt_llm.LLM over the engine folder's checkpoint with its LLM arguments (token ids in, ids out)."""
    from tensorrt_llm import LLM

    args = read_llm_args(path / info.get("llm_args", LLM_ARGS_FILE))
    return LLM(model=str(path / info.get("checkpoint_dir", CHECKPOINT_DIR)), skip_tokenizer_init=True, **args)


def export(checkpoint: Checkpoint, target: Path, config: BuildConfig) -> dict:
    """Write the checkpoint TensorRT-LLM loads and compare it, read back on CPU, with the source."""
    import torch

    from compactlm.compress.arch import count_params, shape_of
    from compactlm.compress.checkpoint import load_model

    model = load_model(checkpoint)
    params = count_params(shape_of(model.config))
    tokens, where = None, None
    source_logits = None
    if params <= shared.VERIFY_MAX_PARAMS:
        tokens, where = shared.verification_tokens(checkpoint, model.config, config)
        with torch.inference_mode():
            source_logits = model(input_ids=tokens, use_cache=False).logits.float()
    info: dict = {}
    if config.precision in DTYPES:
        dtype = DTYPES[config.precision]
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            model.to(getattr(torch, dtype)).save_pretrained(target)
        finally:
            hf_logging.enable_progress_bar()
        info["dtype"] = dtype
    else:
        from compactlm.compress.quantize import quantize_model
        from compactlm.compress.unified import export_dtype, export_unified

        calibration = list(shared.calibration_tokens(checkpoint, model.config, config).split(8))
        info |= {k: v for k, v in quantize_model(model, config.precision, calibration).items() if k != "format"}
        info["dtype"] = export_dtype(model.config)
        info["unified"] = export_unified(model, target, info["dtype"])
    del model
    _carry_generation_config(checkpoint.path, target)
    if tokens is None:
        info["verification"] = {"skipped": f"{params:,} parameters > {shared.VERIFY_MAX_PARAMS:,} (memory for a copy)"}
    else:
        info["verification"] = verify(target, tokens, source_logits) | {"tokens": where}
    return info


def copy_unified(checkpoint: Checkpoint, target: Path) -> dict:
    """A unified checkpoint from `compress quantize`: its files as they are (the hash in the manifest is theirs)."""
    from compactlm.compress.unified import read_quant_config

    for name in (*SOURCE_FILES, *(p.name for p in checkpoint.weights)):
        source = checkpoint.path / name
        if source.is_file():
            shutil.copyfile(source, target / name)
    index = checkpoint.path / "model.safetensors.index.json"
    if index.is_file():
        shutil.copyfile(index, target / index.name)
    return {"unified": read_quant_config(target), "quantized_by": "compress quantize (its unified checkpoint, copied)"}


def _carry_generation_config(source: Path, target: Path) -> None:
    """The source's generation_config.json (its EOS ids win in transformers, TensorRT-LLM and vLLM alike)."""
    file = source / "generation_config.json"
    if file.is_file():
        shutil.copyfile(file, target / file.name)


def verify(target: Path, tokens, source_logits) -> dict:
    """The written checkpoint read back on CPU in fp32 (transformers for fp16/bf16, compactlm's unified reader for
    quantized ones) against the source's logits: max |dlogit|, KL, held-out loss delta, top-1 agreement."""
    import torch

    from compactlm.compress.checkpoint import load_model
    from compactlm.engines.backends.trtllm.checkpoint import compare_logits

    model = load_model(target)
    with torch.inference_mode():
        logits = model(input_ids=tokens, use_cache=False).logits.float()
    result = {"sequences": int(tokens.shape[0]), "tokens_per_sequence": int(tokens.shape[1])}
    result |= compare_logits(source_logits, logits, tokens)
    result["reader"] = "compactlm unified reader" if getattr(model, "compactlm_quantization", None) else "transformers"
    return result
