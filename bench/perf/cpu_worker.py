"""What running the cpu engine's pipeline in a worker process costs (`load_engine(..., recycle=True)`, what `compactlm
serve` runs): output tokens/s of the same engine in process and in a worker, each measured in its own fresh Python
process, the two alternating, so that neither sees the other's threads.

(Measured in one process instead, the in-process engine's OpenVINO threads and the worker's share the 2 cores and
the worker looked 12-15% slower at batch 1: an artefact of the benchmark, not of serving, where the server process
runs no pipeline of its own.)

    python -m compactlm.bench.perf.cpu_worker ENGINE_DIR [--batches 1,8,32] [--isl 128] [--osl 128] \\
        [--repeats 3] [--out FILE.json]

Fresh random prompts, EOS ignored, all requests of a batch submitted at once; a warm-up batch first in each process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compactlm.core.host import environment


def child(engine_dir: str, recycle: bool, batches: list[int], isl: int, osl: int, seed: int) -> dict:
    import numpy as np

    from compactlm.engines import load_engine

    rng = np.random.default_rng(seed)
    with load_engine(engine_dir, recycle=recycle) as engine:
        vocab = engine.manifest.model.get("vocab_size") or 1000

        overhead: dict[str, float] = {}

        def run(batch: int) -> float:
            prompts = rng.integers(0, vocab, (batch, isl)).tolist()
            worker = engine.worker
            if worker is not None:
                worker.steps, worker.step_seconds, worker.wait_seconds = 0, 0.0, 0.0
            start = time.perf_counter()
            completions = engine.generate(prompts, osl, ignore_eos=True)
            elapsed = time.perf_counter() - start
            if any(len(c.tokens) != osl or c.error for c in completions):
                raise RuntimeError("a request did not produce its tokens")
            if worker is not None and worker.steps:  # the share of each step's wait the process boundary cost
                overhead[str(batch)] = (worker.wait_seconds - worker.step_seconds) / worker.wait_seconds
            return batch * osl / elapsed

        run(2)
        rates = {str(b): run(b) for b in batches}
        return {"rates": rates, "boundary_share": overhead}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", help="a cpu engine folder")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=("process", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        rates = child(args.engine, args.child == "worker", batches, args.isl, args.osl, args.seed)
        print(json.dumps(rates))
        return
    rates: dict[tuple[str, int], list[float]] = {}
    boundary: dict[int, list[float]] = {}  # batch -> share of the parent's step wait spent outside the worker
    for repeat in range(args.repeats):
        for mode in ("process", "worker"):
            command = [sys.executable, "-m", "compactlm.bench.perf.cpu_worker", args.engine, "--child", mode]
            command += ["--batches", args.batches, "--isl", str(args.isl), "--osl", str(args.osl)]
            command += ["--seed", str(repeat)]
            run = subprocess.run(command, capture_output=True, text=True, check=False)
            if run.returncode:
                raise SystemExit(f"{mode}: the child failed:\n{run.stderr[-2000:]}")
            reply = json.loads(run.stdout.strip().splitlines()[-1])
            result = reply["rates"]
            for b in batches:
                rates.setdefault((mode, b), []).append(result[str(b)])
                if str(b) in reply["boundary_share"]:
                    boundary.setdefault(b, []).append(reply["boundary_share"][str(b)])
            print(f"repeat {repeat + 1} {mode:<8} " + "  ".join(f"batch {b} {result[str(b)]:.1f}" for b in batches))
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\noutput tokens/s, ISL/OSL {args.isl}/{args.osl}, median of {args.repeats}")
    for mode in ("process", "worker"):
        print(f"{mode:<10}" + "".join(f"{'batch ' + str(b):>10} {median[(mode, b)]:7.1f}" for b in batches))
    costs = {b: 1 - median[("worker", b)] / median[("process", b)] for b in batches}
    print("worker cost (positive = slower): " + ", ".join(f"batch {b} {c * 100:+.1f}%" for b, c in costs.items()))
    crossing = {b: statistics.median(v) for b, v in boundary.items()}
    print(
        "of which the process boundary (the parent's wait for a step beyond the worker's time in it): "
        + ", ".join(f"batch {b} {crossing[b] * 100:.1f}% of a step" for b in crossing)
    )
    if args.out:
        report = {
            "engine": args.engine,
            "isl": args.isl,
            "osl": args.osl,
            "repeats": args.repeats,
            "tokens_per_s": [
                {"mode": mode, "batch": b, "values": rates[(mode, b)], "median": median[(mode, b)]}
                for mode in ("process", "worker")
                for b in batches
            ],
            "worker_cost": {str(b): round(c, 4) for b, c in costs.items()},
            "boundary_share": {str(b): v for b, v in boundary.items()},
            "environment": environment(),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
