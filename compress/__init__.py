"""The compression core: importance estimation, structured pruning and (later) distillation of HF LLMs.

The public API reads like the pipeline::

    model = load_model("smollm2-135m")
    scores = estimate_importance(model, calibration_sequences)
    student, record, kept = prune(model, scores, PruneTarget(hidden_size=432, ffn_hidden_size=1024))
    result = run_search("smollm2-135m", "search", SearchConfig(params=0.5))   # architecture search to a budget
    quantize_model(student, "fp8", calibration_batches)                       # modelopt PTQ, fake-quant on CPU

Names are imported lazily, so that `compactlm --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CompactLMError": "compactlm.core.errors",
    "ImportanceConfig": "compactlm.compress.importance",
    "ImportanceScores": "compactlm.compress.importance",
    "estimate_importance": "compactlm.compress.importance",
    "PruneTarget": "compactlm.compress.prune",
    "prune": "compactlm.compress.prune",
    "load_model": "compactlm.compress.checkpoint",
    "load_tokenizer": "compactlm.compress.checkpoint",
    "save_checkpoint": "compactlm.compress.checkpoint",
    "load_sequences": "compactlm.compress.data",
    "perplexity": "compactlm.compress.evaluate",
    "SearchConfig": "compactlm.compress.search",
    "run_search": "compactlm.compress.search",
    "QuantizeConfig": "compactlm.compress.quantize",
    "quantize_model": "compactlm.compress.quantize",
    "quantize_checkpoint": "compactlm.compress.quantize",
    "load_chain": "compactlm.compress.chain",
    "run_chain": "compactlm.compress.chain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
