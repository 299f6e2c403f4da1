"""engine.json: what an engine was built from, with what, for which shapes, where and when."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from compactlm.core.errors import CompactLMError
from compactlm.engines.config import Limits

MANIFEST = "engine.json"
FORMAT = 1


@dataclass
class Manifest:
    backend: str
    precision: str
    limits: Limits
    tp_size: int
    source: dict
    """path, sha256 of config + weights, and the checkpoint's compactlm.json record (None for a plain HF model)."""
    model: dict
    """family, shape and parameter count of the source model."""
    build_seconds: float = 0.0
    created: str = ""
    libraries: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    backend_info: dict = field(default_factory=dict)
    format: int = FORMAT

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["limits"] = self.limits.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data["limits"] = Limits.from_dict(data["limits"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        params = self.model.get("params")
        size = f"{params / 1e6:.1f}M params, " if params else ""
        text = f"{self.backend}/{self.precision} ({size}{self.model.get('num_layers', '?')} layers)"
        draft = self.backend_info.get("draft")
        if draft:
            model = draft.get("model", {})
            text += f" + draft ({model.get('params', 0) / 1e6:.1f}M params, {model.get('num_layers', '?')} layers)"
        return text


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        if not folder.exists():
            raise CompactLMError(f"{folder} does not exist")
        raise CompactLMError(
            f"{folder} is not a compactlm engine (no {MANIFEST}); build one with `compactlm engines build`"
        )
    try:
        data = json.loads(path.read_text())
        manifest = Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CompactLMError(f"{path} is not a valid engine manifest: {exc}") from exc
    if manifest.format > FORMAT:
        raise CompactLMError(f"{path} has format {manifest.format}; this compactlm reads format <= {FORMAT}: upgrade")
    return manifest
