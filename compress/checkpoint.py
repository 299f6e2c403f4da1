"""Checkpoints: validated loading, atomic saving, and the `compactlm.json` record written beside the weights."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from compress.errors import CompactLMError

RECORD_FILE = "compactlm.json"
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


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compactlm")
    except PackageNotFoundError:
        return "unknown"


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any heavy work, unless asked to overwrite."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CompactLMError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise CompactLMError(f"the parent folder of {out} does not exist")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success rename it to `out`, on failure remove it.

    An interrupted run leaves no half-written `out`, and an existing `out` is replaced only at the very end.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


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


def inspect_checkpoint(name_or_path: str | os.PathLike):
    """Resolve a model name or path and validate config, family and weight files: cheap, no tensors loaded."""
    from compress.arch import family_of
    from compress.models import resolve

    path = resolve(name_or_path)
    config = read_config(path)
    family_of(config)
    check_weights(path)
    return path, config


def load_model(name_or_path: str | os.PathLike, dtype=None):
    """Load a supported causal LM (checkpoint dir or bundled name) in fp32 on CPU, after validating it; a
    checkpoint quantized by `compress quantize` comes back with its modelopt quantizers (fake-quant)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path, _ = inspect_checkpoint(name_or_path)
    hf_logging.disable_progress_bar()  # our own progress is shown; a bar per load is noise
    try:
        if (path / "modelopt_state.pth").is_file():  # quantized by `compress quantize`: restore its quantizers
            from compress.quantize import load_quantized

            model = load_quantized(path, dtype or torch.float32)
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


def load_tokenizer(name_or_path: str | os.PathLike):
    from transformers import AutoTokenizer

    from compress.models import resolve

    path = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CompactLMError(f"{path} has no usable tokenizer: {str(exc).splitlines()[0]}") from exc


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically: a crash leaves the previous file (or none), never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_record(path: str | os.PathLike) -> dict | None:
    record = Path(path) / RECORD_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def save_checkpoint(
    model,
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None,
    operation: dict,
    extra_files: dict[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a standard HF checkpoint (safetensors) with the tokenizer of `source` and a record.

    `compactlm.json` holds the parent's record plus this `operation` appended to its history, so the lineage
    of a model is read from beside its weights, never inferred from its path. `extra_files` maps a file name
    to a callable that writes it into the folder (e.g. kept indices as safetensors).
    """
    out = Path(out).expanduser()
    parent_record = read_record(source) if source else None
    record = {
        "format": "compactlm/1",
        "compactlm_version": package_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parent": str(Path(source).resolve()) if source else None,
        "history": list(parent_record["history"]) if parent_record else [],
    }
    record["history"].append(operation)
    from transformers.utils import logging as hf_logging

    with atomic_dir(out, overwrite=overwrite) as tmp:
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
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
