"""The compression core: importance estimation, structured pruning and (later) distillation of HF LLMs.

The public API reads like the pipeline::

    model = load_model("smollm2-135m")
    scores = estimate_importance(model, calibration_batches)
    student, record = prune(model, scores, PruneTarget(hidden_size=432, ffn_hidden_size=1024))
"""

from compress.checkpoint import load_model, load_tokenizer, save_checkpoint
from compress.errors import CompactLMError
from compress.importance import ImportanceConfig, ImportanceScores, estimate_importance
from compress.prune import PruneTarget, prune

__all__ = [
    "CompactLMError",
    "ImportanceConfig",
    "ImportanceScores",
    "PruneTarget",
    "estimate_importance",
    "load_model",
    "load_tokenizer",
    "prune",
    "save_checkpoint",
]
