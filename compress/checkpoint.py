"""Checkpoints: a folder resolved and checked once (`Checkpoint`), validated loading, atomic saving, and the
`compactlm.json` record written beside the weights (what was done to the model, never inferred from its path)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from compactlm.compress.record import RECORD_FILE, new_record, read_record
from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def read_config(path: Path):
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CompactLMError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CompactLMError(f"{config_file} is not valid JSON: {exc}") from exc
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CompactLMError(f"{config_file} cannot be read by transformers: {reason}") from exc


def check_weights(path: Path) -> list[Path]:
    """Verify the safetensors weight files exist and their headers parse, without loading the tensors."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError) as exc:
            raise CompactLMError(f"{index} is corrupt: {exc}") from exc
    else:
        # compactlm's own side files (the kept indices of a pruning: compactlm.kept.N.safetensors) are not weights
        files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("compactlm."))
    if not files:
        extra = " (only PyTorch .bin weights found: convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise CompactLMError(f"{path} has no safetensors weights{extra}")
    for file in files:
        if not file.is_file():
            raise CompactLMError(f"weights file {file} listed in the index is missing")
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise CompactLMError(f"weights file {file} is corrupt or truncated ({exc})") from exc
    return files


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder resolved and validated once: its config, family, weight files, record and quantized
    format. Stages and engine builds pass it along instead of re-reading the folder."""

    path: Path
    config: object
    """The transformers config (AutoConfig)."""
    family: str
    """The model family (compactlm.compress.arch), e.g. llama."""
    weights: tuple[Path, ...]
    record: dict | None
    """compactlm.json: the parent, and the history of what was done."""
    quantized: str | None
    """The format `compress quantize` wrote it in (fp8, int8-sq, int4-awq), or None for a plain checkpoint."""

    @classmethod
    def resolve(cls, name_or_path: str | os.PathLike | Checkpoint) -> Checkpoint:
        """A model name or path, resolved (a bundled name is pulled into the cache once) and validated: config,
        family and weight headers; cheap, no tensors loaded."""
        if isinstance(name_or_path, Checkpoint):
            return name_or_path
        from compactlm.compress.arch import family_of
        from compactlm.compress.models import resolve
        from compactlm.compress.quantized import quantized_format

        path = resolve(name_or_path)
        config = read_config(path)
        family = family_of(config).model_type
        weights = tuple(check_weights(path))
        record = read_record(path)
        return cls(path, config, family, weights, record, quantized_format(path, record))

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))

    def check_length(self, tokens: int, what: str) -> None:
        """Refuse a sequence length the model has no positions for (before any data is read or a step is run)."""
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions and tokens > positions:
            raise CompactLMError(
                f"{what} {tokens} is beyond the {positions} positions of {self.path} (max_position_embeddings)"
            )

    def sha256(self) -> str:
        return checkpoint_sha256(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


def inspect_checkpoint(name_or_path: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Resolve a model name or path and validate config, family and weight files: cheap, no tensors loaded."""
    return Checkpoint.resolve(name_or_path)


def checkpoint_sha256(folder: Path) -> str:
    """Content hash of a checkpoint: its config and weight files (names and bytes), in name order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    names = ["config.json"] + sorted(p.name for p in folder.glob("*.safetensors"))
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def load_model(name_or_path: str | os.PathLike | Checkpoint, dtype=None):
    """Load a supported causal LM (checkpoint dir or bundled name) in fp32 on CPU, after validating it; a
    checkpoint quantized by `compress quantize` (a unified HF checkpoint) comes back dequantized, its activations
    rounded as the engine rounds them (compactlm.compress.unified)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    checkpoint = inspect_checkpoint(name_or_path)
    path = checkpoint.path
    hf_logging.disable_progress_bar()  # our own progress is shown; a bar per load is noise
    try:
        if checkpoint.quantized:  # a unified quantized checkpoint: dequantized, never unpickled
            from compactlm.compress.quantized import load_quantized

            model = load_quantized(path, checkpoint.weights, dtype or torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=False)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CompactLMError(f"cannot load the weights in {path}: {reason}") from exc
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    model.compactlm_path = str(path)
    return model


def load_tokenizer(name_or_path: str | os.PathLike | Checkpoint):
    from transformers import AutoTokenizer

    from compactlm.compress.models import resolve

    path = name_or_path.path if isinstance(name_or_path, Checkpoint) else resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CompactLMError(f"{path} has no usable tokenizer: {str(exc).splitlines()[0]}") from exc


def save_checkpoint(
    model,
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None,
    operation: dict,
    extra_files: dict[str, object] | None = None,
    write_weights=None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a standard HF checkpoint (safetensors) with the tokenizer of `source` and a record.

    `compactlm.json` holds the parent's record plus this `operation` appended to its history, so the lineage
    of a model is read from beside its weights, never inferred from its path. `extra_files` maps a file name
    to a callable that writes it into the folder (e.g. kept indices as safetensors). `write_weights(folder)`
    replaces `model.save_pretrained` (the quantized export writes the unified HF checkpoint).
    """
    out = Path(out).expanduser()
    record = new_record(source, operation)
    from transformers.utils import logging as hf_logging

    with atomic_dir(out, overwrite=overwrite) as tmp:
        hf_logging.disable_progress_bar()
        try:
            (write_weights or model.save_pretrained)(tmp)
        finally:
            hf_logging.enable_progress_bar()
        if source:
            # the tokenizer, and the kept-indices files that the history's prune records point to
            carried = [op["kept_indices"] for op in record["history"][:-1] if op.get("kept_indices")]
            for name in (*TOKENIZER_FILES, *carried):
                src_file = Path(source) / name
                if src_file.is_file() and not (tmp / name).exists():
                    shutil.copyfile(src_file, tmp / name)
        for _, write in (extra_files or {}).items():
            write(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
