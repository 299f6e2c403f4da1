"""This machine's arithmetic roofline, measured, and the arithmetic a generation run needs: so that a measured
throughput can be read as a share of what the CPU could do at most.

The roofline is the best of a few large GEMMs through torch (oneDNN / MKL) with the threads the engines use, in f32
and bf16 (bf16 only where the CPU has AVX512-BF16 or AMX; elsewhere it is recorded as absent). A run's arithmetic
counts the matmuls a Llama-style decoder cannot skip: the linear layers for every prompt and decode position, the
LM head where logits are needed (the last prompt position and each decode step), and attention scores and values
over the causal context. Embedding lookups, norms and activations are left out (they are not GEMMs).
"""

from __future__ import annotations

import time

SHAPES = ((2048, 2048, 2048), (4096, 576, 1536), (4096, 1536, 576), (32, 576, 49152))
"""(M, K, N): a square GEMM, then the shapes of a 32 x 128 prefill's MLP and of a batch-32 LM head."""


def gemm_flops_per_s(dtype: str, threads: int, repeats: int = 5) -> dict:
    """Best GFLOP/s over SHAPES (and each shape's), for "f32" or "bf16"."""
    import torch

    torch.set_num_threads(threads)
    kind = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    by_shape = {}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=kind), torch.randn(k, n, dtype=kind)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        by_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return {"dtype": dtype, "threads": threads, "gflops": max(by_shape.values()), "by_shape": by_shape}


def run_flops(config, batch: int, isl: int, osl: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of `batch` requests of `isl` prompt and `osl` output tokens: one prefill
    pass (its last position through the LM head) and osl - 1 decode steps."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    mlp = config.intermediate_size
    linear = layers * (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * mlp)
    positions = isl + osl - 1  # the last output token is sampled, never fed back
    per_request = 2 * linear * positions + 2 * hidden * config.vocab_size * osl
    context = sum(range(1, positions + 1))  # causal: position p attends to p positions
    per_request += layers * heads * head_dim * 2 * 2 * context  # QK^T and PV
    return float(batch * per_request)
