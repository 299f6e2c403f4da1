"""Teacher-generated distillation data: text sampled from the teacher itself, so that the student is taught the
teacher's whole distribution rather than one narrow corpus (issue 18: distilled on Python documentation alone,
students learned that corpus and kept little of the teacher's general English).

The teacher runs on an inference engine (the cpu engine by default: continuous batching, hundreds of tokens/s at
batch 32 on 2 cores). Each sample starts from a seed prompt: the bare start of a document (the model's BOS token,
or its EOS where it has none: what follows a document boundary in pre-training) or one of a fixed list of openers
of many genres (`SEED_PROMPTS`), or the user's own prompts; each request samples with its own seed, so the corpus
is reproducible from (teacher, settings, seed). Samples shorter than `min_tokens`, degenerate ones (more than
half of their 8-grams repeated within the sample) and near-duplicates (more than half of their 8-grams seen in
earlier samples) are dropped. The folder written is an ordinary data source: `generated.jsonl` (one {"text"}
per line; the fixed hash rule of compress/data.py holds out 10% of the lines) and `generation.json`, the record
of how it was made.

It sits with the engines because it drives one (the layers point down: compress never imports an engine).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from compactlm.core.config import option
from compactlm.core.errors import CompactLMError

CORPUS_FILE = "generated.jsonl"
RECORD_FILE = "generation.json"
NGRAM = 8

SEED_PROMPTS = (
    "",  # the bare start of a document
    "",
    "",
    "",
    "Once upon a time",
    "Chapter 1\n\n",
    "The history of",
    "In this article, we will explain",
    "Dear Sir,\n\n",
    "Q: What is the difference between",
    "Abstract\n\n",
    "The old man looked at",
    "How to",
    "Scientists have discovered",
    "Introduction\n\nThe",
    "My favorite",
    "It was a cold morning in",
    "The following recipe",
    "In mathematics,",
    "The city of",
    "Step 1:",
    "Here is a short story about",
    "The main causes of",
    "Why do",
    "A good teacher",
    "The poem begins",
    "When I was young,",
    "Ladies and gentlemen,",
    "The economy of",
    "def ",
    "# ",
    "The word",
)
"""Openers of many genres (stories, letters, essays, science, how-tos, questions, verse, code); "" starts a new
document from nothing. Requests cycle through them."""


@dataclass(frozen=True)
class GenerateConfig:
    """How much teacher text to sample, and how."""

    tokens: int = option(65536, "Generated tokens to keep (after filtering), in all.")
    max_new_tokens: int = option(256, "Most tokens per sample (a sample also ends at the end-of-sequence token).")
    min_tokens: int = option(32, "Samples shorter than this are dropped.")
    temperature: float = option(1.0, "Sampling temperature (1: the teacher's own distribution).")
    top_p: float = option(0.95, "Nucleus sampling: the smallest set of tokens holding this probability mass.")
    top_k: int = option(0, "Sample among the k most likely tokens only (0: no cut).")
    batch_size: int = option(32, "Requests in flight at once (the engine batches them).")
    seed: int = option(0, "Seed of every request's sampling: the same seed gives the same corpus.")

    def __post_init__(self):
        for name in ("tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise CompactLMError(f"need 0 <= --min-tokens ({self.min_tokens}) <= --max-new-tokens")
        if not 0 < self.temperature <= 100:
            raise CompactLMError(f"--temperature must be in (0, 100], not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CompactLMError(f"--top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise CompactLMError(f"--top-k must be >= 0, not {self.top_k}")


class _Filter:
    """Drops short, degenerate and near-duplicate samples (8-gram shingles of token ids)."""

    def __init__(self, min_tokens: int):
        self.min_tokens, self.seen = min_tokens, set()
        self.dropped = {"short": 0, "degenerate": 0, "near_duplicate": 0}

    def keep(self, tokens: list[int]) -> bool:
        if len(tokens) < max(self.min_tokens, 1):
            self.dropped["short"] += 1
            return False
        grams = [tuple(tokens[i : i + NGRAM]) for i in range(max(1, len(tokens) - NGRAM + 1))]
        unique = set(grams)
        if len(unique) < 0.5 * len(grams):
            self.dropped["degenerate"] += 1
            return False
        if len(unique & self.seen) > 0.5 * len(unique):
            self.dropped["near_duplicate"] += 1
            return False
        self.seen |= unique
        return True


def seed_prompts(path: str | os.PathLike | None) -> list[str]:
    """The built-in openers, or a file's: one prompt per line, or a .jsonl of {"text"} (blank lines skipped)."""
    if path is None:
        return list(SEED_PROMPTS)
    path = Path(path)
    if not path.is_file():
        raise CompactLMError(f"--prompts {path} is not a file")
    from compactlm.compress.data import check_text

    check_text(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["text"] for line in lines]
        except (ValueError, KeyError, TypeError) as exc:
            raise CompactLMError(f'--prompts {path}: every line must be JSON with a string field "text"') from exc
    if not lines:
        raise CompactLMError(f"--prompts {path} holds no prompt")
    return lines


def generate_data(
    engine,
    out: str | os.PathLike,
    cfg: GenerateConfig,
    *,
    prompts: list[str] | None = None,
    source: str | None = None,
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Sample `cfg.tokens` tokens of text from an open engine into the corpus folder `out` (written atomically:
    a temporary folder renamed at the end). Returns the record written to `generation.json`."""
    from compactlm.engines.runtime import Request, Sampling

    out = Path(out)
    if out.exists() and not overwrite:
        raise CompactLMError(f"{out} exists: give --overwrite to replace it")
    prompts = prompts or list(SEED_PROMPTS)
    tokenizer = engine.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CompactLMError("the teacher's tokenizer has neither a BOS nor an EOS token to start a document from")
    encoded = [[start, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    limit = engine.limits.max_seq_len - max(len(p) for p in encoded)
    max_new = min(cfg.max_new_tokens, limit, engine.limits.max_seq_len - 1)
    if max_new < max(cfg.min_tokens, 1):
        raise CompactLMError(f"the engine's max_seq_len ({engine.limits.max_seq_len}) leaves no room to generate")
    keep, kept_tokens, generated, submitted = _Filter(cfg.min_tokens), 0, 0, 0
    rows: list[dict] = []
    started = time.perf_counter()
    in_flight: list = []

    def submit() -> None:
        nonlocal submitted
        index = submitted % len(encoded)
        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.top_k, seed=cfg.seed * 1_000_003 + submitted)
        request = Request(tuple(encoded[index]), max_new, ignore_eos=False, sampling=sampling)
        in_flight.append((index, engine.submit(request)))
        submitted += 1

    while kept_tokens < cfg.tokens or in_flight:
        # top up while what is in flight may not reach the budget (at the mean kept length so far); then drain: a
        # request is never cancelled, so the corpus may end a little above the budget
        mean = kept_tokens / len(rows) if rows else max_new
        while len(in_flight) < cfg.batch_size and kept_tokens + len(in_flight) * mean < cfg.tokens:
            submit()
        if not in_flight:
            break
        index, stream = in_flight.pop(0)
        completion = stream.result()
        if completion.finish_reason == "error":
            raise CompactLMError(f"the engine failed a generation request: {completion.error}")
        tokens = [t for t in completion.tokens if t not in engine.eos_token_ids]
        generated += len(completion.tokens)
        if keep.keep(tokens):
            text = prompts[index] + tokenizer.decode(tokens, skip_special_tokens=True)
            rows.append({"text": text, "prompt": index, "tokens": len(tokens)})
            kept_tokens += len(tokens)
        if progress is not None:
            progress(min(kept_tokens, cfg.tokens), cfg.tokens)
        if submitted > 50 and len(rows) < submitted / 20:
            raise CompactLMError(
                f"{submitted} samples, only {len(rows)} kept ({keep.dropped}): the teacher's samples are too short "
                "or too repetitive at these settings (raise --temperature or --max-new-tokens, lower --min-tokens)"
            )
    seconds = time.perf_counter() - started
    record = {
        "kind": "generated-data",
        "teacher": source,
        "engine": {"backend": engine.manifest.backend, "precision": engine.manifest.precision},
        "config": asdict(cfg),
        "prompts": prompts if prompts != list(SEED_PROMPTS) else "built-in (engines/generate.py SEED_PROMPTS)",
        "samples": {"submitted": submitted, "kept": len(rows), "dropped": keep.dropped},
        "tokens": {"kept": kept_tokens, "generated": generated},
        "seconds": round(seconds, 1),
        "generated_tokens_per_second": round(generated / max(seconds, 1e-9), 1),
        "heldout_rule": "compress/data.py: sha256(doc_id)[:8] % 100 < 10, doc ids generated.jsonl:LINE",
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with (tmp / CORPUS_FILE).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def generate_corpus(
    teacher: str,
    out: str | os.PathLike,
    cfg: GenerateConfig,
    *,
    prompts_file: str | os.PathLike | None = None,
    precision: str = "bf16",
    overwrite: bool = False,
) -> dict:
    """`compress generate-data`: everything checked first, then the teacher's engine (an engine folder is used as
    it is; a checkpoint is compiled for the cpu engine into a temporary folder beside `out`), then the samples."""
    import tempfile

    from compactlm.core.console import stage_progress
    from compactlm.engines.build import build_engine
    from compactlm.engines.config import BuildConfig
    from compactlm.engines.registry import load_engine

    out = Path(out)
    if out.exists() and not overwrite:
        raise CompactLMError(f"{out} exists: give --overwrite to replace it")
    prompts = seed_prompts(prompts_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.engine-", dir=out.parent) as scratch:
        if (Path(teacher) / "engine.json").is_file():
            engine_path = Path(teacher)
        else:
            engine_path = build_engine(
                teacher, Path(scratch) / "engine", BuildConfig(backend="cpu", precision=precision)
            )
        with load_engine(engine_path) as engine, stage_progress() as update:
            return generate_data(
                engine,
                out,
                cfg,
                prompts=prompts,
                source=str(teacher),
                overwrite=overwrite,
                progress=lambda done, total: update("generating teacher text (tokens kept)", done, total),
            )
