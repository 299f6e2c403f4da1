"""Importance estimation vs a plain forward pass over the same tokens, side by side in one run.

Target (issue: compression core part 1): the hooks cost at most 25% over the plain forward.

The width pass runs the base model (no LM head: importance does not need logits), so the like-for-like
baseline is the base model's plain forward; the full forward (with LM head) is shown too. Runs are
interleaved (plain, hooked, full, plain, ...) so that drift of the machine hits all three alike; the median of
the repeats is reported.

    python -m compactlm.bench.perf.importance_overhead [--model smollm2-135m] [--samples 32] [--seq-len 256] \
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from compactlm.bench.perf.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="python-docs")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from compactlm.compress.checkpoint import load_model, load_tokenizer
    from compactlm.compress.data import load_sequences
    from compactlm.compress.importance import ImportanceConfig, estimate_importance

    model = load_model(args.model)
    tokens = load_sequences(args.data, load_tokenizer(args.model), num_sequences=args.samples, seq_len=args.seq_len)
    config = ImportanceConfig(batch_size=args.batch_size, removal_loss=False)

    @torch.inference_mode()
    def plain(full: bool) -> None:
        for start in range(0, len(tokens), args.batch_size):
            batch = tokens[start : start + args.batch_size]
            (model if full else model.model)(input_ids=batch, use_cache=False)

    runs = {
        "plain forward (base model)": lambda: plain(full=False),
        "importance (hooked base model)": lambda: estimate_importance(model, tokens, config),
        "plain forward (with LM head)": lambda: plain(full=True),
    }
    plain(full=False)  # warm-up: first-call allocations and kernel selection
    times = interleaved(runs, args.repeats)

    n_tokens = tokens.numel()
    base = statistics.median(times["plain forward (base model)"])
    print(
        f"\n{args.model}: {args.samples} x {args.seq_len} tokens, batch {args.batch_size}, "
        f"{args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"{'run':34s} {'median s':>9s} {'min s':>7s} {'tokens/s':>9s} {'vs base fwd':>12s}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:34s} {med:9.2f} {min(values):7.2f} {n_tokens / med:9.0f} {100 * (med / base - 1):+11.1f}%")
    overhead = statistics.median(times["importance (hooked base model)"]) / base - 1
    verdict = "meets" if overhead <= 0.25 else "MISSES"
    print(f"\nimportance overhead over the plain forward: {100 * overhead:+.1f}% ({verdict} the <= 25% target)")


if __name__ == "__main__":
    main()
