"""Measure what `engines build --backend trtllm` writes for real checkpoints: fp16 and fp8 (ModelOpt unified)
checkpoint folders read back on CPU against their source (max |dlogit| for fp16, held-out loss delta for fp8), at
tp 1 and tp 3. Usage: python docs/engines/trtllm_current.py OUT.json CHECKPOINT [CHECKPOINT ...]"""

import json
import sys
import tempfile
import time
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.engines import BuildConfig, Limits, build_engine

LIMITS = Limits(max_batch_size=32, max_input_len=128, max_seq_len=256, max_num_tokens=2048)


def main(out: str, *checkpoints: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in checkpoints:
            for precision, tp in (("fp16", 1), ("fp8", 1), ("fp16", 3)):
                start = time.perf_counter()
                config = BuildConfig(backend="trtllm", precision=precision, tp_size=tp, limits=LIMITS)
                try:
                    folder = build_engine(checkpoint, Path(tmp) / f"e{len(rows)}", config)
                except CompactLMError as exc:  # e.g. tp 3 on an MLP width it does not divide
                    rows.append(
                        {"checkpoint": Path(checkpoint).name, "precision": precision, "tp": tp, "refused": str(exc)}
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                info = json.loads((folder / "engine.json").read_text())["backend_info"]
                check = info["verification"]
                row = {
                    "checkpoint": Path(checkpoint).name,
                    "precision": precision,
                    "tp": tp,
                    "max_logit_error": check["max_logit_error"],
                    "mean_kl": check["mean_kl"],
                    "source_loss": check["source_loss"],
                    "loss_delta": check["loss_delta"],
                    "top1_agreement": check["top1_agreement"],
                    "tokens": check["tokens"],
                    "seconds": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
