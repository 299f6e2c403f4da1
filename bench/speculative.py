"""Speculative decoding, measured: how much of a draft's proposals an engine keeps, and what that buys in output
tokens/s, the engine alone beside the engine with a draft, interleaved in one process.

Acceptance is read from the token times (tokens read after one step share a time): a decode step that yields n
tokens kept n - 1 of the k the draft proposed; the first token comes from the prefill. The speed-up any acceptance
can give is bounded by the draft's cost: with a draft step costing c of the model's, k proposed and all kept, a
step of k draft passes and one check yields k + 1 tokens, (k + 1) / (k c + 1) < 1 / c.

Used by the job's draft stage (compactlm/job/draft.py) and bench/perf/spec_decode.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from compactlm.core.errors import CompactLMError


def acceptance(completions, k: int) -> float:
    """Share of the proposed draft tokens the model kept, over the decode steps of `completions`."""
    accepted = steps = 0
    for c in completions:
        decode_steps = len(set(c.token_times)) - 1
        accepted += len(c.tokens) - 1 - decode_steps
        steps += decode_steps
    return accepted / (steps * k) if steps else 0.0


def speedup_bound(cost: float, k: int) -> float:
    """The most a draft whose step costs `cost` of the model's can give at `k` tokens a step (all kept)."""
    return (k + 1) / (k * cost + 1)


def _run(engine, prompts: Sequence[Sequence[int]], osl: int, what: str):
    start = time.perf_counter()
    done = engine.generate(prompts, osl, ignore_eos=True)
    elapsed = time.perf_counter() - start
    bad = [c for c in done if c.error or len(c.tokens) != osl]
    if bad:
        raise CompactLMError(f"{what}: a request ended with {len(bad[0].tokens)} of {osl} tokens ({bad[0].error})")
    return done, len(prompts) * osl / elapsed


def acceptance_table(
    model: str | Path, drafts: dict[str, str | Path], tokens: Sequence[int], prompts: Sequence[Sequence[int]], osl: int
) -> pd.DataFrame:
    """One row per (draft, k): the share of its proposals the model kept and the tokens a step that makes, generating
    `osl` tokens (EOS ignored) for all `prompts` at once with each cpu engine folder in `drafts` as the draft."""
    from compactlm.engines import load_engine

    rows = []
    for name, draft in drafts.items():
        for k in tokens:
            with load_engine(model, draft=draft, draft_tokens=k) as engine:
                done, rate = _run(engine, prompts, osl, f"{name} as draft, k={k}")
            share = acceptance(done, k)
            row = {"draft": name, "tokens": k, "acceptance": share, "tokens_per_step": 1 + share * k}
            rows.append({**row, "tokens_per_s": rate})
    return pd.DataFrame(rows)


def choose_draft(table: pd.DataFrame) -> str:
    """The draft the model agrees with most: the highest acceptance, averaged over the k tried."""
    if table.empty:
        raise CompactLMError("no draft was measured")
    return str(table.groupby("draft", sort=False)["acceptance"].mean().idxmax())


ALONE = "alone"
DRAFT_ALONE = "draft alone"


def speed_table(
    model: str | Path,
    draft: str | Path,
    tokens: Sequence[int],
    batch_sizes: Sequence[int],
    prompts: Sequence[Sequence[int]],
    osl: int,
    repeats: int,
) -> pd.DataFrame:
    """Output tokens/s of `model` alone, with `draft` at each k, and of the draft alone (its step cost, which bounds
    the speed-up), at each batch size (the first prompts), every configuration once per repeat, interleaved. One row
    per configuration and batch size: the median of the repeats, the speed-up over the model alone, the acceptance,
    and how many requests got the model's own greedy tokens."""
    from compactlm.engines import load_engine

    if max(batch_sizes) > len(prompts):
        raise CompactLMError(f"batch size {max(batch_sizes)} needs as many prompts; {len(prompts)} given")
    engines: dict[str, tuple[int, object]] = {}
    try:
        engines[ALONE] = (0, load_engine(model, draft_tokens=None))
        for k in tokens:
            engines[f"k={k}"] = (k, load_engine(model, draft=draft, draft_tokens=k))
        engines[DRAFT_ALONE] = (0, load_engine(draft))
        for _, engine in engines.values():  # warm-up: the first requests compile and allocate
            engine.generate(prompts[:1], 8, ignore_eos=True)
        rates: dict[tuple[str, int], list[float]] = {}
        outputs: dict[tuple[str, int], list] = {}
        for _ in range(repeats):
            for batch in batch_sizes:
                for name, (_, engine) in engines.items():
                    done, rate = _run(engine, prompts[:batch], osl, f"{name}, batch {batch}")
                    rates.setdefault((name, batch), []).append(rate)
                    outputs[(name, batch)] = done
    finally:
        for _, engine in engines.values():
            engine.close()
    rows = []
    for batch in batch_sizes:
        alone = statistics.median(rates[(ALONE, batch)])
        own = [c.tokens for c in outputs[(ALONE, batch)]]
        for name, (k, _) in engines.items():
            rate = statistics.median(rates[(name, batch)])
            done = outputs[(name, batch)]
            rows.append(
                {
                    "config": name,
                    "tokens": k,
                    "batch_size": batch,
                    "tokens_per_s": rate,
                    "speedup": rate / alone,
                    "acceptance": acceptance(done, k) if k else None,
                    "same_tokens": sum(c.tokens == o for c, o in zip(done, own, strict=True)) if k else None,
                    "requests": batch,
                    "values": rates[(name, batch)],
                }
            )
    return pd.DataFrame(rows)
