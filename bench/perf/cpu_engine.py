"""The `cpu` engine's speed, side by side in one run: transformers `generate` (the baseline), the bare OpenVINO GenAI
pipeline the engine wraps (its own `generate`, same compiled model and scheduler), compactlm's engine, and the stock
export (optimum-intel's IR as is, no q/k/v fusion) on the bare pipeline: what OpenVINO GenAI alone would give.

Workload: ISL/OSL 128/128 (prefill included), exactly 128 output tokens per request (ignore EOS), fresh random
prompts for every run (so that no prefix cache could skip prefill; it is off anyway), batch 1, 8 and 32; all
requests submitted at once. Output tokens/s = requests x 128 / wall time from submission to the last token.
Runs are interleaved (baseline, bare, wrapper, baseline, ...) and the median of the repeats is reported.

Targets (issue: engine builder): fp32 >= 2.5x transformers at batch 1 and 32; int4 >= 7x at batch 1 and 4x at
batch 32; the wrapper within 3% of the bare engine.

    python -m compactlm.bench.perf.cpu_engine --build runs/engines [--repeats 3] [--out results.json]
    python -m compactlm.bench.perf.cpu_engine --engines fp32=ENGINE_DIR int4=ENGINE_DIR ...

--build DIR builds (once) the SmolLM2-135M cpu engines of every precision into DIR, and the stock exports of
--stock's precisions (labels PRECISION-stock, measured bare only), and measures them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def fresh_prompts(rng: np.random.Generator, batch: int, isl: int, vocab: int) -> np.ndarray:
    return rng.integers(100, vocab - 100, size=(batch, isl), dtype=np.int64)


def transformers_run(model, prompts: np.ndarray, osl: int) -> int:
    import torch

    ids = torch.from_numpy(prompts)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=osl,
            min_new_tokens=osl,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return int((out.shape[1] - ids.shape[1]) * ids.shape[0])


def bare_run(engine, prompts: np.ndarray, osl: int) -> int:
    """OpenVINO GenAI's own batch API on the engine's pipeline (the engine's worker is idle meanwhile)."""
    from compactlm.engines.backends.openvino.worker import import_genai

    ov, genai = import_genai()
    config = genai.GenerationConfig()
    config.max_new_tokens, config.ignore_eos, config.do_sample = osl, True, False
    results = engine.pipeline.generate([ov.Tensor(p[None]) for p in prompts], [config] * len(prompts))
    return sum(len(r.m_generation_ids[0]) for r in results)


def wrapper_run(engine, prompts: np.ndarray, osl: int) -> int:
    completions = engine.generate(prompts.tolist(), max_new_tokens=osl, ignore_eos=True)
    assert all(c.finish_reason == "length" and not c.error for c in completions), completions[0]
    return sum(len(c.tokens) for c in completions)


def ensure_engine(checkpoint: str | Path, out: Path, precision: str, limits, stock: bool = False) -> Path:
    """The cpu engine at `out` (`stock`: the export as is, no q/k/v fusion), built first if it is not there or was
    built otherwise: benchmarks reuse their engines between runs."""
    from compactlm.engines import BuildConfig, build_engine, read_manifest
    from compactlm.engines.backends.openvino.engine import fuses_qkv

    fuse_qkv = False if stock else None
    stale = False
    if (out / "engine.json").is_file():
        built = read_manifest(out)
        fused = bool(built.backend_info.get("fused_qkv_layers"))
        stale = (built.precision, built.limits, fused) != (precision, limits, fuses_qkv(precision, fuse_qkv))
        if not stale:
            return out
    print(f"{'rebuilding (built with other settings)' if stale else 'building'} {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = BuildConfig(backend="cpu", precision=precision, limits=limits, fuse_qkv=fuse_qkv)
    build_engine(checkpoint, out, config, overwrite=stale)
    return out


def build_all(
    folder: Path, precisions: list[str], stock: list[str], checkpoint: str, batch: int, isl: int, osl: int
) -> list[str]:
    from compactlm.engines import Limits

    limits = Limits(max_batch_size=batch, max_input_len=isl, max_seq_len=isl + osl, max_num_tokens=2048)
    built = [
        f"{precision}={ensure_engine(checkpoint, folder / f'{checkpoint}-cpu-{precision}', precision, limits)}"
        for precision in precisions
    ]
    for precision in stock:
        out = ensure_engine(checkpoint, folder / f"{checkpoint}-cpu-{precision}-stock", precision, limits, stock=True)
        built.append(f"{precision}-stock={out}")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=[], help="LABEL=ENGINE_DIR of cpu engines")
    parser.add_argument("--build", type=Path, help="build missing SmolLM2 cpu engines (fp32, bf16, int8, int4) here")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4", help="with --build: which to measure")
    parser.add_argument("--stock", default="int8,int4", help="with --build: stock exports to measure ('' for none)")
    parser.add_argument("--baseline", default="smollm2-135m", help="checkpoint for transformers generate (fp32)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from compactlm.compress.checkpoint import load_model
    from compactlm.engines import load_engine

    batches = [int(b) for b in args.batches.split(",")]
    if args.build:
        stock = [p for p in args.stock.split(",") if p]
        args.engines += build_all(
            args.build, args.precisions.split(","), stock, args.baseline, max(batches), args.isl, args.osl
        )
    if not args.engines:
        raise SystemExit("give --engines LABEL=DIR ... or --build DIR")
    engines = {}
    for item in args.engines:
        label, _, path = item.partition("=")
        engines[label] = load_engine(path)
    model = load_model(args.baseline).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}; engines: " + ", ".join(e.name for e in engines.values()))

    runs = {"transformers": lambda p: transformers_run(model, p, args.osl)}
    wrapped = [label for label in engines if not label.endswith("-stock")]
    for label, engine in engines.items():
        runs[f"{label} bare"] = lambda p, e=engine: bare_run(e, p, args.osl)
        if label in wrapped:
            runs[f"{label} compactlm"] = lambda p, e=engine: wrapper_run(e, p, args.osl)

    for fn in runs.values():  # warm-up: compile, allocate caches
        fn(fresh_prompts(rng, 2, args.isl, vocab))

    rates: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for batch in batches:
            for name, fn in runs.items():
                prompts = fresh_prompts(rng, batch, args.isl, vocab)
                start = time.perf_counter()
                tokens = fn(prompts)
                elapsed = time.perf_counter() - start
                if tokens != batch * args.osl:
                    raise SystemExit(f"{name}: {tokens} output tokens, expected {batch * args.osl}")
                rates.setdefault((name, batch), []).append(tokens / elapsed)
                print(f"repeat {repeat + 1} batch {batch:>3} {name:<22} {tokens / elapsed:8.1f} tok/s", flush=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\noutput tokens/s, ISL/OSL {args.isl}/{args.osl}, median of {args.repeats} (x = vs transformers)")
    print(f"{'run':<24}" + "".join(f"{'batch ' + str(b):>20}" for b in batches))
    for name in runs:
        cells = []
        for b in batches:
            rate, base = median[(name, b)], median[("transformers", b)]
            cells.append(f"{rate:9.1f} ({rate / base:4.2f}x)")
        print(f"{name:<24}" + "".join(f"{c:>20}" for c in cells))
    print("\nwrapper cost vs bare engine (positive = slower):")
    for label in wrapped:
        costs = [1 - median[(f"{label} compactlm", b)] / median[(f"{label} bare", b)] for b in batches]
        print(f"  {label}: " + ", ".join(f"batch {b} {c * 100:+.1f}%" for b, c in zip(batches, costs, strict=True)))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "isl": args.isl,
                    "osl": args.osl,
                    "repeats": args.repeats,
                    "engines": {label: e.manifest.to_dict() for label, e in engines.items()},
                    "tokens_per_s": [
                        {"run": name, "batch": b, "values": rates[(name, b)], "median": median[(name, b)]}
                        for name in runs
                        for b in batches
                    ],
                },
                indent=2,
            )
        )
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
