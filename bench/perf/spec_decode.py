"""Speculative decoding on the cpu engine: output tokens/s of an engine alone and with a draft (the one built into
its folder with `engines build --draft`, and/or other cpu engine folders given with --drafts), at each batch size
and each number of draft tokens per step, interleaved in one process; the acceptance rate, the greedy tokens'
agreement with the engine alone, and each --drafts engine's own speed, from which the best speed-up any acceptance
could give follows: with a draft step costing c of the model's, k tokens proposed and all accepted, a step of
k draft steps and one check yields k + 1 tokens, so the speed-up is at most (k + 1) / (k c + 1) < 1 / c.

    python -m compactlm.bench.perf.spec_decode ENGINE [--drafts DRAFT_ENGINE ...] [--tokens 2,3,4] \\
        [--batches 1,8] [--isl 128] [--osl 128] [--repeats 3] [--data python-docs] [--out FILE.json]

Prompts are held-out rows of a corpus (text a draft can predict, unlike random ids), EOS ignored. Acceptance is read
from the token times (tokens read after one step share a time): a step after the prefill that yields n tokens
accepted n - 1 of the k proposed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compactlm.bench.speculative import acceptance, speedup_bound
from compactlm.core.host import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", help="a cpu engine folder (with or without a built-in draft)")
    parser.add_argument("--drafts", nargs="*", default=[], help="cpu engine folders to try as drafts")
    parser.add_argument("--tokens", default="2,3,4", help="draft tokens per step to try")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="python-docs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from compactlm.compress.data import load_sequences
    from compactlm.engines import load_engine
    from compactlm.engines.manifest import read_manifest

    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.tokens.split(",")]
    built_in = bool(read_manifest(args.engine).backend_info.get("draft"))
    engines = {"alone": load_engine(args.engine, draft_tokens=0 if built_in else None)}
    for k in ks:
        if built_in:
            engines[f"built-in draft, k={k}"] = load_engine(args.engine, draft_tokens=k)
        for draft in args.drafts:
            engines[f"{Path(draft).name}, k={k}"] = load_engine(args.engine, draft=draft, draft_tokens=k)
    for draft in args.drafts:
        engines[f"{Path(draft).name} alone"] = load_engine(draft)
    tokenizer = engines["alone"].tokenizer
    rows = load_sequences(args.data, tokenizer, num_sequences=max(batches), seq_len=args.isl, split="heldout")
    prompts = rows.tolist()

    tokens: dict[tuple[str, int], list[list[int]]] = {}
    accept: dict[tuple[str, int], float] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    for engine in engines.values():  # warm-up
        engine.generate(prompts[:1], 8, ignore_eos=True)
    for repeat in range(args.repeats):
        for batch in batches:
            for name, engine in engines.items():
                start = time.perf_counter()
                done = engine.generate(prompts[:batch], args.osl, ignore_eos=True)
                elapsed = time.perf_counter() - start
                if any(c.error or len(c.tokens) != args.osl for c in done):
                    raise SystemExit(f"{name}: a request did not produce its tokens")
                rates.setdefault((name, batch), []).append(batch * args.osl / elapsed)
                tokens[(name, batch)] = [c.tokens for c in done]
                draft = getattr(engine, "draft", None)
                if draft is not None:
                    accept[(name, batch)] = acceptance(done, draft.tokens)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    table = []
    for batch in batches:
        base = statistics.median(rates[("alone", batch)])
        for name in engines:
            rate = statistics.median(rates[(name, batch)])
            same = sum(a == b for a, b in zip(tokens[(name, batch)], tokens[("alone", batch)], strict=True))
            table.append(
                {
                    "config": name,
                    "batch": batch,
                    "tokens_per_s": round(rate, 1),
                    "values": [round(v, 1) for v in rates[(name, batch)]],
                    "speedup": round(rate / base, 3),
                    "acceptance": round(accept[(name, batch)], 3) if (name, batch) in accept else None,
                    "same_tokens_as_alone": f"{same}/{batch}" if " alone" not in name else None,
                }
            )
    print(f"\noutput tokens/s, ISL/OSL {args.isl}/{args.osl}, {args.data} held-out prompts, median of {args.repeats}")
    print(f"{'config':<34}{'batch':>6}{'tok/s':>9}{'x alone':>9}{'accepted':>10}{'same tokens':>13}")
    for row in table:
        acc = f"{row['acceptance']:.0%}" if row["acceptance"] is not None else "-"
        print(
            f"{row['config']:<34}{row['batch']:>6}{row['tokens_per_s']:>9.1f}{row['speedup']:>9.2f}{acc:>10}"
            f"{row['same_tokens_as_alone'] or '-':>13}"
        )
    bounds = {}
    for draft in args.drafts:
        name = Path(draft).name
        c = statistics.median(rates[("alone", 1)]) / statistics.median(rates[(f"{name} alone", 1)])
        bounds[name] = {"step_cost_ratio": round(c, 3), **{f"k={k}": round(speedup_bound(c, k), 3) for k in ks}}
        print(
            f"{name}: a draft step costs {c:.2f} of the model's at batch 1; best speed-up with every token accepted: "
            + ", ".join(f"k={k} {speedup_bound(c, k):.2f}x" for k in ks)
        )
    if args.out:
        report = {
            "engine": args.engine,
            "drafts": args.drafts,
            "isl": args.isl,
            "osl": args.osl,
            "repeats": args.repeats,
            "data": args.data,
            "results": table,
            "bounds_at_batch_1": bounds,
            "environment": environment(),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
