"""Students vs teacher on the same engine and precision: output tokens/s side by side, next to the FLOP ratio.

The paper measured, on TensorRT-LLM GPUs, ~1.8x the teacher's request throughput for the width-pruned half-size
student and ~2.7x for the depth-pruned one. Here: the `cpu` engine, ISL/OSL 128/128, batch 1, 8 and 32, fresh
random prompts, all requests at once, interleaved repeats, medians. FLOPs per generated token are counted
analytically (matmuls incl. the LM head, plus attention over the average context of the workload).

    python -m compactlm.bench.perf.students_speed --teacher smollm2-135m --width runs/demo/width \
        --depth runs/demo/depth --build runs/engines [--precision fp32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def flops_per_token(model: dict, context: float) -> float:
    """Forward FLOPs of one decoded token at a given context length (2 per multiply-add)."""
    d, f, hd = model["hidden_size"], model["ffn_hidden_size"], model["head_dim"]
    q, kv = model["num_attention_heads"] * hd, model["num_query_groups"] * hd
    matmuls = model["num_layers"] * (d * q + 2 * d * kv + q * d + 3 * d * f) + model["vocab_size"] * d
    attention = model["num_layers"] * 2 * q * context  # scores and weighted sum
    return 2 * (matmuls + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--width", type=Path, default=Path("runs/demo/width"))
    parser.add_argument("--depth", type=Path, default=Path("runs/demo/depth"))
    parser.add_argument("--build", type=Path, default=Path("runs/engines"))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from compactlm.bench.perf.cpu_engine import ensure_engine, fresh_prompts, wrapper_run
    from compactlm.engines import Limits, load_engine

    batches = [int(b) for b in args.batches.split(",")]
    limits = Limits(max_batch_size=max(batches), max_input_len=args.isl, max_seq_len=args.isl + args.osl)
    engines = {}
    for label, checkpoint in (("teacher", args.teacher), ("width", args.width), ("depth", args.depth)):
        out = ensure_engine(checkpoint, args.build / f"{label}-cpu-{args.precision}", args.precision, limits)
        engines[label] = load_engine(out)

    rng = np.random.default_rng(0)
    vocab = engines["teacher"].manifest.model["vocab_size"]

    def run(engine, batch: int) -> float:
        prompts = fresh_prompts(rng, batch, args.isl, vocab)
        start = time.perf_counter()
        tokens = wrapper_run(engine, prompts, args.osl)
        elapsed = time.perf_counter() - start
        if tokens != batch * args.osl:
            raise SystemExit(f"{engine.name}: {tokens} output tokens, expected {batch * args.osl}")
        return tokens / elapsed

    for engine in engines.values():
        run(engine, 2)  # warm-up
    rates: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for batch in batches:
            for label, engine in engines.items():
                rate = run(engine, batch)
                rates.setdefault((label, batch), []).append(rate)
                print(f"repeat {repeat + 1} batch {batch:>3} {label:<8} {rate:8.1f} tok/s", flush=True)

    context = args.isl + args.osl / 2
    teacher_flops = flops_per_token(engines["teacher"].manifest.model, context)
    print(f"\ncpu/{args.precision}, ISL/OSL {args.isl}/{args.osl}, output tokens/s, median of {args.repeats}")
    header = f"{'model':<10}{'params':>9}{'FLOP ratio':>12}" + "".join(f"{'batch ' + str(b):>22}" for b in batches)
    print(header)
    for label, engine in engines.items():
        model = engine.manifest.model
        ratio = teacher_flops / flops_per_token(model, context)
        cells = []
        for b in batches:
            rate = statistics.median(rates[(label, b)])
            speedup = rate / statistics.median(rates[("teacher", b)])
            cells.append(f"{rate:9.1f} ({speedup:4.2f}x)")
        print(f"{label:<10}{model['params'] / 1e6:>8.1f}M{ratio:>11.2f}x" + "".join(f"{c:>22}" for c in cells))
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
