"""build_engine: validate everything cheap first, then build into a temp folder and rename it into place."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.core.host import host_info, library_versions
from compactlm.core.io import atomic_dir, check_output
from compactlm.engines.config import BuildConfig
from compactlm.engines.manifest import Manifest, write_manifest


def model_summary(model_config) -> dict:
    from compactlm.compress.arch import count_params, family_of, shape_of

    shape = shape_of(model_config)
    return {
        "family": family_of(model_config).model_type,
        **dataclasses.asdict(shape),
        "params": count_params(shape),
        "max_position_embeddings": getattr(model_config, "max_position_embeddings", None),
    }


def eos_token_ids(checkpoint: Path, model_config) -> list[int]:
    """End-of-sequence ids, from generation_config.json when there is one (it wins in transformers too)."""
    import json

    value = None
    gen = checkpoint / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
    if value is None:
        value = getattr(model_config, "eos_token_id", None)
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def copy_tokenizer(checkpoint, out: Path) -> bool:
    """Ship the source's tokenizer inside the engine so that an engine folder is all a runtime needs."""
    if not checkpoint.has_tokenizer:
        return False
    from compactlm.compress.checkpoint import load_tokenizer

    load_tokenizer(checkpoint).save_pretrained(out / "tokenizer")
    return True


def check_limits(model_config, config: BuildConfig) -> None:
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos and config.limits.max_seq_len > max_pos:
        raise CompactLMError(
            f"max_seq_len {config.limits.max_seq_len} exceeds the model's max_position_embeddings {max_pos}"
        )


def build_engine(
    checkpoint, out: str | os.PathLike, config: BuildConfig | None = None, overwrite: bool = False
) -> Path:
    """Compile a Hugging Face checkpoint (a path, a bundled name or a resolved Checkpoint) into an engine folder
    with engine.json beside it. The checkpoint is resolved once and handed to the backend as it is."""
    from compactlm.compress.checkpoint import inspect_checkpoint
    from compactlm.engines.registry import get_backend

    config = config or BuildConfig()
    backend = get_backend(config.backend)
    config = dataclasses.replace(config, precision=backend.resolve_precision(config.precision))
    out = check_output(out, overwrite)
    checkpoint = inspect_checkpoint(checkpoint)
    path, model_config = checkpoint.path, checkpoint.config
    check_limits(model_config, config)
    if config.draft is not None and not backend.takes_draft:
        raise CompactLMError(f"the {backend.name} backend takes no draft model (--draft): the cpu backend does")
    backend.check_available(config)
    backend.check_model(model_config, config)
    if checkpoint.quantized is not None:
        backend.check_quantized(checkpoint.quantized, config)

    start = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        has_tokenizer = copy_tokenizer(checkpoint, tmp)
        info = backend.build(checkpoint, tmp, config)
        info.setdefault("eos_token_ids", eos_token_ids(path, model_config))
        info["tokenizer"] = has_tokenizer
        manifest = Manifest(
            backend=backend.name,
            precision=config.precision,
            limits=config.limits,
            tp_size=config.tp_size,
            source={"path": str(path.resolve()), "sha256": checkpoint.sha256(), "record": checkpoint.record},
            model=model_summary(model_config),
            build_seconds=round(time.perf_counter() - start, 2),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            libraries=library_versions(),
            host=host_info(),
            backend_info=info,
        )
        write_manifest(tmp, manifest)
    return out
