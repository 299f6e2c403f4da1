"""compactlm.compress, the compression core: importance estimation, structured pruning, distillation, teacher
correction, architecture search, chains, quantization and evaluation of Hugging Face LLMs.

The public API reads like the pipeline::

    checkpoint = inspect_checkpoint("smollm2-135m")      # resolved and validated once
    model = load_model(checkpoint)
    scores = estimate_importance(model, calibration_sequences)
    student, record, kept = prune(model, scores, PruneTarget(hidden_size=432, ffn_hidden_size=1024))
    distill_checkpoint(teacher, student_dir, out, train_cfg=TrainConfig(tokens=24576), distill_cfg=DistillConfig())
    result = run_search("smollm2-135m", "search", SearchConfig(params=0.5))   # architecture search to a budget
    quantize_model(student, "fp8", calibration_batches)                       # modelopt PTQ, fake-quant on CPU

Names are imported lazily, so that `compactlm --help` does not pay for importing torch.
"""

from __future__ import annotations

from compactlm.core.exports import lazy_exports

_EXPORTS = {
    "CompactLMError": "compactlm.core.errors",
    "ImportanceConfig": "compactlm.compress.importance",
    "ImportanceScores": "compactlm.compress.importance",
    "estimate_importance": "compactlm.compress.importance",
    "PruneTarget": "compactlm.compress.prune",
    "prune": "compactlm.compress.prune",
    "Checkpoint": "compactlm.compress.checkpoint",
    "inspect_checkpoint": "compactlm.compress.checkpoint",
    "load_model": "compactlm.compress.checkpoint",
    "load_tokenizer": "compactlm.compress.checkpoint",
    "save_checkpoint": "compactlm.compress.checkpoint",
    "load_sequences": "compactlm.compress.data",
    "perplexity": "compactlm.compress.evaluate",
    "TrainConfig": "compactlm.compress.train_config",
    "DistillConfig": "compactlm.compress.train_config",
    "distill_checkpoint": "compactlm.compress.retrain",
    "correct_teacher": "compactlm.compress.retrain",
    "cache_logits": "compactlm.compress.retrain",
    "SearchConfig": "compactlm.compress.search",
    "run_search": "compactlm.compress.search",
    "QuantizeConfig": "compactlm.compress.quantize",
    "quantize_model": "compactlm.compress.quantize",
    "quantize_checkpoint": "compactlm.compress.quantize",
    "load_chain": "compactlm.compress.chain",
    "run_chain": "compactlm.compress.chain",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
