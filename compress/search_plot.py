"""The search's figure: held-out loss against parameters and, when measured, against request throughput."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_search(board: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Held-out loss vs parameters (and vs request throughput when measured); the winner and the front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = board[board["role"] == "candidate"]
    refs = board[board["role"] != "candidate"]
    speed = "request_throughput" in board and cands["request_throughput"].notna().any()
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(12 if speed else 6.5, 4.8), squeeze=False)
    panels = [("params", "parameters (M)", 1e-6)] + (
        [("request_throughput", "requests/s (cpu engine)", 1)] if speed else []
    )
    for ax, (column, label, scale) in zip(axes[0], panels, strict=True):
        ax.scatter(cands[column] * scale, cands["heldout_loss"], c="tab:blue", label="candidates")
        for _, r in cands.iterrows():
            ax.annotate(r["candidate"], (r[column] * scale, r["heldout_loss"]), fontsize=7, alpha=0.8)
        win = cands[cands["winner"]]
        ax.scatter(
            win[column] * scale, win["heldout_loss"], s=160, facecolors="none", edgecolors="tab:red", label="winner"
        )
        if column == "request_throughput" and "on_front" in cands:
            front = cands[cands["on_front"].astype(bool)].sort_values(column)
            ax.plot(front[column], front["heldout_loss"], "--", c="tab:green", label="Pareto front")
        with_ref = refs[refs[column].notna()] if column in refs else refs.iloc[:0]
        for _, r in with_ref.iterrows():
            ax.axhline(r["heldout_loss"], ls=":", c="grey")
            ax.annotate(
                f"{r['candidate']} ({r['params'] / 1e6:.0f}M)", (ax.get_xlim()[0], r["heldout_loss"]), fontsize=7
            )
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss after short retraining (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
