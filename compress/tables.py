"""Rich tables for people: depth ranking, model comparisons, search candidates and chain families."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from rich.table import Table

if TYPE_CHECKING:
    from compactlm.compress.importance import ImportanceScores


def depth_table(scores: ImportanceScores, rows: int | None = None) -> Table | None:
    """Layers ranked from least to most important (by removal loss when measured, else Block Influence); None
    where single layers were not scored (`--block-sizes` without 1)."""
    losses = scores.removal_loss.get(1)
    influence = scores.block_influence.get(1)
    if influence is None:
        return None
    title = "depth importance: layers by LM-loss increase when removed (least important first)"
    if losses is None:
        title = "depth importance: layers by Block Influence (least important first)"
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("layer", justify="right")
    if losses is not None:
        table.add_column("loss without it", justify="right")
        table.add_column("Δ loss", justify="right")
    table.add_column("block influence", justify="right")
    per_layer_tasks = {t: v[1] for t, v in scores.task_removal.items() if 1 in v}
    for task in per_layer_tasks:
        table.add_column(f"{task} acc without it", justify="right")
    order = sorted(range(len(influence)), key=lambda i: float(losses[i] if losses is not None else influence[i]))
    for rank, layer in enumerate(order[:rows] if rows else order, start=1):
        cells = [str(rank), str(layer)]
        if losses is not None:
            cells += [f"{float(losses[layer]):.4f}", f"{float(losses[layer]) - scores.base_loss:+.4f}"]
        cells.append(f"{float(influence[layer]):.4f}")
        cells += [f"{float(v[layer, 0]):.3f}" for v in per_layer_tasks.values()]
        table.add_row(*cells)
    return table


def blocks_table(scores: ImportanceScores) -> Table | None:
    """The block of each scored size (> 1 layer) that each depth metric would drop; None where none was scored."""
    from compactlm.compress.depth import choose_layers_to_drop

    table = Table(title="depth importance: the block each metric would drop")
    for column in ("layers dropped", "chosen by", "block", "without it", "base"):
        table.add_column(column, justify="left" if column == "chosen by" else "right")
    base_tasks = scores.meta.get("task_base", {})
    chance = {f"task:{t}": f" (chance {v['chance']:.3f})" for t, v in base_tasks.items() if "chance" in v}
    for k in sorted(
        set(scores.removal_loss) | set(scores.block_influence) | {k for t in scores.task_removal.values() for k in t}
    ):
        if k < 2:
            continue
        candidates = [("block-loss", scores.removal_loss, "loss", scores.base_loss)]
        candidates.append(("block-influence", scores.block_influence, "influence", None))
        candidates += [
            (
                f"task:{task}",
                {k: v[:, 0] for k, v in blocks.items()},
                "accuracy",
                base_tasks.get(task, {}).get("accuracy"),
            )
            for task, blocks in sorted(scores.task_removal.items())
        ]
        for metric, values, what, base in candidates:
            if k not in values:
                continue
            start = choose_layers_to_drop(scores, k, metric)[0]
            table.add_row(
                str(k),
                metric,
                f"{start}-{start + k - 1}",
                f"{what} {float(values[k][start]):.4f}",
                ("" if base is None else f"{base:.4f}") + chance.get(metric, ""),
            )
    return table if table.row_count else None


def results_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in frame.columns:
        if column in ("path", "data", "tokens", "general_data"):
            continue
        text = frame[column].dtype == object
        table.add_column(column, justify="left" if text else "right", no_wrap=text)
    for _, row in frame.iterrows():
        cells = []
        for column in table.columns:
            value = row[column.header]
            if column.header == "params":
                cells.append(f"{value / 1e6:.1f}M")
            elif isinstance(value, float):
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    return table


LEADERBOARD_COLUMNS = (
    "rank",
    "candidate",
    "params",
    "zero_shot_loss",
    "heldout_loss",
    "perplexity",
    "request_throughput",
    "speedup_vs_source",
    "on_front",
    "winner",
)


def candidates_table(frame, title: str, total_params: int | None = None) -> Table:
    table = Table(title=title)
    columns = [c for c in frame.columns if c not in ("pruned", "retrained", "role", "final_train_loss")]
    for column in columns:
        text = frame[column].dtype == object
        table.add_column(column, justify="left" if text else "right", no_wrap=text)
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if column == "rank" and isinstance(value, float):
                cells.append("" if value != value else str(int(value)))
            elif column == "params":
                cells.append(f"{value / 1e6:.1f}M")
            elif column == "params_fraction":
                cells.append(f"{value:.1%}")
            elif isinstance(value, float):
                cells.append("" if value != value else f"{value:.3f}")
            elif isinstance(value, bool):
                cells.append("yes" if value else "")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    return table


def experts_table(scores: ImportanceScores) -> Table | None:
    """Each MoE layer's routed experts from least to most important by the default metric (contribution), with
    the share of the router's top-k picks each received; None for a dense model."""
    if not scores.experts:
        return None
    contribution, frequency = scores.experts["contribution"], scores.experts["frequency"]
    table = Table(title="expert importance: routed experts by contribution, least important first (share of picks)")
    table.add_column("layer", justify="right")
    table.add_column("experts", justify="left")
    top_k = max(float(frequency[i].sum()) for i in range(len(frequency))) or 1.0
    for layer in range(len(contribution)):
        if not float(frequency[layer].sum()):  # a dense layer
            continue
        order = sorted(range(contribution.shape[1]), key=lambda e: float(contribution[layer, e]))
        cells = [f"{e} ({float(frequency[layer, e]) / top_k:.0%})" for e in order]
        table.add_row(str(layer), "  ".join(cells))
    return table
