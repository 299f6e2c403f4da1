"""The benchmark report: Markdown and HTML with matplotlib figures, from one or more results files.

Figures: request throughput vs batch size per ISL/OSL for each engine (model + precision), the speedup of each
over a baseline (students vs teacher, FP8 vs FP16: the Minitron paper's figures 7 and 8), latency percentiles,
and, given `compress eval` results, accuracy beside throughput. Also the rich summary table printed after a run.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from compactlm.bench.metrics import aggregate_repeats
from compactlm.core.errors import CompactLMError

POINT_KEYS = ["label", "isl", "osl", "mode", "batch_size", "rate", "arrivals", "window_s", "source"]
POINT_KEYS += ["input_stdev", "output_stdev"]
"""What makes one point: its repeats (rows equal in all of these) are averaged, with confidence intervals."""


def label_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `label`: what a reader calls an engine (model, then backend and precision where they differ)."""
    frame = frame.copy()
    defaults = {"model": frame["target"] if "target" in frame else "?", "backend": "?", "precision": "none"}
    for column, default in defaults.items():
        if column not in frame:
            frame[column] = default
        frame[column] = frame[column].fillna(default if isinstance(default, str) else "?").astype(str)
    multi_backend = frame["backend"].nunique() > 1
    precision = frame["precision"].where(frame["precision"] != "none", "")  # remote targets: unknown
    frame["label"] = frame["model"] + (" " + frame["backend"] if multi_backend else "") + " " + precision
    frame["label"] = frame["label"].str.strip()
    return frame


def point_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Results averaged over repeats (with `<metric>_ci` half widths), one row per engine and point."""
    frame = label_rows(frame)
    points = aggregate_repeats(frame, [k for k in POINT_KEYS if k in frame])
    extra = frame.groupby("label", sort=False)[["model_params"]].first() if "model_params" in frame else None
    if extra is not None:
        points = points.join(extra, on="label")
    return points.sort_values(["isl", "osl", "label", "batch_size", "rate"], kind="stable").reset_index(drop=True)


def choose_baseline(points: pd.DataFrame, baseline: str | None) -> str:
    """The label to compare against: `baseline` (a label or a model name), else the engine with the most params."""
    labels = list(dict.fromkeys(points["label"]))
    if baseline is None:
        if "model_params" in points and points["model_params"].notna().any():
            return str(points.loc[points["model_params"].astype(float).idxmax(), "label"])
        return labels[0]
    if baseline in labels:
        return baseline
    matches = [label for label in labels if label.split(" ")[0] == baseline]
    if len(matches) == 1:
        return matches[0]
    raise CompactLMError(
        f"baseline {baseline!r} {'is ambiguous' if matches else 'is not in the results'}; choose one of: "
        + ", ".join(labels)
    )


def speedups(points: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Request throughput of every engine divided by the baseline's at the same ISL/OSL and batch size."""
    table = points[points["batch_size"].notna()].pivot_table(
        index=["isl", "osl", "batch_size"], columns="label", values="request_throughput", sort=False
    )
    if baseline not in table:
        return pd.DataFrame()
    return table.div(table[baseline], axis=0).drop(columns=[baseline]).reset_index()


def load_eval(path: str | os.PathLike) -> pd.DataFrame:
    """`compress eval` results: a table with `model` (and `path`, `params`, `perplexity`, `acc_<task>`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CompactLMError(f"evaluation results {path} do not exist")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
    elif path.suffix in (".json", ".jsonl"):
        frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    else:
        raise CompactLMError(f"evaluation results {path} must be .csv, .parquet, .json or .jsonl")
    if "model" not in frame:
        raise CompactLMError(f"evaluation results {path} have no 'model' column (write them with compress eval --out)")
    return frame


def accuracy_table(frame: pd.DataFrame, points: pd.DataFrame, evals: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Accuracy (or perplexity) beside throughput: one row per engine, at its largest batch of the first shape.

    An engine's evaluation row is the one whose checkpoint path is the engine's source, else whose name is its model.
    """
    frame = label_rows(frame)
    first = points[points["batch_size"].notna()]
    if first.empty:
        return pd.DataFrame()
    isl, osl = first.iloc[0][["isl", "osl"]]
    at = first[(first["isl"] == isl) & (first["osl"] == osl)]
    batch = at["batch_size"].max()
    at = at[at["batch_size"] == batch].set_index("label")
    metrics = [c for c in evals.columns if c == "perplexity" or c.startswith("acc_")]
    by_path = {}
    if "path" in evals:
        by_path = {os.path.realpath(str(p)): i for i, p in evals["path"].items() if isinstance(p, str)}
    by_name = {str(m): i for i, m in evals["model"].items()}
    rows = []
    for label, group in frame.groupby("label", sort=False):
        source = (
            group["source_path"].dropna().iloc[0]
            if "source_path" in group and group["source_path"].notna().any()
            else None
        )
        index = by_path.get(os.path.realpath(source)) if source else None
        if index is None:
            index = by_name.get(str(group["model"].iloc[0]))
        row = {"engine": label, "shape": f"{isl}/{osl}", "batch_size": batch}
        row["request_throughput"] = at["request_throughput"].get(label, math.nan)
        base = at["request_throughput"].get(baseline, math.nan)
        row["speedup"] = row["request_throughput"] / base if base else math.nan
        row.update({m: evals.loc[index, m] if index is not None else math.nan for m in metrics})
        rows.append(row)
    return pd.DataFrame(rows)


# -- figures ---------------------------------------------------------------------------------------------------


def _shapes(points: pd.DataFrame) -> list[tuple[int, int]]:
    return list(dict.fromkeys(zip(points["isl"].astype(int), points["osl"].astype(int), strict=True)))


def _grid(plt, n: int, rows: int = 1):
    cols = max(1, n)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    return fig, axes


def plot_throughput(points: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    data = points[points["batch_size"].notna()]
    if data.empty:
        return None
    shapes = _shapes(data)
    fig, axes = _grid(plt, len(shapes))
    for ax, (isl, osl) in zip(axes[0], shapes, strict=True):
        for label, group in data[(data["isl"] == isl) & (data["osl"] == osl)].groupby("label", sort=False):
            group = group.sort_values("batch_size")
            err = group["request_throughput_ci"].fillna(0)
            ax.errorbar(group["batch_size"], group["request_throughput"], yerr=err, marker="o", capsize=3, label=label)
        ax.set(title=f"ISL/OSL {isl}/{osl}", xlabel="batch size", ylabel="requests/s")
        _batch_axis(ax, data["batch_size"])
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_speedup(table: pd.DataFrame, baseline: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    labels = [c for c in table.columns if c not in ("isl", "osl", "batch_size")]
    if table.empty or not labels:
        return None
    shapes = _shapes(table)
    fig, axes = _grid(plt, len(shapes))
    width = 0.8 / len(labels)
    for ax, (isl, osl) in zip(axes[0], shapes, strict=True):
        rows = table[(table["isl"] == isl) & (table["osl"] == osl)].sort_values("batch_size")
        x = np.arange(len(rows))
        for i, label in enumerate(labels):
            ax.bar(x + i * width - 0.4 + width / 2, rows[label], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [f"{int(b)}" for b in rows["batch_size"]])
        ax.set(title=f"ISL/OSL {isl}/{osl}", xlabel="batch size", ylabel=f"speedup over {baseline}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_latency(points: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    data = points[points["batch_size"].notna()]
    if data.empty:
        return None
    shapes = _shapes(data)
    fig, axes = _grid(plt, len(shapes), rows=2)
    for col, (isl, osl) in enumerate(shapes):
        at = data[(data["isl"] == isl) & (data["osl"] == osl)]
        for row, metric in enumerate(("ttft", "itl")):
            ax = axes[row][col]
            for i, (label, group) in enumerate(at.groupby("label", sort=False)):
                group = group.sort_values("batch_size")
                color = f"C{i}"
                ax.plot(group["batch_size"], group[f"{metric}_ms_p50"], marker="o", color=color, label=f"{label} p50")
                p99 = group[f"{metric}_ms_p99"]
                ax.plot(group["batch_size"], p99, marker="x", linestyle="--", color=color, label=f"{label} p99")
            ax.set(title=f"{metric.upper()} ISL/OSL {isl}/{osl}", xlabel="batch size", ylabel="ms")
            _batch_axis(ax, data["batch_size"])
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy(table: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    metrics = [c for c in table.columns if c.startswith("acc_")] or [c for c in table.columns if c == "perplexity"]
    if table.empty or not metrics or table[metrics].isna().all().all():
        return None
    fig, axes = _grid(plt, len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for _, row in table.iterrows():
            ax.scatter(row["request_throughput"], row[metric])
            ax.annotate(row["engine"], (row["request_throughput"], row[metric]), fontsize=7)
        ax.set(xlabel=f"requests/s ({table['shape'].iloc[0]}, batch {int(table['batch_size'].iloc[0])})", ylabel=metric)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _batch_axis(ax, sizes: pd.Series) -> None:
    """A log2 x axis labelled with the batch sizes themselves (1, 8, 32), not powers."""
    ticks = sorted({float(b) for b in sizes})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{b:g}" for b in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# -- documents -------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _with_ci(points: pd.DataFrame, column: str) -> pd.Series:
    def one(row):
        ci = row.get(f"{column}_ci", math.nan)
        return _cell(row[column]) + (f" ± {_cell(ci)}" if isinstance(ci, float) and not math.isnan(ci) else "")

    return points.apply(one, axis=1)


def results_summary(points: pd.DataFrame) -> pd.DataFrame:
    """The human table: per engine and point, throughput (± 95% CI over repeats), latency percentiles, errors."""
    out = pd.DataFrame(
        {
            "engine": points["label"],
            "ISL/OSL": points["isl"].astype(int).astype(str) + "/" + points["osl"].astype(int).astype(str),
            "load": [_load_name(r) for _, r in points.iterrows()],
            "req/s": _with_ci(points, "request_throughput"),
            "out tok/s": _with_ci(points, "output_throughput"),
            "TTFT p50 ms": points["ttft_ms_p50"].map(_cell),
            "TTFT p99 ms": points["ttft_ms_p99"].map(_cell),
            "ITL p50 ms": points["itl_ms_p50"].map(_cell),
            "TPOT mean ms": points["tpot_ms_mean"].map(_cell),
            "E2E p50 ms": points["e2e_ms_p50"].map(_cell),
            "E2E p99 ms": points["e2e_ms_p99"].map(_cell),
            "errors": points["errors"],
            "repeats": points["repeats"],
        }
    )
    if "goodput" in points and points["goodput"].notna().any():
        out.insert(5, "goodput", points["goodput"].map(_cell))
    return out


def _load_name(row) -> str:
    if row["mode"] == "rate":
        return f"{row['rate']:g} req/s"
    if row["mode"] == "offline":
        return f"offline (batch ≤ {_cell(row['batch_size'])})"
    return f"batch {int(row['batch_size'])}"


COMPACT = ["engine", "ISL/OSL", "load", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms"]
COMPACT += ["E2E p50 ms", "errors"]


def summary_table(frame: pd.DataFrame, title: str = "benchmark results") -> Table:
    """The rich table printed at the end of a run."""
    table = Table(title=title, caption="latencies in ms; ± 95% CI over repeats")
    summary = results_summary(point_table(frame))[COMPACT]
    for column in summary.columns:
        table.add_column(column, justify="left" if column in ("engine", "load") else "right", overflow="fold")
    for _, row in summary.iterrows():
        table.add_row(*(str(v) for v in row))
    return table


def _markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    frame: pd.DataFrame,
    out: str | os.PathLike,
    baseline: str | None = None,
    evals: pd.DataFrame | None = None,
    command: str | None = None,
) -> tuple[Path, Path]:
    """Write `out/report.md`, `out/report.html` and `out/figures/*.png`; return the two documents' paths."""
    out = Path(out).expanduser()
    blocks: list[tuple[str, object]] = [("h1", "Benchmark report")]
    if command:
        blocks.append(("code", command))
    blocks += benchmark_blocks(frame, out / "figures", baseline, evals)
    return write_documents(blocks, out)


def benchmark_blocks(
    frame: pd.DataFrame, figures: Path, baseline: str | None = None, evals: pd.DataFrame | None = None
) -> list[tuple[str, object]]:
    """The report's body (environment, throughput, speedups, latency, accuracy), figures written to `figures`."""
    import matplotlib

    matplotlib.use("Agg")
    points = point_table(frame)
    base = choose_baseline(points, baseline)
    speed = speedups(points, base)
    blocks: list[tuple[str, object]] = [("p", _environment_line(frame))]
    blocks += [("h2", "Request throughput"), ("img", plot_throughput(points, figures / "throughput.png"))]
    blocks += [("table", results_summary(points))]
    blocks.append(("p", "± is the 95% confidence interval over repeats (t distribution); latencies in milliseconds."))
    if not speed.empty:
        blocks += [("h2", f"Speedup over {base}"), ("img", plot_speedup(speed, base, figures / "speedup.png"))]
        shown = speed.copy()
        shown[[c for c in shown.columns if c not in ("isl", "osl", "batch_size")]] = shown.drop(
            columns=["isl", "osl", "batch_size"]
        ).map(lambda v: f"{v:.2f}x" if not math.isnan(v) else "")
        blocks.append(("table", shown))
    blocks += [("h2", "Latency percentiles"), ("img", plot_latency(points, figures / "latency.png"))]
    if evals is not None:
        accuracy = accuracy_table(frame, points, evals, base)
        blocks += [("h2", "Accuracy beside throughput"), ("img", plot_accuracy(accuracy, figures / "accuracy.png"))]
        blocks += [("table", accuracy)]
        blocks.append(
            ("p", "Accuracy is the checkpoint's (compress eval); engines built from one checkpoint share it.")
        )
    return blocks


def write_documents(
    blocks: Sequence[tuple[str, object]], out: Path, markdown: str = "report.md", page: str = "report.html"
) -> tuple[Path, Path]:
    """Render blocks (h1, h2, p, code, img, table, links) to Markdown and HTML in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md, html_page = out / markdown, out / page
    md.write_text(_render_markdown(blocks, out))
    html_page.write_text(_render_html(blocks, out))
    return md, html_page


def _environment_line(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    parts = []
    for column, name in (
        ("cpu", "CPU"),
        ("cpu_extensions", "CPU extensions"),
        ("gpu", "GPU"),
        ("cpu_count", "cores"),
        ("git_commit", "commit"),
    ):
        values = sorted({str(v) for v in frame[column].dropna()}) if column in frame else []
        if values:
            parts.append(f"{name}: {', '.join(values)}")
    versions = [c for c in frame.columns if c.startswith("version_")]
    if versions:
        parts.append("versions: " + ", ".join(f"{c[8:]} {first[c]}" for c in versions if isinstance(first[c], str)))
    runs = frame["run_id"].nunique() if "run_id" in frame else 1
    parts.append(f"{len(frame)} measured points from {runs} run(s)")
    return "; ".join(parts)


def _render_markdown(blocks: Sequence[tuple[str, object]], out: Path) -> str:
    parts = []
    for kind, value in blocks:
        if value is None:
            continue
        if kind == "h1":
            parts.append(f"# {value}")
        elif kind == "h2":
            parts.append(f"## {value}")
        elif kind == "code":
            parts.append(f"```\n{value}\n```")
        elif kind == "img":
            parts.append(f"![{Path(value).stem}]({Path(value).relative_to(out).as_posix()})")
        elif kind == "table":
            parts.append(_markdown_table(value))
        elif kind == "links":
            parts.append("\n".join(f"- [{text}]({href})" for text, href in value))
        else:
            parts.append(str(value))
    return "\n\n".join(parts) + "\n"


def _render_html(blocks: Sequence[tuple[str, object]], out: Path) -> str:
    parts = []
    for kind, value in blocks:
        if value is None:
            continue
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(str(value))}</pre>")
        elif kind == "img":
            src = html.escape(Path(value).relative_to(out).as_posix())
            parts.append(f'<img src="{src}" alt="{html.escape(Path(value).stem)}">')
        elif kind == "table":
            parts.append(_html_table(value))
        elif kind == "links":
            items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in value)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<p>{html.escape(str(value))}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
    )
    body = "\n".join(parts)
    title = next((str(value) for kind, value in blocks if kind == "h1"), "Benchmark report")
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    return f"<!doctype html>\n<html><head>{head}</head><body>\n{body}\n</body></html>\n"
