"""The quantized checkpoint format: ModelOpt's unified Hugging Face checkpoint (compactlm.compress.unified), the
one FP8 / INT8 / INT4 artifact that TensorRT-LLM, vLLM and SGLang load directly. Reading one back never unpickles
anything: its weights are dequantized with their scales (safetensors), its activation scales applied as hooks."""

from __future__ import annotations

import os
from pathlib import Path

from compactlm.core.errors import CompactLMError

LEGACY_STATE_FILE = "modelopt_state.pth"
"""What compactlm wrote before the unified format: modelopt's quantizer state as a pickle. Never loaded."""


def quantized_format(path: str | os.PathLike, record: dict | None = None) -> str | None:
    """The format a checkpoint folder is quantized in (fp8, int8-sq, int4-awq), or None for a plain one."""
    from compactlm.compress.unified import unified_format

    path = Path(path)
    fmt = unified_format(path)
    if fmt is None and (path / LEGACY_STATE_FILE).is_file():
        raise CompactLMError(
            f"{path} is a quantized checkpoint from an older compactlm: its quantizer state is a pickle "
            f"({LEGACY_STATE_FILE}), which compactlm no longer loads (a pickle from someone else can run code). "
            "Quantize its parent again with `compactlm compress quantize` (it writes the unified HF checkpoint)"
        )
    return fmt


def load_quantized(path: Path, files, dtype=None):
    """A quantized checkpoint as a plain model on CPU: weights dequantized, activations rounded as the engine does."""
    from compactlm.compress.unified import load_unified

    return load_unified(path, files, dtype)
