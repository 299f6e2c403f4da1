"""The backend interface: what a backend declares (its precisions), the checks it runs before a build, how it
builds an engine folder and how it opens one. Each backend lives in engines/backends/ and keeps its engine
library's import inside its methods."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from compactlm.core.errors import CompactLMError

if TYPE_CHECKING:
    from compactlm.compress.checkpoint import Checkpoint
    from compactlm.engines.config import BuildConfig
    from compactlm.engines.manifest import Manifest
    from compactlm.engines.runtime import Engine


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
        """A checkpoint quantized by `compress quantize` (a ModelOpt unified checkpoint): refused unless the backend
        runs it (trtllm overrides this)."""
        raise CompactLMError(
            f"the checkpoint is quantized with modelopt ({fmt}); the {self.name} backend would read it as a plain "
            f"model and lose the quantization: build it with --backend trtllm "
            f"--precision {fmt}, or build its unquantized parent with this backend's own precisions "
            f"({', '.join(self.precisions)})"
        )

    @abstractmethod
    def build(self, checkpoint: Checkpoint, out: Path, config: BuildConfig) -> dict:
        """Write the engine files into `out` (a fresh temp folder); return backend details for the manifest."""

    takes_draft = False
    """Whether `BuildConfig.draft` (a speculative-decoding draft model) is supported."""

    load_options: tuple[str, ...] = ()
    """Keyword options this backend's `load` takes (`load_engine` passes on only these)."""

    @abstractmethod
    def load(self, path: Path, manifest: Manifest) -> Engine:
        """Open a built engine for generation."""
