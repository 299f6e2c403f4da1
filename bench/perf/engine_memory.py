"""Memory of an in-process engine under a long run of requests: RSS every K requests, and the slope (KiB per
request) after a warm-up, for each engine given, each in a fresh child process so that one does not see the other's
memory. The torch engine is the baseline (its Python side is the same runtime layer as every engine's).

    python -m compactlm.bench.perf.engine_memory --engines cpu-int8=ENGINE_DIR torch=ENGINE_DIR \
        [--requests 5000] [--every 500] [--batch 8] [--isl 32] [--osl 32] [--out FILE.json]

A label ending in `+recycle` loads the engine as `compactlm serve` does (`load_engine(..., recycle=True)`: the cpu
backend's pipeline in a worker process that is replaced when it has grown), optionally `+recycle@MB` to replace it
above MB of worker RSS instead of the default bound; RSS is then the process's plus its worker's, and the result
counts the replacements.

Fresh random prompts (no prefix reuse), EOS ignored; requests go in waves of `--batch`. The slope is a least-squares
fit of RSS against requests served, over the samples after the first (the warm-up: caches, allocator arenas).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from compactlm.core.host import environment


def slope_kib_per_request(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of (requests, RSS MiB) pairs, in KiB per request."""
    xs, ys = [x for x, _ in samples], [y for _, y in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 1024 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _rss_mib(process) -> float:
    """The process's resident memory plus its children's (a recycled engine's worker)."""
    total = process.memory_info().rss
    for kid in process.children(recursive=True):
        try:
            total += kid.memory_info().rss
        except Exception:  # noqa: BLE001 - a worker being replaced just now
            pass
    return round(total / 2**20, 1)


def child(engine_dir: str, requests: int, every: int, batch: int, isl: int, osl: int, label: str = "") -> dict:
    import psutil

    from compactlm.engines import load_engine

    options = {}
    if "+recycle" in label:
        options["recycle"] = True
        above = label.partition("+recycle")[2].lstrip("@")
        if above:
            options["recycle_above_mb"] = int(above)
    process = psutil.Process()
    rng = random.Random(0)
    samples = []
    started = time.perf_counter()
    with load_engine(engine_dir, **options) as engine:
        vocab = engine.manifest.model.get("vocab_size") or 1000
        eos = set(engine.manifest.backend_info.get("eos_token_ids", ()))
        ids = [i for i in range(vocab) if i not in eos]
        done = 0
        while done < requests:
            prompts = [[rng.choice(ids) for _ in range(isl)] for _ in range(batch)]
            for completion in engine.generate(prompts, osl, ignore_eos=True):
                if len(completion.tokens) != osl:
                    raise RuntimeError(f"a request ended after {len(completion.tokens)} of {osl} tokens")
            done += batch
            if done % every < batch:
                gc.collect()
                samples.append((done, _rss_mib(process)))
                print(f"{engine_dir}: {done} requests, RSS {samples[-1][1]} MiB", file=sys.stderr, flush=True)
        manifest = engine.manifest
        recycles = getattr(engine, "recycles", None) if options else None
    return {
        "recycle": options or None,
        "recycles": recycles,
        "engine": engine_dir,
        "backend": manifest.backend,
        "precision": manifest.precision,
        "requests": done,
        "seconds": round(time.perf_counter() - started, 1),
        "rss_mib": samples,
        "slope_kib_per_request": round(slope_kib_per_request(samples[1:]), 2) if len(samples) > 2 else None,
        "growth_mib_after_warmup": round(samples[-1][1] - samples[0][1], 1) if samples else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", required=True, help="LABEL=ENGINE_DIR, one child process each.")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--isl", type=int, default=32)
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        label = args.engines[0].partition("=")[0]
        print(json.dumps(child(args.child, args.requests, args.every, args.batch, args.isl, args.osl, label)))
        return
    results = {}
    for item in args.engines:
        label, _, folder = item.partition("=")
        command = [sys.executable, "-m", "compactlm.bench.perf.engine_memory", "--engines", item, "--child", folder]
        command += ["--requests", str(args.requests), "--every", str(args.every), "--batch", str(args.batch)]
        command += ["--isl", str(args.isl), "--osl", str(args.osl)]
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode:
            raise SystemExit(f"{label}: the child failed:\n{run.stderr[-2000:]}")
        results[label] = json.loads(run.stdout.strip().splitlines()[-1])
        result = results[label]
        print(
            f"{label}: {result['requests']} requests in {result['seconds']} s, RSS {result['rss_mib'][0][1]} -> "
            f"{result['rss_mib'][-1][1]} MiB (max {max(r for _, r in result['rss_mib'])}), slope "
            f"{result['slope_kib_per_request']} KiB/request"
            + (f", worker replaced {result['recycles']} times" if result["recycles"] is not None else "")
        )
    report = {
        "what": f"engines, {args.requests} requests of {args.isl}/{args.osl} tokens in waves of "
        f"{args.batch}, RSS every {args.every}",
        "results": results,
        "environment": environment(),
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
