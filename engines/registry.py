"""The backend registry: each backend says which precisions it builds, checks that it can run here and that a
model's shape suits it, builds an engine folder and loads one. Heavy imports stay inside each backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from compress.errors import CompactLMError

if TYPE_CHECKING:
    from engines.config import BuildConfig
    from engines.manifest import Manifest
    from engines.runtime import Engine


class Backend(ABC):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    default_precision: ClassVar[str]
    description: ClassVar[str]

    def resolve_precision(self, precision: str | None) -> str:
        precision = precision or self.default_precision
        if precision not in self.precisions:
            raise CompactLMError(
                f"backend {self.name!r} has no precision {precision!r}; choose from {', '.join(self.precisions)}"
            )
        return precision

    def check_available(self, config: BuildConfig) -> None:  # noqa: B027 - optional hook
        """Raise a CompactLMError naming what is missing (a library, a GPU) when this backend cannot build here."""

    def check_model(self, model_config, config: BuildConfig) -> None:  # noqa: B027 - optional hook
        """Raise a CompactLMError when this backend cannot run the model's shape (caught at build time)."""

    def check_quantized(self, fmt: str, config: BuildConfig) -> None:
        """A checkpoint quantized by `compress quantize` (modelopt fake-quant, smoothing folded into its weights):
        refused unless the backend exports modelopt's scales (trtllm overrides this)."""
        raise CompactLMError(
            f"the checkpoint is quantized with modelopt ({fmt}); the {self.name} backend would read it as a plain "
            f"model and lose (or corrupt, for SmoothQuant and AWQ) the quantization: build it with --backend trtllm "
            f"--precision {fmt}, or build its unquantized parent with this backend's own precisions "
            f"({', '.join(self.precisions)})"
        )

    @abstractmethod
    def build(self, checkpoint: Path, out: Path, config: BuildConfig) -> dict:
        """Write the engine files into `out` (a fresh temp folder); return backend details for the manifest."""

    @abstractmethod
    def load(self, path: Path, manifest: Manifest) -> Engine:
        """Open a built engine for generation."""


BACKENDS: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    # Importing a backend module only registers it: none imports its engine library at module level.
    import engines.openvino_engine  # noqa: F401
    import engines.torch_engine  # noqa: F401
    import engines.trtllm_engine  # noqa: F401


def get_backend(name: str) -> Backend:
    _load_builtin()
    if name not in BACKENDS:
        raise CompactLMError(f"unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def list_backends() -> list[Backend]:
    _load_builtin()
    return [BACKENDS[name] for name in sorted(BACKENDS)]
