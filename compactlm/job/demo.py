"""The pruning demo (`compactlm demo`): bundled teacher -> one importance pass -> width and depth students (and
the same shapes pruned at random, the baseline) -> held-out perplexity table, no retraining. The README's
one-shot pruning table comes from it, and the retraining experiments in scripts/ start from its students.
Resumable: it runs on the run mechanism (compactlm.core.runs), finished stages are reused. The whole job is
`compactlm run` (pipeline.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from compactlm.compress.checkpoint import inspect_checkpoint, load_model, load_tokenizer
from compactlm.compress.importance import ImportanceConfig, ImportanceScores
from compactlm.compress.models import pull
from compactlm.compress.operations import evaluate_models, prune_checkpoint, run_importance
from compactlm.compress.prune import PruneTarget
from compactlm.compress.tables import blocks_table, depth_table, results_table
from compactlm.core.console import console
from compactlm.core.io import atomic_file
from compactlm.core.runs import Run

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


def greedy_continuation(path: Path, prompt: str = PROMPT, tokens: int = 8) -> str:
    import torch

    model, tokenizer = load_model(path), load_tokenizer(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def run_demo(cfg: DemoConfig) -> pd.DataFrame:
    """Run (or resume) the demo in its run folder; the table is also saved as OUT/results.csv."""
    from compactlm.compress.checkpoint import checkpoint_sha256

    run = Run.claim(cfg.out, "demo", "prune-demo")
    teacher_path = pull(TEACHER)
    run.stage(
        "pull",
        {"teacher": TEACHER},
        [],
        lambda resume: {"path": str(teacher_path), "sha256": checkpoint_sha256(teacher_path)},
        lambda o: Path(o["path"]).is_dir(),
    )
    teacher = load_model(teacher_path)

    scores_file = cfg.out / "scores.safetensors"
    layers = teacher.config.num_hidden_layers
    block_sizes = tuple(sorted({1} | {layers - t.num_layers for t in cfg.students.values() if t.num_layers}))

    def importance(resume: bool) -> dict:
        config = ImportanceConfig(block_sizes=block_sizes)
        run_importance(teacher, cfg.data, cfg.samples, cfg.seq_len, config).save(scores_file)
        return {"path": str(scores_file)}

    settings = {"data": cfg.data, "samples": cfg.samples, "seq_len": cfg.seq_len, "block_sizes": block_sizes}
    run.stage("importance", settings, ["pull"], importance, lambda o: Path(o["path"]).is_file(), "forward passes only")
    scores = ImportanceScores.load(scores_file)
    for table in (depth_table(scores, rows=8), blocks_table(scores)):
        if table is not None:
            console.print(table)

    paths = {"teacher": teacher_path}
    for name, target in cfg.students.items():
        for label, folder, seed in ((name, name, None), (f"{name} (random)", f"{name}-random", 0)):
            paths[label] = _prune(run, teacher, scores, cfg.out / folder, target, seed)

    def evaluate(resume: bool) -> dict:
        frame = evaluate_models(list(paths.values()), cfg.data, cfg.eval_samples, cfg.eval_seq_len, names=list(paths))
        configs = [inspect_checkpoint(p).config for p in paths.values()]
        frame["layers"] = [c.num_hidden_layers for c in configs]
        frame["hidden"] = [c.hidden_size for c in configs]
        frame["ffn"] = [c.intermediate_size for c in configs]
        frame[f"greedy: {PROMPT!r}"] = [greedy_continuation(p) for p in paths.values()]
        with atomic_file(cfg.out / "results.csv") as tmp:
            frame.to_csv(tmp, index=False)
        return {"path": str(cfg.out / "results.csv")}

    deps = ["pull", *(f"prune/{Path(p).name}" for p in list(paths.values())[1:])]
    settings = {"data": cfg.data, "samples": cfg.eval_samples, "seq_len": cfg.eval_seq_len, "prompt": PROMPT}
    run.stage("eval", settings, deps, evaluate, lambda o: Path(o["path"]).is_file(), "held-out perplexity")
    frame = pd.read_csv(cfg.out / "results.csv")
    console.print(
        results_table(
            frame.drop(columns=[f"greedy: {PROMPT!r}"]),
            title=f"SmolLM2-135M students, held-out {cfg.data} ({cfg.eval_samples} x {cfg.eval_seq_len} tokens)",
        )
    )
    for name, text in zip(frame["model"], frame[f"greedy: {PROMPT!r}"], strict=True):
        console.print(f"  {name:>16}: {PROMPT} [bold]{text}[/]")
    console.print(f"done in {run.elapsed:.0f} s; results in {cfg.out / 'results.csv'}")
    return frame


def _prune(run: Run, teacher, scores, out: Path, target: PruneTarget, random_seed: int | None) -> Path:
    """One student, importance-guided or (with a seed) pruned at random: the baseline importance must beat."""

    def work(resume: bool) -> dict:
        by = None if random_seed is not None else scores
        prune_checkpoint(teacher, out, target, scores=by, random_seed=random_seed, overwrite=True)
        return {"path": str(out)}

    settings = {"target": dataclasses.asdict(target), "random_seed": random_seed}
    run.stage(f"prune/{out.name}", settings, ["importance"], work, lambda o: Path(o["path"]).is_dir())
    return out
