"""Lazy re-exports for a package's flat namespace: `from compactlm.compress import prune` imports the module that
defines `prune` only when asked, so that importing a package (or running `compactlm --help`) stays cheap."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """(`__getattr__`, `__all__`) for a package whose names live in the modules `exports` maps them to."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
