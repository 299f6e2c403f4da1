"""The cpu engine's step budget (`engines build --max-num-tokens`: prompt and decode tokens in one step) against
time to first token and request throughput, the pipeline in a worker process as `compactlm serve` runs it.

In a closed loop of equal-length requests a whole wave of streams ends in one step and comes back together; served,
the wave reaches the engine at once, and with a budget that holds every prompt it is prefilled in one long step:
every request of the wave waits for all of them. A smaller budget splits the wave's prefill over several steps
(dynamic split-fuse), which gives earlier first tokens to most of the wave and smaller steps to the running ones, at
some cost in throughput. This measures both, side by side: each budget is the same engine loaded with another step
budget (`load_engine(..., max_num_tokens=N)`, what `compactlm serve --max-num-tokens N` does); each round loads every
budget in a rotated order.

    python -m compactlm.bench.perf.step_budget ENGINE_DIR [--budgets 2048,512,256] [--concurrency 8,32] \\
        [--rounds 3] [--per-stream 4] [--isl 128] [--osl 128] [--out docs/bench/step_budget.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compactlm.core.host import environment


def measure(
    engine_dir: Path, budget: int, concurrencies: list[int], per_stream: int, isl: int, osl: int, seed: int
) -> list[dict]:
    from compactlm.bench.loadgen import Load, run_load
    from compactlm.bench.metrics import summarize
    from compactlm.bench.targets.engine import EngineTarget
    from compactlm.bench.workload import Workload, WorkloadSpec
    from compactlm.engines import load_engine

    rows = []
    with load_engine(engine_dir, recycle=True, max_num_tokens=budget) as engine:
        target = EngineTarget(engine, close_engine=False)
        for c in concurrencies:
            items = Workload(WorkloadSpec(isl, osl, seed=seed + c), vocab_size=target.vocab_size).take(
                c * (per_stream + 1)
            )
            run = run_load(target, items[c:], Load("concurrency", concurrency=c), warmup=items[:c])
            row = summarize(run.records)
            if row["errors"]:
                raise RuntimeError(f"{row['errors']} requests failed: {row.get('error_example')}")
            rows.append({"concurrency": c, **{k: row[k] for k in KEYS}})
    return rows


KEYS = (
    "request_throughput",
    "output_throughput",
    "ttft_ms_p50",
    "ttft_ms_p90",
    "ttft_ms_p99",
    "ttft_ms_mean",
    "itl_ms_p50",
    "itl_ms_p99",
    "completed",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="a cpu engine folder")
    parser.add_argument("--budgets", default="2048,512,256")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-stream", type=int, default=4, help="Measured requests per stream and point.")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/step_budget.json"))
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    engine = args.engine.resolve()
    if not (engine / "engine.json").is_file():
        raise SystemExit(f"{engine} is not an engine folder (no engine.json)")
    raw: list[dict] = []
    for r in range(args.rounds):
        order = budgets[r % len(budgets) :] + budgets[: r % len(budgets)]
        for b in order:
            started = time.perf_counter()
            for row in measure(engine, b, concurrencies, args.per_stream, args.isl, args.osl, seed=1000 * r):
                raw.append({"round": r + 1, "budget": b, **row})
                print(
                    f"round {r + 1} budget {b:5d} c={row['concurrency']:3d}: {row['request_throughput']:.3f} req/s,"
                    f" TTFT p50 {row['ttft_ms_p50']:.0f} p99 {row['ttft_ms_p99']:.0f} ms,"
                    f" ITL p50 {row['itl_ms_p50']:.1f} ms",
                    flush=True,
                )
            print(f"  ({time.perf_counter() - started:.0f} s with the load)", flush=True)
    points = []
    for c in concurrencies:
        base = {row["round"]: row for row in raw if row["budget"] == budgets[0] and row["concurrency"] == c}
        for b in budgets:
            rows = [row for row in raw if row["budget"] == b and row["concurrency"] == c]
            point = {"budget": b, "concurrency": c}
            for k in KEYS[:-1]:
                point[k] = round(statistics.median(row[k] for row in rows), 3)
            point["req_vs_first_budget_paired"] = round(
                statistics.median(row["request_throughput"] / base[row["round"]]["request_throughput"] for row in rows),
                3,
            )
            point["req_per_s_by_round"] = [round(row["request_throughput"], 3) for row in rows]
            points.append(point)
    report = {
        "what": "cpu engine step budget (max_num_tokens) vs TTFT and req/s, pipeline in a worker, closed loop",
        "engine": str(args.engine),
        "workload": {
            "isl": args.isl,
            "osl": args.osl,
            "prompts": "random",
            "ignore_eos": True,
            "requests": f"{args.per_stream}x concurrency",
        },
        "rounds": args.rounds,
        "host": environment(),
        "points": points,
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"\n{'budget':>6} {'c':>3} {'req/s':>7} {'paired':>7} {'TTFT p50':>9} {'p99':>6} {'ITL p50':>8}")
    for p in points:
        print(
            f"{p['budget']:>6} {p['concurrency']:>3} {p['request_throughput']:>7.3f}"
            f" {p['req_vs_first_budget_paired']:>7.3f} {p['ttft_ms_p50']:>9.0f} {p['ttft_ms_p99']:>6.0f}"
            f" {p['itl_ms_p50']:>8.1f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
