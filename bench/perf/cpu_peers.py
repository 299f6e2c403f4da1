"""The embedded cpu engine beside its CPU peers, in one interleaved run on this machine: transformers `generate`
(fp32), llama.cpp (`llama-batched-bench`, built here from the llama-cpp-python source package, the checkpoint
converted with llama.cpp's own tools), OpenVINO GenAI's pipeline on the engine's IR (bare: the wrapper's baseline)
and on optimum-intel's stock export, and compactlm's engine; each compactlm precision paired with its nearest
llama.cpp format (fp32-F32, bf16-BF16, int8-Q8_0, int4-Q4_0).

Workload, the same for every engine: ISL/OSL 128/128, `batch` requests of fresh random prompt ids (own prompts, no
shared prefix), all submitted at once, exactly OSL output tokens each (EOS ignored), same threads; output tok/s =
batch x OSL / wall time, prefill included; TTFT = first token of a request after submission (llama.cpp decodes a
batch's prompts in one pass: its TTFT is that pass). Each repeat runs every engine at every batch, engines
interleaved; medians of the repeats are reported. A calibrating f32 and bf16 GEMM (bench.perf.roofline) in the same
run turns every cell into a share of this machine's arithmetic roofline.

    python -m compactlm.bench.perf.cpu_peers [--build runs/engines] [--repeats 2] [--out FILE.json]

Targets (issue 22): compactlm's best >= 1.5x llama.cpp's best at batch 1 and >= 4x at batch 32; every precision
>= its paired format at every batch; fp32 at batch 32 >= 85% of the f32 roofline; the wrapper within 3% of bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from compactlm.bench.perf import llama_cpp, roofline
from compactlm.bench.perf.cpu_engine import bare_run, build_all, fresh_prompts, transformers_run
from compactlm.core.host import cpu_bf16, environment

PAIRS = "fp32=F32,bf16=BF16,int8=Q8_0,int4=Q4_0"


def engine_run(engine, prompts: np.ndarray, osl: int) -> tuple[int, float]:
    """compactlm's engine: output tokens and the median TTFT of the batch's requests."""
    completions = engine.generate(prompts.tolist(), max_new_tokens=osl, ignore_eos=True)
    assert all(c.finish_reason == "length" and not c.error for c in completions), completions[0]
    return sum(len(c.tokens) for c in completions), statistics.median(c.ttft for c in completions)


def llama_run(runner: llama_cpp.Runner, prompts: np.ndarray, osl: int) -> tuple[int, float, float]:
    """llama.cpp's own timing (its random prompts are the same shape as ours); wall includes the pass only."""
    done = runner.run(len(prompts), prompts.shape[1], osl)
    return done.output_tokens, done.prefill_seconds, done.seconds


def parse_pairs(text: str) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = [fmt for fmt in pairs.values() if fmt not in llama_cpp.FORMATS]
    if unknown:
        raise SystemExit(f"unknown GGUF format(s) {unknown}; known: {', '.join(llama_cpp.FORMATS)}")
    return pairs


def peak_for(run: str, peaks: dict) -> dict:
    """The roofline a run is read against: bf16 for compactlm's bf16/int8/int4 (their GEMMs run in bf16: int8/int4
    weights are decompressed to bf16 on CPUs with bf16 units, see bench.perf.cpu_step) and llama.cpp's BF16, where the
    CPU has bf16; f32 for the rest (fp32, transformers, and llama.cpp's F32 and block-quantized formats, whose integer
    dot products have no GEMM calibrated here)."""
    bf16 = run.startswith(("bf16 ", "int8 ", "int4 ")) or run == "llama.cpp BF16"
    return peaks["bf16"] if bf16 and "bf16" in peaks else peaks["f32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("runs/engines"), help="where our cpu engines are built")
    parser.add_argument("--checkpoint", default="smollm2-135m")
    parser.add_argument("--pairs", default=PAIRS, help="compactlm precision=GGUF format, comma-separated")
    parser.add_argument("--bare", default="fp32,bf16,int8,int4", help="precisions also run on the bare pipeline")
    parser.add_argument("--stock", default="int4", help="precisions of the stock export, bare ('' for none)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.repeats < 1 or args.osl < 2 or args.isl < 1:
        raise SystemExit("--repeats >= 1, --osl >= 2 and --isl >= 1")
    if why := llama_cpp.available():
        raise SystemExit(why)

    import torch

    from compactlm.compress.checkpoint import inspect_checkpoint, load_model
    from compactlm.engines import load_engine

    torch.set_num_threads(args.threads)
    pairs = parse_pairs(args.pairs)
    batches = [int(b) for b in args.batches.split(",")]
    checkpoint = inspect_checkpoint(args.checkpoint)

    runners = {}
    for fmt in pairs.values():
        path = llama_cpp.gguf(checkpoint.path, checkpoint.sha256(), fmt)
        runners[fmt] = llama_cpp.Runner(path, args.threads).probe()
    stock = [p for p in args.stock.split(",") if p]
    built = build_all(args.build, list(pairs), stock, args.checkpoint, max(batches), args.isl, args.osl)
    engines = {label: load_engine(path) for label, _, path in (item.partition("=") for item in built)}
    model = load_model(args.checkpoint).eval()
    vocab = model.config.vocab_size

    peaks = {"f32": roofline.gemm_flops_per_s("f32", args.threads)}
    if cpu_bf16():
        peaks["bf16"] = roofline.gemm_flops_per_s("bf16", args.threads)
    print("roofline: " + ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    runs = {"transformers fp32": lambda p: (transformers_run(model, p, args.osl), None)}
    for precision, fmt in pairs.items():
        runs[f"{precision} compactlm"] = lambda p, e=engines[precision]: engine_run(e, p, args.osl)
        if precision in args.bare.split(","):
            runs[f"{precision} bare pipeline"] = lambda p, e=engines[precision]: (bare_run(e, p, args.osl), None)
        runs[f"llama.cpp {fmt}"] = lambda p, r=runners[fmt]: llama_run(r, p, args.osl)
    for precision in stock:
        stocked = engines[f"{precision}-stock"]
        runs[f"{precision} stock pipeline"] = lambda p, e=stocked: (bare_run(e, p, args.osl), None)

    rng = np.random.default_rng(0)
    for fn in runs.values():  # warm-up: compile, allocate caches, page the model files in
        fn(fresh_prompts(rng, 2, args.isl, vocab))

    cells: dict[tuple[str, int], dict[str, list]] = {}
    for repeat in range(args.repeats):
        for name, fn in runs.items():
            for batch in batches:
                prompts = fresh_prompts(rng, batch, args.isl, vocab)
                start = time.perf_counter()
                tokens, ttft, *own = fn(prompts)
                elapsed = own[0] if own else time.perf_counter() - start
                if tokens != batch * args.osl:
                    raise SystemExit(f"{name}: {tokens} output tokens, expected {batch * args.osl}")
                cell = cells.setdefault((name, batch), {"tok_s": [], "ttft": []})
                cell["tok_s"].append(tokens / elapsed)
                cell["ttft"].append(ttft)
                note = f"  TTFT {ttft * 1e3:7.1f} ms" if ttft is not None else ""
                line = f"repeat {repeat + 1} batch {batch:>3} {name:<24} {tokens / elapsed:8.1f} tok/s{note}"
                print(line, flush=True)

    flops = {b: roofline.run_flops(model.config, b, args.isl, args.osl) for b in batches}
    rows = []
    for (name, batch), cell in cells.items():
        rate = statistics.median(cell["tok_s"])
        ttfts = [t for t in cell["ttft"] if t is not None]
        seconds = batch * args.osl / rate
        peak = peak_for(name, peaks)
        rows.append(
            {
                "run": name,
                "batch": batch,
                "tok_s": cell["tok_s"],
                "median_tok_s": rate,
                "ttft_s": statistics.median(ttfts) if ttfts else None,
                "roofline_share": flops[batch] / seconds / (peak["gflops"] * 1e9),
                "roofline": peak["dtype"],
            }
        )
    report(rows, pairs, batches, args)
    if args.out:
        doc = {
            "isl": args.isl,
            "osl": args.osl,
            "repeats": args.repeats,
            "threads": args.threads,
            "environment": environment(),
            "roofline": peaks,
            "run_tflop": {str(b): flops[b] / 1e12 for b in batches},
            "llama_cpp_version": llama_cpp.VERSION,
            "llama_cpp": {
                fmt: {"gguf": str(r.model), "repack": r.repack, "kernels": r.kernels} for fmt, r in runners.items()
            },
            "engines": {label: e.manifest.to_dict() for label, e in engines.items()},
            "cells": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.out}")
    for engine in engines.values():
        engine.close()


def per_batch(batches: list[int], values: list[float], fmt: str) -> str:
    return ", ".join(f"batch {b} {fmt.format(v)}" for b, v in zip(batches, values, strict=True))


def report(rows: list[dict], pairs: dict[str, str], batches: list[int], args) -> None:
    at = {(r["run"], r["batch"]): r for r in rows}
    names = list(dict.fromkeys(r["run"] for r in rows))
    print(f"\noutput tok/s, ISL/OSL {args.isl}/{args.osl}, {args.threads} threads, median of {args.repeats}")
    print(f"(TTFT ms; share of the {'/'.join(sorted({r['roofline'] for r in rows}))} GEMM roofline)")
    print(f"{'run':<26}" + "".join(f"{'batch ' + str(b):>28}" for b in batches))
    for name in names:
        cells = []
        for b in batches:
            r = at[(name, b)]
            ttft = f"{r['ttft_s'] * 1e3:6.0f}" if r["ttft_s"] is not None else "     -"
            cells.append(f"{r['median_tok_s']:8.1f} {ttft} {r['roofline_share'] * 100:5.1f}%")
        print(f"{name:<26}" + "".join(f"{c:>28}" for c in cells))
    rate = {key: r["median_tok_s"] for key, r in at.items()}
    print("\neach precision / its llama.cpp format:")
    for precision, fmt in pairs.items():
        ratios = [rate[(f"{precision} compactlm", b)] / rate[(f"llama.cpp {fmt}", b)] for b in batches]
        print(f"  {precision} / {fmt}: {per_batch(batches, ratios, '{:.2f}x')}")
    ours = [f"{p} compactlm" for p in pairs]
    peers = [f"llama.cpp {f}" for f in pairs.values()]
    best = [max(rate[(n, b)] for n in ours) / max(rate[(n, b)] for n in peers) for b in batches]
    print(f"best compactlm / best llama.cpp: {per_batch(batches, best, '{:.2f}x')}")
    print("wrapper cost vs bare pipeline (positive = slower):")
    for precision in pairs:
        if (f"{precision} bare pipeline", batches[0]) in rate:
            costs = [1 - rate[(f"{precision} compactlm", b)] / rate[(f"{precision} bare pipeline", b)] for b in batches]
            print(f"  {precision}: {per_batch(batches, [c * 100 for c in costs], '{:+.1f}%')}")


if __name__ == "__main__":
    main()
