"""The quantization table of docs/compress/README.md from `compress eval` results: one CSV per unquantized model,
its first row the unquantized model, the rest its quantized copies (format read from each checkpoint's record).

    python docs/compress/quant_table.py "SmolLM2-135M=runs/quant/teacher.csv" "width student=runs/quant/student.csv"
"""

from __future__ import annotations

import sys

import pandas as pd

from compactlm.compress.record import read_record


def rows(label: str, path: str) -> list[dict]:
    frame = pd.read_csv(path)
    base = frame.iloc[0]
    tasks = [c for c in frame.columns if c.startswith("acc_")]
    out = []
    for i, row in frame.iterrows():
        ops = [op for op in (read_record(row["path"]) or {}).get("history", []) if op.get("op") == "quantize"]
        fmt = ops[-1]["format"] if ops else "unquantized"
        cells = {
            "model": label,
            "params": f"{base['params'] / 1e6:.1f}M",
            "format": fmt,
            "perplexity": f"{row['perplexity']:.2f}",
            "Δ ppl": "" if i == 0 else f"{row['perplexity'] / base['perplexity'] - 1:+.1%}",
            "Δ loss (nats)": "" if i == 0 else f"{row['heldout_loss'] - base['heldout_loss']:+.3f}",
        }
        for task in tasks:
            delta = "" if i == 0 else f" ({row[task] - base[task]:+.3f})"
            cells[task.removeprefix("acc_")] = f"{row[task]:.3f}{delta}"
        out.append(cells)
    return out


def main() -> None:
    pairs = [arg.split("=", 1) if "=" in arg else (arg, arg) for arg in sys.argv[1:]]
    table = pd.DataFrame([r for label, path in pairs for r in rows(label, path)])
    header = "| " + " | ".join(table.columns) + " |"
    print(header)
    print("|" + "---|" * len(table.columns))
    for _, r in table.iterrows():
        print("| " + " | ".join(str(v) for v in r) + " |")


if __name__ == "__main__":
    main()
