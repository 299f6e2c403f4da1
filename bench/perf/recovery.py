"""The distillation ablation (issue 18): one change per row at the same token budget, every student distilled from
the same corrected teacher's cached top-k logits, then scored on held-out python-docs and on the general-English
set (compress/english.py). Resumable: rows already in the results file are not run again.

Needs a finished main job (its corrected teacher and pruned students), and for the `generated` rows a corpus from
`compactlm compress generate-data smollm2-135m DIR` (--generated DIR):

    python -m compactlm.bench.perf.recovery --run runs/recovery/base-job --generated runs/gen \\
        --out docs/compress/recovery [--rows lr,data] [--seeds 0,1] [--changes 'LABEL;LABEL']

Writes results.csv (one line per row and seed) and ablation.md (the mean over seeds, with the spread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import pandas as pd

BASE = {"student": "width", "lr": 1e-4, "min_lr": 1e-5, "data": "python-docs", "precision": "fp32", "tokens": 24576}
"""The main job's recipe before this ablation (recipes/smollm2-minitron.yaml, budget small)."""
DEFAULTS = {"batch_size": 4, "temperature": 1.0, "loss": "logit"}
"""Settings rows vary that the first rows did not: left out of a row's key when at these values, so the rows
measured before them keep their keys."""

ROWS = {  # group: [(label, changes to BASE)]
    "precision": [("fp32 (base)", {}), ("bf16 autocast", {"precision": "bf16"})],
    "lr": [
        (f"lr {lr:g} -> {lr / 10:g}", {"precision": "bf16", "lr": lr, "min_lr": lr / 10})
        for lr in (1e-4, 3e-4, 1e-3, 3e-3)
    ],
    "data": [
        ("python-docs", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4}),
        ("generated", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "data": "generated"}),
        ("python-docs:0.5,generated:0.5", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "data": "mix"}),
        (
            "python-docs:0.5,linux-docs:0.5",
            {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "data": "python-docs:0.5,linux-docs:0.5"},
        ),
    ],
    "batch": [
        (
            f"batch {b} x 256 ({24576 // (b * 256)} steps)",
            {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "batch_size": b},
        )
        for b in (2, 4, 8)
    ],
    "temperature": [
        (f"temperature {t:g}", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "temperature": t}) for t in (1.0, 2.0)
    ],
    "loss": [
        ("logit (cached top-64)", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4}),
        ("logit + hidden (live teacher)", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "loss": "logit+hidden"}),
    ],
    "tokens": [
        (f"{tokens:,} tokens", {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "tokens": tokens})
        for tokens in (24576, 73728)
    ],
    "recipe": [  # the main job's recipe as it stands, then one change; run against the job's own folder (--run)
        (
            f"batch {b} x 256 ({73728 // (b * 256)} steps)" + (", the recipe" if b == 2 else ""),
            {"precision": "bf16", "lr": 1e-3, "min_lr": 1e-4, "data": "mix", "tokens": 73728, "batch_size": b},
        )
        for b in (2, 1)
    ],
}


def _data(value: str, generated: Path | None) -> str:
    if value in ("generated", "mix"):
        if generated is None:
            raise SystemExit("rows on teacher-generated text need --generated DIR (compress generate-data)")
        return str(generated) if value == "generated" else f"python-docs:0.5,{generated}:0.5"
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/recovery/base-job"))
    parser.add_argument("--generated", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"groups to run: {', '.join(ROWS)}")
    parser.add_argument("--students", default="width,depth")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--changes", default=None, help="only the rows with these labels (;-separated)")
    parser.add_argument("--eval-samples", type=int, default=16)
    args = parser.parse_args()

    from compactlm.compress.operations import evaluate_models
    from compactlm.compress.retrain import cache_logits, distill_checkpoint
    from compactlm.compress.train_config import DistillConfig, TrainConfig

    teacher = args.run / "models" / "teacher-corrected"
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done = pd.read_csv(results) if results.is_file() else pd.DataFrame()
    keys = set(done["key"]) if len(done) else set()
    plan = [
        (group, label, {**BASE, **changes, "student": student, "seed": int(seed)})
        for group in args.rows.split(",")
        for label, changes in ROWS[group]
        if args.changes is None or label in args.changes.split(";")
        for student in args.students.split(",")
        for seed in args.seeds.split(",")
    ]
    for group, label, row in plan:
        keyed = {k: v for k, v in row.items() if not (k in DEFAULTS and DEFAULTS[k] == v)}
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
        row = {**DEFAULTS, **row}
        if key in keys:  # measured already (in this group, or in another one: then the same line, relabelled)
            if not ((done["key"] == key) & (done["group"] == group)).any():
                same = done[done["key"] == key].iloc[[0]].assign(group=group, change=label)
                done = pd.concat([done, same], ignore_index=True)
                done.to_csv(results, index=False)
            continue
        data = _data(row["data"], args.generated)
        cfg = TrainConfig(
            tokens=row["tokens"],
            seq_len=256,
            batch_size=row["batch_size"],
            lr=row["lr"],
            min_lr=row["min_lr"],
            precision=row["precision"],
            seed=row["seed"],
            save_every=0,
        )
        rows_read = f"{data}|{row['tokens']}|{row['seed']}" + (
            f"|{row['batch_size']}" if row["batch_size"] != 4 else ""
        )
        cache = args.out / "cache" / hashlib.sha256(rows_read.encode()).hexdigest()[:12]
        if row["loss"] != "logit":  # the hidden-state loss needs the teacher's hidden states: a live teacher
            cache = None
        elif not cache.is_dir():
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache_logits(teacher, cache, data=data, train_cfg=cfg, top_k=64)
        out = args.out / "students" / key
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        record = distill_checkpoint(
            teacher,
            args.run / "models" / f"{row['student']}-pruned",
            out,
            data=data,
            train_cfg=cfg,
            distill_cfg=DistillConfig(loss=row["loss"], temperature=row["temperature"]),
            teacher_cache=cache,
            overwrite=True,
            eval_samples=0,
        )
        seconds = time.perf_counter() - started
        ev = evaluate_models([out], "python-docs", args.eval_samples, 512, general="english").iloc[0]
        line = {
            "key": key,
            "group": group,
            "change": label,
            **row,
            "data": row["data"],
            "train_seconds": round(record["seconds"], 1),
            "tokens_per_s": round(record["tokens"] / record["seconds"]),
            "peak_memory_mb": record["peak_memory_mb"],
            "ppl_python_docs": ev["perplexity"],
            "ppl_english": ev["general_perplexity"],
            "wall_seconds": round(seconds, 1),
        }
        done = pd.concat([done, pd.DataFrame([line])], ignore_index=True)
        keys.add(key)
        done.to_csv(results, index=False)
        print(json.dumps(line), flush=True)
    reference = evaluate_models([teacher], "python-docs", args.eval_samples, 512, general="english").iloc[0]
    _table(done, reference, args.out / "ablation.md")


def _table(done: pd.DataFrame, teacher, path: Path) -> None:
    teacher_ppl, teacher_en = teacher["perplexity"], teacher["general_perplexity"]
    lines = [
        f"corrected teacher: python-docs {teacher_ppl:.1f}, english {teacher_en:.1f}",
        "",
        "| group | change | student | seeds | tokens/s | python-docs ppl (x teacher) | english ppl (x teacher) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (group, change, student), rows in done.groupby(["group", "change", "student"], sort=False):
        ppl, en = rows["ppl_python_docs"], rows["ppl_english"]
        spread = f" ±{ppl.std():.1f}" if len(rows) > 1 else ""
        cells = [group, change, student, str(len(rows)), f"{rows['tokens_per_s'].mean():.0f}"]
        cells.append(f"{ppl.mean():.1f}{spread} ({ppl.mean() / teacher_ppl:.1f}x)")
        cells.append(f"{en.mean():.0f} ({en.mean() / teacher_en:.1f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
