"""The OpenAI front's cost, side by side in one run: the same engine in-process, behind the FastAPI + uvicorn front
(`compactlm serve --no-triton`), and behind the front it replaced (the standard library's threading http.server,
`serve/openai_api.py` as of --baseline-ref, loaded from git so that the baseline is the real one, not a copy).

ISL/OSL 128/128, fresh random prompts, EOS ignored, closed-loop concurrency 1, 8 and 32; every round measures all
three at every concurrency, interleaved (each round in another order), so that drift on a shared machine hits all
alike. Reported: each point's median over the rounds, and the median of each round's ratio to the in-process point
measured beside it (paired, so that slow drift cancels). Both servers run in their own processes (their engines idle
while another target is measured); the load generator is `compactlm bench measure` in a third. Both fronts serve the
engine the way `compactlm serve` does by default, its pipeline in a worker process: OpenVINO GenAI's `step()` holds
the GIL for the whole step, so a front in the pipeline's own process (`--in-process-engine`, serve's `--no-recycle`)
can only run between steps. Each point records the CPU seconds the server and the load generator spent (on a machine
whose cores the engine fills, both are taken from it; for the in-process target the "client" is the engine too),
and, for the FastAPI front, the engine's own mean time to first token from its /metrics beside the client's: the
difference is what the front and the connection add to a first token.

    python -m compactlm.bench.perf.openai_front --engine ENGINE_DIR [--rounds 3] [--out docs/bench/openai_front.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BASELINE_REF = "39e522e"
"""The last commit whose OpenAI route was the http.server one."""


def serve_baseline(engine: Path, port: int, ref: str, recycle: bool) -> None:
    """Serve ENGINE with the OpenAI route of commit REF until SIGTERM (this process: the baseline server)."""
    from compactlm.engines.registry import load_engine
    from compactlm.serve.requests import GenerationService

    source = subprocess.run(
        ["git", "show", f"{ref}:serve/openai_api.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="baseline-front-")) / "baseline_openai_api.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_openai_api", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with load_engine(engine, recycle=recycle) as loaded:
        route = module.OpenAIRoute(GenerationService(loaded, engine.name), "127.0.0.1", port, engine.name)
        route.start()
        print(f"baseline front of {ref} on :{port}", flush=True)
        stop.wait()
        route.stop(2)


def _wait(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a server exited with {proc.returncode} before it was ready")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answered on :{port}")


def _cpu_s(proc) -> float:
    """User + system CPU seconds of a server process and its threads so far (0 for the in-process target)."""
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return times.user + times.system


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (the load generator runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _server_ttft(port: int) -> tuple[float, float]:
    """The FastAPI front's time-to-first-token histogram so far: (sum of seconds, count), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name.endswith("time_to_first_token_seconds"):
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total, count


def _median(values: list[float] | None) -> float | None:
    return None if not values else round(sorted(values)[len(values) // 2], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", default="4x", help="Measured requests per point (bench measure --requests).")
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated closed-loop concurrencies.")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument(
        "--in-process-engine",
        action="store_true",
        help="Run the pipeline in the servers' own processes (serve --no-recycle) instead of a worker process.",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench/openai_front.json"))
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.engine, args.serve_baseline, args.baseline_ref, recycle=not args.in_process_engine)
        return

    import pandas as pd

    from compactlm.bench.perf.serve_soak import free_ports

    concurrencies = [int(c) for c in args.concurrency.split(",")]

    from compactlm.core.host import host_info
    from compactlm.core.io import write_json
    from compactlm.engines.manifest import read_manifest

    bin_dir = Path(sys.executable).parent
    new_port, old_port = free_ports(2)
    table = args.out.with_suffix(".parquet")
    table.unlink(missing_ok=True)
    logs = [open(args.out.with_suffix(f".{n}.log"), "w") for n in ("fastapi", "baseline")]  # noqa: SIM115
    servers = [
        subprocess.Popen(
            [str(bin_dir / "compactlm"), "serve", str(args.engine), "--no-triton", "--openai-port", str(new_port)]
            + (["--no-recycle"] if args.in_process_engine else []),
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "compactlm.bench.perf.openai_front", "--engine", str(args.engine)]
            + ["--serve-baseline", str(old_port), "--baseline-ref", args.baseline_ref]
            + (["--in-process-engine"] if args.in_process_engine else []),
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        ),
    ]
    targets = {
        "in-process": str(args.engine),
        "fastapi": f"http://127.0.0.1:{new_port}",
        "http.server": f"http://127.0.0.1:{old_port}",
    }
    import psutil

    cpu = {"fastapi": psutil.Process(servers[0].pid), "http.server": psutil.Process(servers[1].pid)}
    spent: dict[tuple[str, int], list[float]] = {}
    client_spent: dict[tuple[str, int], list[float]] = {}
    server_ttft: dict[int, list[float]] = {}  # concurrency -> the FastAPI engine's mean TTFT (s) of each round
    measured: dict[tuple[int, int], dict[str, float]] = {}  # (round, concurrency) -> target -> req/s
    try:
        for port, proc in zip((new_port, old_port), servers, strict=True):
            _wait(port, proc)
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                names = list(targets)
                shift = round_ % len(names)  # each round starts with another target: no fixed order effect
                for name in names[shift:] + names[:shift]:
                    spec = targets[name]
                    command = [str(bin_dir / "compactlm"), "bench", "measure", spec, "--isl", "128", "--osl", "128"]
                    command += ["--concurrency", str(concurrency), "--requests", args.requests]
                    command += ["--warmup", str(max(4, concurrency))]  # one full batch: its shapes warm
                    command += ["--out", str(table), "--name", name, "--seed", str(round_)]
                    if spec.startswith("http"):
                        command += ["--tokenizer", str(args.engine / "tokenizer")]
                    print(f"round {round_ + 1}/{args.rounds}: {name} at concurrency {concurrency}", flush=True)
                    before, client_before = _cpu_s(cpu.get(name)), _children_cpu_s()
                    ttft_before = _server_ttft(new_port) if name == "fastapi" else None
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    last = pd.read_parquet(table, columns=["request_throughput"]).iloc[-1]
                    measured.setdefault((round_, concurrency), {})[name] = float(last["request_throughput"])
                    if ttft_before is not None:  # warm-up requests included: they are a few of the point's
                        (total, count), (total0, count0) = _server_ttft(new_port), ttft_before
                        server_ttft.setdefault(concurrency, []).append((total - total0) / max(count - count0, 1))
                    client_spent.setdefault((name, concurrency), []).append(_children_cpu_s() - client_before)
                    if name in cpu:
                        spent.setdefault((name, concurrency), []).append(_cpu_s(cpu[name]) - before)
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
        for proc in servers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()

    rows = pd.read_parquet(table)
    columns = ["request_throughput", "output_throughput", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p99", "errors"]
    points = rows.groupby(["target", "concurrency"])[columns].median().reset_index()
    spread = rows.groupby(["target", "concurrency"])["request_throughput"].agg(["min", "max"]).reset_index()
    points = points.merge(spread, on=["target", "concurrency"])
    summary = []
    for concurrency in concurrencies:
        at = points[points["concurrency"] == concurrency].set_index("target")
        base = at.loc["in-process", "request_throughput"]
        for name in targets:
            row = at.loc[name]
            paired = [  # each round's ratio to the in-process point measured beside it
                round(m[name] / m["in-process"], 3) for (_, c), m in sorted(measured.items()) if c == concurrency
            ]
            summary.append(
                {
                    "target": name,
                    "concurrency": concurrency,
                    "req_per_s": round(float(row["request_throughput"]), 4),
                    "req_per_s_range": [round(float(row["min"]), 4), round(float(row["max"]), 4)],
                    "out_tok_per_s": round(float(row["output_throughput"]), 1),
                    "ttft_ms_p50": round(float(row["ttft_ms_p50"]), 1),
                    "ttft_ms_p99": round(float(row["ttft_ms_p99"]), 1),
                    "ttft_ms_mean": round(float(row["ttft_ms_mean"]), 1),
                    "engine_ttft_ms_mean": (
                        _median([1e3 * t for t in server_ttft[concurrency]]) if name == "fastapi" else None
                    ),
                    "vs_in_process": round(float(row["request_throughput"] / base), 3),
                    "vs_in_process_by_round": paired,
                    "vs_in_process_paired_median": round(statistics.median(paired), 3),
                    "errors": int(row["errors"]),
                    "server_cpu_s_per_point": _median(spent.get((name, concurrency))),
                    "client_cpu_s_per_point": _median(client_spent.get((name, concurrency))),
                }
            )
    manifest = read_manifest(args.engine)
    write_json(
        args.out,
        {
            "what": "OpenAI front cost: in-process vs FastAPI+uvicorn vs the old http.server front, one run",
            "engine": str(args.engine),
            "engine_desc": manifest.describe(),
            "workload": {"isl": 128, "osl": 128, "prompts": "random", "ignore_eos": True, "requests": args.requests},
            "rounds": args.rounds,
            "served_in": "the server's own process" if args.in_process_engine else "a worker process (serve's default)",
            "baseline_ref": args.baseline_ref,
            "host": host_info(),
            "points": summary,
        },
    )
    for row in summary:
        print(
            f"c={row['concurrency']:>2} {row['target']:12s} {row['req_per_s']:.3f} req/s "
            f"({row['vs_in_process']:.3f}x in-process; per round {row['vs_in_process_by_round']}, median "
            f"{row['vs_in_process_paired_median']:.3f}x), TTFT p50 {row['ttft_ms_p50']:.0f} ms p99 "
            f"{row['ttft_ms_p99']:.0f} ms (mean {row['ttft_ms_mean']:.0f}, engine's {row['engine_ttft_ms_mean']}), "
            f"{row['errors']} errors, CPU s: server "
            f"{row['server_cpu_s_per_point']}, client {row['client_cpu_s_per_point']}"
        )
    print(f"wrote {args.out} and {table}")


if __name__ == "__main__":
    main()
