"""Where a batch-1 decode step of the cpu engine goes: the engine's step (OpenVINO GenAI's continuous-batching
pipeline with paged attention, scheduler and sampler) against the same IR compiled by plain OpenVINO and run as a
stateful model (no scheduler, no paging, no sampler: argmax on the host), against the time this machine needs just
to read the weights once (the IR's weight bytes over a measured memory read bandwidth), in one run; then the plain
model's step by OpenVINO op and kernel (its per-op counters).

    python -m compactlm.bench.perf.cpu_step ENGINE_DIR [--isl 128] [--steps 64] [--repeats 5] [--out FILE.json]

Every figure is a median over `repeats` runs of `steps` decode steps after an ISL-token prefill of random ids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compactlm.core.host import environment


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of summing a large array with every thread torch uses (reads memory once, as a batch-1 step reads
    its weights)."""
    import torch

    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / min(times)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def pipeline_step_ms(engine_dir: str, prompt: list[int], steps: int) -> float:
    from compactlm.engines import load_engine

    with load_engine(engine_dir, draft_tokens=0) as engine:  # the model alone, if it has a draft
        engine.generate([prompt], 4, ignore_eos=True)
        done = engine.generate([prompt], steps + 1, ignore_eos=True)[0]
    gaps = done.itl  # one token a step at batch 1: the gaps are the decode steps
    return statistics.median(gaps) * 1e3


def stateful_step_ms(engine_dir: str, prompt: list[int], steps: int, profile: dict | None = None) -> float:
    """Median decode step of the IR on plain OpenVINO; `profile` (a dict) gets ms per step by (op, kernel)."""
    import numpy as np
    import openvino as ov

    from compactlm.engines.manifest import read_manifest

    properties = read_manifest(engine_dir).backend_info.get("properties", {})
    hints = {k: v for k, v in properties.items() if k == "INFERENCE_PRECISION_HINT"}
    hints["KV_CACHE_PRECISION"] = properties.get("KV_CACHE_PRECISION", "f32")
    if profile is not None:
        hints["PERF_COUNT"] = True
    model = ov.Core().compile_model(str(Path(engine_dir) / "model" / "openvino_model.xml"), "CPU", hints)
    request = model.create_infer_request()

    def feed(ids: list[int], start: int) -> int:
        n = len(ids)
        out = request.infer(
            {
                "input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, start + n), dtype=np.int64),
                "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
                "beam_idx": np.zeros(1, dtype=np.int32),
            }
        )
        return int(np.argmax(out[model.output(0)][0, -1]))

    request.reset_state()
    token = feed(prompt, 0)
    times = []
    for i in range(steps):
        begin = time.perf_counter()
        token = feed([token], len(prompt) + i)
        times.append(time.perf_counter() - begin)
        for node in request.get_profiling_info() if profile is not None else ():
            key = f"{node.node_type} ({node.exec_type})"
            profile[key] = profile.get(key, 0.0) + node.real_time.total_seconds() * 1e3 / steps
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import numpy as np

    from compactlm.engines.manifest import read_manifest

    manifest = read_manifest(args.engine)
    vocab = manifest.model.get("vocab_size") or 1000
    prompt = np.random.default_rng(0).integers(0, vocab, args.isl).tolist()
    weight_bytes = (Path(args.engine) / "model" / "openvino_model.bin").stat().st_size
    runs: dict[str, list[float]] = {"pipeline": [], "stateful": [], "bandwidth": []}
    for repeat in range(args.repeats):  # interleaved, so that drift hits each alike
        runs["pipeline"].append(pipeline_step_ms(args.engine, prompt, args.steps))
        runs["stateful"].append(stateful_step_ms(args.engine, prompt, args.steps))
        runs["bandwidth"].append(read_bandwidth())
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()), flush=True)
    profile: dict[str, float] = {}
    stateful_step_ms(args.engine, prompt, args.steps, profile)  # once more, with OpenVINO's per-op counters on
    ops = sorted(profile.items(), key=lambda kv: -kv[1])
    pipeline, stateful = statistics.median(runs["pipeline"]), statistics.median(runs["stateful"])
    bandwidth = statistics.median(runs["bandwidth"])
    weights_ms = weight_bytes / bandwidth * 1e3
    print(f"\n{manifest.describe()}, batch 1, decode after {args.isl} tokens, median of {args.repeats}")
    print(f"  engine step (OpenVINO GenAI pipeline)   {pipeline:7.2f} ms")
    print(f"  same IR, plain OpenVINO, stateful       {stateful:7.2f} ms  ({stateful / pipeline:.0%} of the step)")
    print(
        f"  reading the weights once                {weights_ms:7.2f} ms  ({weight_bytes / 1e6:.0f} MB at "
        f"{bandwidth / 1e9:.1f} GB/s, {torch_threads()} threads; {weights_ms / pipeline:.0%} of the step)"
    )
    busy = sum(profile.values())
    print(f"  where plain OpenVINO's step goes (per-op counters, {busy:.2f} ms of op time a step):")
    for name, ms in ops[:6]:
        print(f"    {ms / busy:6.1%}  {name}")
    if args.out:
        report = {
            "engine": args.engine,
            "describe": manifest.describe(),
            "isl": args.isl,
            "steps": args.steps,
            "repeats": args.repeats,
            "pipeline_step_ms": runs["pipeline"],
            "stateful_step_ms": runs["stateful"],
            "read_bandwidth_bytes_per_s": runs["bandwidth"],
            "weight_bytes": weight_bytes,
            "ops_ms_per_step": dict(ops),
            "medians": {"pipeline_ms": pipeline, "stateful_ms": stateful, "weights_ms": weights_ms},
            "environment": environment(),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
