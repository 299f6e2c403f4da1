"""What the benchmark harness itself costs: its request rate against the null engine, and its per-request
timing overhead next to the latencies it reports on a real engine.

Targets (issue 5): >= 5,000 requests/s in-process against the null engine (an engine that answers at once), and a
per-request overhead under 1% of the reported latencies on the real engine.

In-process, token times are stamped by the engine's worker as it hands tokens over, so the harness adds nothing
inside a reported latency; what it does add is the gap between a request's end and the next submit at fixed
concurrency (waking the client, making the record, drawing the next request, submitting it): time in which the
engine waits for the harness, which lowers the measured throughput. That gap is measured directly (the next
submit - the previous request's last token, per client at concurrency 1) and compared with the mean E2E. As a
cross-check, the harness's request rate at concurrency 1 is compared with a bare loop of `engine.generate` on the
same prompts.

    python -m compactlm.bench.perf.harness_overhead [--requests 20000] \
        [--engine DIR [--isl 128 --osl 128 --real-requests 8]] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from compactlm.bench.fake import NullEngine
from compactlm.bench.loadgen import Load, run_load
from compactlm.bench.metrics import summarize
from compactlm.bench.targets import EngineTarget
from compactlm.bench.workload import Workload, WorkloadSpec

NULL_TARGET = 5000.0
OVERHEAD_TARGET = 0.01


def resubmit_gaps(records) -> list[float]:
    """At concurrency 1: each submit minus the previous request's end (the time the engine waited for us)."""
    ordered = sorted(records, key=lambda r: r.submitted)
    return [b.submitted - a.ended for a, b in zip(ordered, ordered[1:], strict=False)]


def null_engine(requests: int, isl: int, osl: int, repeats: int) -> dict:
    """Requests/s of the harness against the null engine, per load mode (median of `repeats`)."""
    out = {}
    with EngineTarget(NullEngine()) as target:
        workload = Workload(WorkloadSpec(isl, osl, seed=1), vocab_size=32000)
        items = workload.take(requests)
        run_load(target, items[:1000], Load("concurrency", concurrency=8))  # warm-up
        for load in (Load("offline"), Load("concurrency", concurrency=1), Load("concurrency", concurrency=64)):
            rates, gaps = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                run = run_load(target, items, load)
                row = summarize(run.records)
                wall = time.perf_counter() - start  # the whole harness: load, records and metrics
                assert row["errors"] == 0, row["error_example"]
                rates.append(len(run.records) / wall)
                if load.mode == "concurrency" and load.concurrency == 1:
                    gaps.append(statistics.mean(resubmit_gaps(run.records)))
            out[load.describe()] = {"requests_per_s": statistics.median(rates)}
            if gaps:
                out[load.describe()]["resubmit_gap_us"] = statistics.median(gaps) * 1e6
    return out


def real_engine(path: str, isl: int, osl: int, requests: int, batch_sizes: list[int]) -> dict:
    """Latencies the harness reports on a real engine, the harness's resubmit gap, and a bare-loop cross-check."""
    from compactlm.bench.targets import open_target

    out = {}
    with open_target(path) as target:  # an engine folder (`null` for a smoke test of this script)
        if not isinstance(target, EngineTarget):
            raise SystemExit(f"--engine takes an engine folder, not {path}")
        workload = Workload(WorkloadSpec(isl, osl, seed=2), target.vocab_size, exclude=target.eos_token_ids)
        run_load(target, workload.take(2), Load("concurrency", concurrency=1))  # warm-up
        for batch in batch_sizes:
            run = run_load(target, workload.take(requests), Load("concurrency", concurrency=batch))
            row = summarize(run.records)
            entry = {k: row[k] for k in ("request_throughput", "ttft_ms_mean", "itl_ms_mean", "e2e_ms_mean", "errors")}
            if batch == 1:
                gap_ms = statistics.mean(resubmit_gaps(run.records)) * 1e3
                entry["resubmit_gap_ms"] = gap_ms
                entry["overhead_of_e2e"] = gap_ms / row["e2e_ms_mean"]
                entry["overhead_of_ttft"] = gap_ms / row["ttft_ms_mean"]
                prompts = [list(i.input_ids) for i in workload.take(requests)]  # fresh prompts: no cache hits
                start = time.perf_counter()
                for prompt in prompts:  # the bare loop: no harness at all
                    target.engine.generate([prompt], osl, ignore_eos=True)
                bare = requests / (time.perf_counter() - start)
                entry["bare_loop_request_throughput"] = bare
                entry["harness_vs_bare"] = row["request_throughput"] / bare - 1
            out[f"concurrency {batch}"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per null-engine measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", help="a real engine folder for the overhead-vs-latency part")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--real-requests", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", help="also write the numbers as JSON")
    args = parser.parse_args()

    results = {"null_engine": null_engine(args.requests, args.isl, 16, args.repeats)}
    what = f"{args.requests} requests of {args.isl}/16 tokens, median of {args.repeats}"
    print(f"\nharness against the null engine ({what}; target >= {NULL_TARGET:,.0f} req/s):")
    for mode, entry in results["null_engine"].items():
        verdict = "ok" if entry["requests_per_s"] >= NULL_TARGET else "BELOW TARGET"
        gap = f", resubmit gap {entry['resubmit_gap_us']:.1f} us" if "resubmit_gap_us" in entry else ""
        print(f"  {mode:16s} {entry['requests_per_s']:>10,.0f} req/s{gap}  {verdict}")
    if args.engine:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        results["real_engine"] = real_engine(args.engine, args.isl, args.osl, args.real_requests, sizes)
        print(f"\n{args.engine}, {args.isl}/{args.osl}, {args.real_requests} requests a point:")
        for name, entry in results["real_engine"].items():
            e = entry
            latencies = f"TTFT {e['ttft_ms_mean']:.1f} ms, ITL {e['itl_ms_mean']:.2f} ms, E2E {e['e2e_ms_mean']:.0f} ms"
            print(f"  {name}: {e['request_throughput']:.2f} req/s, {latencies}, errors {e['errors']}")
            if "resubmit_gap_ms" in e:
                verdict = "ok" if e["overhead_of_e2e"] < OVERHEAD_TARGET else "ABOVE TARGET"
                share = f"{e['overhead_of_e2e']:.3%} of E2E, {e['overhead_of_ttft']:.3%} of TTFT"
                print(f"    harness gap per request {e['resubmit_gap_ms']:.3f} ms = {share}  {verdict}")
                print(f"    harness vs a bare generate loop: {e['harness_vs_bare']:+.2%} req/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v))
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
