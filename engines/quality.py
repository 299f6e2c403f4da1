"""How much a precision costs: held-out perplexity computed by the engine's own model, and greedy-token agreement.

For the cpu backend the exported OpenVINO model is compiled with the engine's runtime properties (weights and
compute precision as served) and run over whole sequences; the torch backend runs transformers. Quantized KV
caches (u8) do not enter here: within one forward pass attention reads the fresh keys and values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from compactlm.core.errors import CompactLMError
from compactlm.engines.manifest import read_manifest


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((logz - picked).sum()), int(targets.size)


def _openvino_logits(path: Path, properties: dict):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path / "model" / "openvino_model.xml"), "CPU", properties)
    request = compiled.create_infer_request()

    def run(ids: np.ndarray) -> np.ndarray:
        request.reset_state()
        batch, length = ids.shape
        result = request.infer(
            {
                "input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((batch, length), dtype=np.int64),
                "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy(),
                "beam_idx": np.arange(batch, dtype=np.int32),
            }
        )
        return np.asarray(result["logits"])

    return run


def _torch_logits(path: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path / "model", dtype=getattr(torch, dtype)).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids)).logits.float().numpy()

    return run


def logits_fn(engine_dir: str | Path):
    """A function token ids [batch, length] -> logits [batch, length, vocab] computed as the engine computes."""
    path = Path(engine_dir)
    manifest = read_manifest(path)
    if manifest.backend == "cpu":
        return _openvino_logits(path, manifest.backend_info.get("properties", {}))
    if manifest.backend == "torch":
        return _torch_logits(path, manifest.backend_info.get("dtype", "float32"))
    raise CompactLMError(f"perplexity is measured on cpu and torch engines, not {manifest.backend!r}")


def engine_perplexity(engine_dir: str | Path, sequences, batch_size: int = 4) -> float:
    """Perplexity of token sequences [n, length] (next-token NLL over all positions after the first)."""
    run = logits_fn(engine_dir)
    sequences = np.asarray(sequences, dtype=np.int64)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size]
        nll, n = _log_softmax_nll(run(ids)[:, :-1], ids[:, 1:])
        total, count = total + nll, count + n
    return math.exp(total / count)
