"""Cached teacher logits: the teacher's top-k logits for every position of the training set, computed once, so
that distillation never holds the teacher in memory (the mission's third aim).

Layout of a cache folder:
    cache.json                    manifest: teacher, data, sequences, seq_len, top-k, dtypes, token hash
    shard-00000.safetensors ...   "values" [n, seq_len, k] (bf16/fp16), "indices" [n, seq_len, k] (uint16 when
                                  the vocabulary fits, else int32), rows in training-set order
Shards are read memory-mapped, one at a time, only for the rows a batch needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from compactlm.core.errors import CompactLMError

MANIFEST = "cache.json"
VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def token_hash(sequences: torch.Tensor) -> str:
    """Identifies the exact token rows a cache was made for."""
    return hashlib.sha256(sequences.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def cache_teacher_logits(
    teacher,
    sequences: torch.Tensor,
    out: str | os.PathLike,
    *,
    top_k: int = 64,
    shard_rows: int = 256,
    batch_size: int = 4,
    value_dtype: str = "bf16",
    meta: dict | None = None,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Run the teacher over `sequences` and store its top-k logits per position, sharded."""
    from safetensors.torch import save_file

    from compactlm.core.io import atomic_dir

    vocab = teacher.config.vocab_size
    if not 1 <= top_k <= vocab:
        raise CompactLMError(f"--top-k must be between 1 and the vocabulary size ({vocab})")
    if value_dtype not in VALUE_DTYPES:
        raise CompactLMError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}")
    index_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    rows, seq_len = sequences.shape
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards = []
        for shard_start in range(0, rows, shard_rows):
            chunk = sequences[shard_start : shard_start + shard_rows]
            values, indices = [], []
            with torch.inference_mode():
                for start in range(0, len(chunk), batch_size):
                    logits = teacher(input_ids=chunk[start : start + batch_size], use_cache=False).logits
                    top = torch.topk(logits.float(), top_k, dim=-1)
                    values.append(top.values.to(VALUE_DTYPES[value_dtype]))
                    indices.append(top.indices.to(torch.int32).to(index_dtype))
                    if progress:
                        progress("teacher logits", shard_start + min(start + batch_size, len(chunk)), rows)
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"values": torch.cat(values), "indices": torch.cat(indices)}, str(tmp / name))
            shards.append({"file": name, "start": shard_start, "rows": len(chunk)})
        manifest = {
            "format": "compactlm-teacher-cache/1",
            "rows": rows,
            "seq_len": seq_len,
            "top_k": top_k,
            "vocab_size": vocab,
            "value_dtype": value_dtype,
            "index_dtype": str(index_dtype).removeprefix("torch."),
            "token_hash": token_hash(sequences),
            "shards": shards,
            **(meta or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


class TeacherCache:
    """Read access to a cache: `lookup(row_indices)` -> (values, indices) [b, seq_len, k]."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise CompactLMError(f"{self.folder} is not a teacher cache (no {MANIFEST}); make one with cache-logits")
        self.manifest = json.loads(manifest.read_text())
        self._open: dict[str, object] = {}

    def check_matches(self, sequences: torch.Tensor, vocab_size: int) -> None:
        """Refuse a cache made for other token rows or another vocabulary."""
        m = self.manifest
        if m["vocab_size"] != vocab_size:
            raise CompactLMError(f"the teacher cache has vocabulary {m['vocab_size']}, the student {vocab_size}")
        if (m["rows"], m["seq_len"]) != tuple(sequences.shape) or m["token_hash"] != token_hash(sequences):
            raise CompactLMError(
                f"the teacher cache in {self.folder} was made for other training data ({m['rows']} x {m['seq_len']} "
                f"tokens of {m.get('data', '?')}); this run trains on {sequences.shape[0]} x {sequences.shape[1]}: "
                "make the cache with the same --data, --seq-len and --tokens/--steps as the distillation"
            )

    def _shard(self, entry):
        from safetensors import safe_open

        if entry["file"] not in self._open:
            self._open = {entry["file"]: safe_open(str(self.folder / entry["file"]), framework="pt")}
        return self._open[entry["file"]]

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = [], []
        for row in rows.tolist():
            entry = next(s for s in self.manifest["shards"] if s["start"] <= row < s["start"] + s["rows"])
            shard, local = self._shard(entry), row - entry["start"]
            values.append(shard.get_slice("values")[local : local + 1])
            indices.append(shard.get_slice("indices")[local : local + 1].to(torch.int32))
        return torch.cat(values).float(), torch.cat(indices).long()

    def nbytes(self) -> int:
        return sum((self.folder / s["file"]).stat().st_size for s in self.manifest["shards"])
