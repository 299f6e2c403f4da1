"""Quality against speed: the accuracy-throughput front, one point per model x precision.

The figure the compression field reports (Minitron's, and every pruning paper's): held-out perplexity (lower is
better) and mean task accuracy (higher is better) against request throughput, the teacher marked, and the Pareto
front: the points no other point beats on both axes, joined by a step line that reads, at each throughput, the best
quality reached at that throughput or more. The points drawn are written beside the figure
(`<figure>.csv`, read back from the plotted artists), so what the figure shows can be checked against the table.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

QUALITY = {"perplexity": False, "mean accuracy": True}
"""Quality columns the front is drawn for, and whether higher is better."""


def pareto(frame: pd.DataFrame, x: str, y: str, higher_better: bool) -> pd.Series:
    """True where no other row is at least as good on both `x` (higher is better) and `y`, and better on one."""
    ok = frame[x].notna() & frame[y].notna()
    xs, ys = frame[x].to_numpy(dtype=float), frame[y].to_numpy(dtype=float)
    sign = 1.0 if higher_better else -1.0
    on = []
    for i in range(len(frame)):
        if not ok.iloc[i]:
            on.append(False)
            continue
        beaten = any(
            ok.iloc[j]
            and xs[j] >= xs[i]
            and sign * ys[j] >= sign * ys[i]
            and (xs[j] > xs[i] or sign * ys[j] > sign * ys[i])
            for j in range(len(frame))
            if j != i
        )
        on.append(not beaten)
    return pd.Series(on, index=frame.index)


def front_points(headline: pd.DataFrame, precisions: list[str]) -> pd.DataFrame:
    """One row per model x precision from a headline table (compactlm.job.report.headline_table: `req/s <precision>`,
    `perplexity`, `acc_<task>` columns), with `mean accuracy` over the tasks and where each point is on the front."""
    tasks = [c for c in headline.columns if c.startswith("acc_")]
    rows = []
    for _, row in headline.iterrows():
        for precision in precisions:
            throughput = row.get(f"req/s {precision}", math.nan)
            if pd.isna(throughput):
                continue
            rows.append(
                {
                    "model": row["model"],
                    "precision": precision,
                    "request_throughput": float(throughput),
                    "perplexity": float(row["perplexity"]),
                    "mean accuracy": float(row[tasks].astype(float).mean()) if tasks else math.nan,
                }
            )
    frame = pd.DataFrame(rows, columns=["model", "precision", "request_throughput", "perplexity", "mean accuracy"])
    for quality, higher in QUALITY.items():
        frame[f"front {quality}"] = pareto(frame, "request_throughput", quality, higher) if len(frame) else []
    return frame


def plot_front(
    points: pd.DataFrame,
    path: Path,
    teacher: str | None = None,
    references: dict[str, dict[str, float]] | None = None,
    x_label: str = "",
) -> Path | None:
    """Perplexity (log scale) and mean accuracy against request throughput, the front as a step line; `teacher`'s
    points are stars; `references` ({quality: {name: value}}, e.g. the teacher as shipped, which has no engine) are
    dotted lines.

    Writes `path` and, beside it, `path.with_suffix(".csv")`: the points as the axes hold them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [q for q in QUALITY if q in points and points[q].notna().any()]
    if points.empty or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    markers = dict(zip(points["precision"].unique(), "osD^v<>", strict=False))
    colors = {m: f"C{i}" for i, m in enumerate(points["model"].unique())}
    drawn = []
    for ax, quality in zip(axes[0], panels, strict=True):
        for (model, precision), group in points.groupby(["model", "precision"], sort=False):
            star = model == teacher
            artist = ax.scatter(
                group["request_throughput"],
                group[quality],
                marker="*" if star else markers[precision],
                s=180 if star else 60,
                color=colors[model],
                edgecolors="black" if star else "none",
                zorder=3,
                label=f"{model} {precision}" + (" (teacher)" if star else ""),
            )
            for x, y in artist.get_offsets().tolist():
                drawn.append({"panel": quality, "model": model, "precision": precision, "x": x, "y": y})
        front = points[points[f"front {quality}"]].sort_values("request_throughput")
        ax.step(front["request_throughput"], front[quality], where="pre", color="gray", lw=1.2, zorder=2)
        for name, value in (references or {}).get(quality, {}).items():
            ax.axhline(value, ls=":", color="gray", lw=1)
            ax.annotate(name, (ax.get_xlim()[0], value), fontsize=7, va="bottom", color="gray")
        if quality == "perplexity":
            ax.set_yscale("log")
        better = "higher" if QUALITY[quality] else "lower"
        ax.set(xlabel=x_label or "requests/s", ylabel=f"{quality} ({better} is better)")
        ax.set_title(f"{quality} against throughput: the front in gray", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    rows = math.ceil(len(labels) / min(4, len(labels)))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))  # room below the axes for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    pd.DataFrame(drawn).to_csv(path.with_suffix(".csv"), index=False)
    return path
