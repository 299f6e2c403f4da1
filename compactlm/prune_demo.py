"""The pruning demo (`compactlm demo`): bundled teacher -> one importance pass -> width and depth students (and
the same shapes pruned at random, the baseline) -> held-out perplexity table, no retraining. The README's
one-shot pruning table comes from it, and the retraining experiments in scripts/ start from its students.
Resumable: finished steps found in the run folder are reused. The whole job is `compactlm run` (pipeline.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from compress.checkpoint import load_model, load_tokenizer, read_record
from compress.importance import ImportanceConfig, ImportanceScores
from compress.jobs import evaluate_models, prune_checkpoint, run_importance
from compress.models import pull
from compress.progress import console
from compress.prune import PruneTarget
from compress.tables import depth_table, results_table

TEACHER = "smollm2-135m"
PROMPT = "The capital of France is"


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    data: str = "python-docs"
    samples: int = 64
    seq_len: int = 256
    eval_samples: int = 16
    eval_seq_len: int = 512
    students: dict[str, PruneTarget] = field(
        default_factory=lambda: {
            # ~81M: Minitron's width recipe scaled down (hidden 576 -> 432 is a multiple of the 9 heads)
            "width": PruneTarget(hidden_size=432, ffn_hidden_size=1024),
            # ~85M: 30 -> 16 layers, the contiguous block whose removal costs the least LM loss
            "depth": PruneTarget(num_layers=16),
        }
    )


def _student(cfg: DemoConfig, name: str, target: PruneTarget, teacher, scores, random_seed=None) -> Path:
    out = cfg.out / name
    record = read_record(out) if out.is_dir() else None
    wanted = {k: v for k, v in target.__dict__.items() if v is not None}
    if record and record["history"][-1].get("target") == json.loads(json.dumps(wanted)):
        console.print(f"[dim]reusing {out}[/]")
        return out
    result = prune_checkpoint(
        teacher,
        out,
        target,
        scores=None if random_seed is not None else scores,
        random_seed=random_seed,
        overwrite=True,
    )
    return result["path"]


def greedy_continuation(path: Path, prompt: str = PROMPT, tokens: int = 8) -> str:
    import torch

    model, tokenizer = load_model(path), load_tokenizer(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def run_demo(cfg: DemoConfig) -> pd.DataFrame:
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    teacher_path = pull(TEACHER)
    teacher = load_model(teacher_path)

    scores_file = cfg.out / "scores.safetensors"
    block_sizes = sorted(
        {1} | {teacher.config.num_hidden_layers - t.num_layers for t in cfg.students.values() if t.num_layers}
    )
    if scores_file.is_file():
        scores = ImportanceScores.load(scores_file)
        console.print(f"[dim]reusing {scores_file}[/]")
    else:
        console.rule("importance (forward passes only)")
        scores = run_importance(
            teacher, cfg.data, cfg.samples, cfg.seq_len, ImportanceConfig(block_sizes=tuple(block_sizes))
        )
        scores.save(scores_file)
    console.print(depth_table(scores, rows=8))

    console.rule("pruning")
    paths = {"teacher": teacher_path}
    for name, target in cfg.students.items():
        paths[name] = _student(cfg, name, target, teacher, scores)
        paths[f"{name} (random)"] = _student(cfg, f"{name}-random", target, teacher, scores, random_seed=0)

    console.rule("held-out evaluation")
    frame = evaluate_models(list(paths.values()), cfg.data, cfg.eval_samples, cfg.eval_seq_len, names=list(paths))
    configs = [load_model_config(p) for p in paths.values()]
    frame["layers"] = [c.num_hidden_layers for c in configs]
    frame["hidden"] = [c.hidden_size for c in configs]
    frame["ffn"] = [c.intermediate_size for c in configs]
    frame[f"greedy: {PROMPT!r}"] = [greedy_continuation(p) for p in paths.values()]
    frame.to_csv(cfg.out / "results.csv", index=False)
    console.print(
        results_table(
            frame.drop(columns=[f"greedy: {PROMPT!r}"]),
            title=f"SmolLM2-135M students, held-out {cfg.data} ({cfg.eval_samples} x {cfg.eval_seq_len} tokens)",
        )
    )
    for name, text in zip(frame["model"], frame[f"greedy: {PROMPT!r}"], strict=True):
        console.print(f"  {name:>16}: {PROMPT} [bold]{text}[/]")
    console.print(f"done in {time.perf_counter() - started:.0f} s; results in {cfg.out / 'results.csv'}")
    return frame


def load_model_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
