"""The backend registry: a backend is found by name and imported on first use, so that listing backends or
opening one engine never imports the other engines' libraries."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.core.errors import CompactLMError

if TYPE_CHECKING:
    from compactlm.engines.backend import Backend
    from compactlm.engines.runtime import Engine

BACKENDS: dict[str, str] = {
    "cpu": "compactlm.engines.backends.openvino.engine:CpuBackend",
    "torch": "compactlm.engines.backends.torch_engine:TorchBackend",
    "trtllm": "compactlm.engines.backends.trtllm.pytorch:TrtllmBackend",
    "trtllm-engine": "compactlm.engines.backends.trtllm.legacy:TrtllmEngineBackend",
}
"""Backend name -> `module:class`; `register` adds one."""
_LOADED: dict[str, Backend] = {}


def register(name: str, target: str) -> None:
    """Make a backend available by name: `target` is `module:class` of a compactlm.engines.backend.Backend."""
    BACKENDS[name] = target
    _LOADED.pop(name, None)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise CompactLMError(f"unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}")
    if name not in _LOADED:
        module, _, cls = BACKENDS[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]


def list_backends() -> list[Backend]:
    return [get_backend(name) for name in sorted(BACKENDS)]


def load_engine(path: str | Path, **options) -> Engine:
    """Open a built engine folder (any backend) for generation. `options` the backend does not take are ignored:
    `recycle=True` runs the cpu backend's pipeline in a worker process that is replaced when it has grown (what a
    long-lived server wants; the other backends do not grow)."""
    from compactlm.engines.manifest import read_manifest

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    backend = get_backend(manifest.backend)
    return backend.load(path, manifest, **{k: v for k, v in options.items() if k in backend.load_options})
