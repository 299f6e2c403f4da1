"""The sweep file: which shapes, loads and engines a benchmark run measures.

    shapes: [[128, 128], [128, 2048], [2048, 128], [2048, 2048]]   # ISL/OSL pairs (the common set)
    scale: 8               # divide every length by this (a CPU-sized version of the same sweep)
    input_stdev: 0         # normal spread of input lengths, tokens after scaling (trtllm-bench token-norm-dist)
    output_stdev: 0
    batch_sizes: [1, 8, 32]
    repeats: 3
    engines: [engines/smol-fp32]

An engine built `--for-sweep sweep.yaml` gets limits that fit every shape here; a benchmark refuses shapes
beyond an engine's limits before it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from compress.errors import CompactLMError
from compress.recipe import _Loader

DEFAULT_SHAPES = ((128, 128), (128, 2048), (2048, 128), (2048, 2048))
STDEV_HEADROOM = 4  # lengths drawn from N(mean, sd) are clipped to mean +- 4 sd


@dataclass(frozen=True)
class Sweep:
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    scale: int = 1
    input_stdev: float = 0.0
    output_stdev: float = 0.0
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 1
    engines: tuple[str, ...] = ()
    source: str = "random"
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.scale < 1:
            raise CompactLMError(f"sweep field 'scale' must be >= 1, got {self.scale}")
        if not self.shapes:
            raise CompactLMError("sweep field 'shapes' is empty: give at least one [ISL, OSL] pair")
        for shape in self.shapes:
            if len(shape) != 2 or any(not isinstance(v, int) or v < 1 for v in shape):
                raise CompactLMError(f"sweep field 'shapes' takes [ISL, OSL] pairs of positive integers, got {shape}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise CompactLMError(f"sweep field 'batch_sizes' takes positive integers, got {list(self.batch_sizes)}")
        if self.input_stdev < 0 or self.output_stdev < 0:
            raise CompactLMError("sweep fields 'input_stdev' and 'output_stdev' must be >= 0")
        if self.repeats < 1:
            raise CompactLMError(f"sweep field 'repeats' must be >= 1, got {self.repeats}")

    def scaled_shapes(self) -> list[tuple[int, int]]:
        """The ISL/OSL pairs actually run: each length divided by `scale` (at least 1 token)."""
        return [(max(1, isl // self.scale), max(1, osl // self.scale)) for isl, osl in self.shapes]

    def max_lengths(self) -> tuple[int, int]:
        """The longest input and the longest sequence (input + output) any request of this sweep can have."""
        spread_in = math.ceil(STDEV_HEADROOM * self.input_stdev)
        spread_out = math.ceil(STDEV_HEADROOM * self.output_stdev)
        shapes = self.scaled_shapes()
        max_input = max(isl for isl, _ in shapes) + spread_in
        max_seq = max(isl + osl for isl, osl in shapes) + spread_in + spread_out
        return max_input, max_seq

    def limits(self, max_num_tokens: int | None = None):
        """Engine limits that fit this sweep exactly (`engines build --for-sweep`)."""
        from engines.config import Limits

        max_input, max_seq = self.max_lengths()
        return Limits(
            max_batch_size=max(self.batch_sizes),
            max_input_len=max_input,
            max_seq_len=max(max_seq, max_input + 1),
            max_num_tokens=max_num_tokens or max(2048, max_input),
        )


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep file; an unknown or ill-typed field is an error naming the field and its line."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError as exc:
        raise CompactLMError(f"sweep file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise CompactLMError(f"sweep file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CompactLMError(f"sweep file {path} must be a mapping of field: value")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    known = {f.name for f in fields(Sweep)} - {"extra"}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"{path}:{lines.get(str(key), '?')}"
        if name not in known:
            raise CompactLMError(f"{where}: unknown sweep field {key!r}; known fields: {', '.join(sorted(known))}")
        try:
            values[name] = _coerce(name, value)
        except (TypeError, ValueError) as exc:
            raise CompactLMError(f"{where}: sweep field {key!r}: {exc}") from exc
    try:
        return Sweep(**values)
    except CompactLMError as exc:
        raise CompactLMError(f"{path}: {exc}") from exc


def _coerce(name: str, value):
    if name == "shapes":
        if not isinstance(value, list):
            raise TypeError("expected a list of [ISL, OSL] pairs")
        return tuple(tuple(_int(v) for v in pair) for pair in value)
    if name in ("batch_sizes", "engines"):
        if not isinstance(value, list):
            raise TypeError("expected a list")
        return tuple(_int(v) for v in value) if name == "batch_sizes" else tuple(str(v) for v in value)
    if name in ("scale", "repeats", "seed"):
        return _int(value)
    if name in ("input_stdev", "output_stdev"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    return value


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
