"""Soak test of `compactlm serve`: N concurrent streaming clients for a fixed time against a server in a child
process; every request checked (no error, exactly the asked number of tokens), the server's memory sampled.

By default half of the clients stream over Triton gRPC (tritonclient), half over the OpenAI route (SSE), each
sending its next request as soon as the last one ended; fresh random prompts (ISL tokens), OSL output tokens
(EOS ignored). A warm-up under the same load runs first (45 s, not counted). Memory: RSS of the server process
and of its whole tree (tritonserver and its Python-backend stubs), once a second; "stable" compares the median
of the first and the last 10 s of the measured load. The server is then stopped with SIGTERM and its exit
status and summary kept.

    python -m compactlm.bench.perf.serve_soak --engine ENGINE_DIR [--clients 32] [--duration 60] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from compactlm.bench.metrics import RequestRecord
from compactlm.bench.targets import open_target
from compactlm.bench.workload import WorkloadItem
from compactlm.core.host import host_info
from compactlm.engines.manifest import read_manifest


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_ready(http: int, openai: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    urls = [f"http://127.0.0.1:{http}/v2/models/compactlm/ready", f"http://127.0.0.1:{openai}/health"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if all(urllib.request.urlopen(u, timeout=2).status == 200 for u in urls):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not get ready")


def rss_mb(proc: psutil.Process) -> tuple[float, float]:
    """RSS of the process and of its whole tree, MiB."""
    own = proc.memory_info().rss
    tree = own
    for child in proc.children(recursive=True):
        try:
            tree += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return own / 2**20, tree / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--isl", type=int, default=64)
    parser.add_argument("--osl", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=45.0, help="Seconds of the same load first, not counted.")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/serve_soak.json"))
    parser.add_argument(
        "--fronts", default="triton-grpc,openai", help="Fronts the clients take turns on (comma-separated)."
    )
    args = parser.parse_args()

    manifest = read_manifest(args.engine)
    vocab = int(manifest.model["vocab_size"])
    http, grpc, metrics, openai = free_ports(4)
    command = [sys.executable, "-m", "compactlm", "serve", str(args.engine), "--http-port", str(http)]
    command += ["--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(openai)]
    log = open(args.out.with_suffix(".server.log"), "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(server.pid)
    rng = np.random.default_rng(0)
    counter = iter(range(10**9))
    lock = threading.Lock()

    def item() -> WorkloadItem:
        with lock:
            ids = tuple(int(t) for t in rng.integers(100, vocab - 100, size=args.isl))
            return WorkloadItem(next(counter), ids, args.osl)

    try:
        started = time.perf_counter()
        wait_ready(http, openai, server)
        startup_s = time.perf_counter() - started
        targets = {
            "triton-grpc": open_target(f"triton://127.0.0.1:{grpc}", vocab_size=vocab),
            "openai": open_target(f"http://127.0.0.1:{openai}", vocab_size=vocab),
        }
        names = args.fronts.split(",")
        fronts = [names[i % len(names)] for i in range(args.clients)]
        samples: list[tuple[float, float, float]] = []
        records: list[tuple[str, RequestRecord]] = []
        warm: list[tuple[str, RequestRecord]] = []
        stop = threading.Event()

        def client(front: str, until: float, into: list) -> None:
            while time.perf_counter() < until:
                record = targets[front].submit(item()).result(600)
                with lock:
                    into.append((front, record))

        def run_load(seconds: float, into: list) -> None:
            until = time.perf_counter() + seconds
            threads = [threading.Thread(target=client, args=(f, until, into)) for f in fronts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        # warm-up under the same load, not counted: the engine's KV-cache pool is touched page by page as its
        # blocks are first used, which reads as RSS growth until every block has been used once
        run_load(args.warmup, warm)
        load_start = time.perf_counter()

        def sampler() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter() - load_start, *rss_mb(proc)))
                stop.wait(1.0)

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        run_load(args.duration, records)
        load_s = time.perf_counter() - load_start
        time.sleep(2)
        stop.set()
        watcher.join()
        after = rss_mb(proc)
        for target in targets.values():
            target.close()
        children = proc.children(recursive=True)
        stop_start = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
        stop_s = time.perf_counter() - stop_start
        _, left = psutil.wait_procs(children, timeout=10)
        left = [f"{p.pid} {p.name()}" for p in left if p.is_running()]
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    summary = [line for line in args.out.with_suffix(".server.log").read_text().splitlines() if "stopped on" in line]

    failed = [(f, r.error) for f, r in records if not r.ok]
    loaded = [s for s in samples if s[0] <= args.duration]
    first = [s for s in loaded if s[0] < 10]
    last = [s for s in loaded if s[0] >= args.duration - 10]

    def median(rows, column):
        return statistics.median(r[column] for r in rows) if rows else None

    ttft = [r.ttft for _, r in records if r.ok and r.ttft is not None]

    def latency(front: str) -> dict:
        done = [r for f, r in records if f == front and r.ok and r.ttft is not None]
        if not done:
            return {}
        return {
            "requests": len(done),
            "ttft_ms_p50": round(1e3 * float(np.median([r.ttft for r in done])), 1),
            "e2e_ms_p50": round(1e3 * float(np.median([r.e2e for r in done])), 1),
            "e2e_ms_max": round(1e3 * max(r.e2e for r in done), 1),
        }

    result = {
        "what": f"{args.clients} concurrent streaming clients for {args.duration:.0f} s against `compactlm serve`",
        "engine": str(args.engine),
        "engine_desc": manifest.describe(),
        "workload": {"isl": args.isl, "osl": args.osl, "prompts": "fresh random tokens", "ignore_eos": True},
        "clients": {"triton-grpc": fronts.count("triton-grpc"), "openai": fronts.count("openai")},
        "startup_s": round(startup_s, 1),
        "warmup_s": args.warmup,
        "warmup_requests": len(warm),
        "warmup_failed": sum(not r.ok for _, r in warm),
        "warmup_failures": [(f, r.error) for f, r in warm if not r.ok][:10],
        "load_s": round(load_s, 1),
        "requests": len(records),
        "requests_by_front": {f: sum(1 for g, _ in records if g == f) for f in set(fronts)},
        "latency_by_front": {f: latency(f) for f in sorted(set(fronts))},
        "failed": len(failed),
        "failures": failed[:10],
        "output_tokens": sum(len(r.token_times) for _, r in records),
        "output_tokens_per_s": round(sum(len(r.token_times) for _, r in records) / load_s, 1),
        "ttft_ms_p50": round(1e3 * float(np.percentile(ttft, 50)), 1) if ttft else None,
        "ttft_ms_p99": round(1e3 * float(np.percentile(ttft, 99)), 1) if ttft else None,
        "rss_mb": {
            "server_first_10s_median": median(first, 1),
            "server_last_10s_median": median(last, 1),
            "tree_first_10s_median": median(first, 2),
            "tree_last_10s_median": median(last, 2),
            "server_max": max(s[1] for s in loaded),
            "tree_max": max(s[2] for s in loaded),
            "server_after_load": after[0],
            "tree_after_load": after[1],
        },
        "rss_samples": [[round(t, 1), round(a, 1), round(b, 1)] for t, a, b in samples],
        "shutdown": {
            "signal": "SIGTERM",
            "exit_code": exit_code,
            "seconds": round(stop_s, 1),
            "processes_left": left,
            "summary": summary[-1] if summary else None,
        },
        "host": host_info(),
        "note": "shared 2-core machine (other jobs ran beside it): throughput and latency are indicative only",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rss = result["rss_mb"]
    rss["server_growth_mb"] = round(rss["server_last_10s_median"] - rss["server_first_10s_median"], 1)
    rss["tree_growth_mb"] = round(rss["tree_last_10s_median"] - rss["tree_first_10s_median"], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_samples", "host")}, indent=2))
    if failed or exit_code != 0:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
