"""Distillation from cached top-k teacher logits vs from the live teacher, side by side in one run.

Targets (issue: compression core part 2): the cache path reaches a held-out loss within 2% of live-teacher
distillation at the same steps, with a lower peak memory. Each run is its own process (`compactlm compress
distill`), so its peak RSS is its own; the cache is built first (`compactlm compress cache-logits`), and its
cost is reported too: it is paid once per teacher and data, and reused by every student distilled from it.

    python -m compactlm.bench.perf.teacher_cache [--student runs/demo/width] [--steps 20] [--top-k 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compactlm", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", default="runs/demo/width")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="compactlm-cache-bench-"))
    common = [
        "--data",
        "python-docs",
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
    ]
    try:
        cache = work / "cache"
        cache_s = _run(
            ["compress", "cache-logits", args.teacher, "--out", str(cache), "--top-k", str(args.top_k), *common]
        )
        rows = {}
        for name, extra in [("live teacher", []), (f"cached top-{args.top_k}", ["--teacher-cache", str(cache)])]:
            out = work / name.replace(" ", "-")
            wall = _run(
                [
                    "compress",
                    "distill",
                    "--teacher",
                    args.teacher,
                    "--student",
                    args.student,
                    "--out",
                    str(out),
                    "--loss",
                    "logit",
                    "--eval-samples",
                    str(args.eval_samples),
                    *common,
                    *extra,
                ]
            )
            record = json.loads((out / "compactlm.json").read_text())["history"][-1]
            rows[name] = {"wall": wall, **record}
        cache_mb = sum(f.stat().st_size for f in cache.glob("*.safetensors")) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)

    live, cached = rows.values()
    print(
        f"\nteacher {args.teacher}, student {args.student}, logit loss, {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens; cache: top-{args.top_k}, {cache_mb:.0f} MiB, built in "
        f"{cache_s:.0f} s (process wall time)"
    )
    print(
        f"{'run':18s} {'train s':>8s} {'process s':>10s} {'peak RSS MiB':>13s} {'final train':>12s} "
        f"{'held-out loss':>14s}"
    )
    for name, r in rows.items():
        print(
            f"{name:18s} {r['seconds']:8.0f} {r['wall']:10.0f} {r['peak_memory_mb']:13.0f} "
            f"{r['final_train_loss']:12.4f} {r['heldout_loss']:14.4f}"
        )
    gap = cached["heldout_loss"] / live["heldout_loss"] - 1
    saved = 1 - cached["peak_memory_mb"] / live["peak_memory_mb"]
    print(
        f"\nheld-out loss, cache vs live: {100 * gap:+.2f}% ({'meets' if abs(gap) <= 0.02 else 'MISSES'} the 2% "
        f"target); peak memory {100 * saved:.0f}% lower; training time {cached['seconds'] / live['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
