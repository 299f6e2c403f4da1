"""The sweep file: which shapes, loads and engines a benchmark run measures.

    shapes: [[128, 128], [128, 2048], [2048, 128], [2048, 2048]]   # ISL/OSL pairs (the common set)
    scale: 8               # divide every length by this (a CPU-sized version of the same sweep)
    input_stdev: 0         # normal spread of input lengths, tokens after scaling (trtllm-bench token-norm-dist)
    output_stdev: 0
    batch_sizes: [1, 8, 32]   # concurrency levels of the batch-size sweep (and the engines' max batch size)
    repeats: 3
    engines: [engines/smol-fp32]   # or a mapping, name: target (an engine folder, http://..., triton://...)
    mode: concurrency      # offline (all at once) | concurrency (batch_sizes) | rate (rates)
    rates: [1, 2, 4]       # requests/s, rate mode
    arrivals: poisson      # or constant
    requests: 32           # measured requests per point (concurrency mode: at least the largest batch size),
                           # or "4x": 4 per in-flight slot (4 x the batch size: whole waves at every batch size)
    warmup: 2              # requests sent first at each point, not counted
    duration: 60           # optional measurement window, seconds (concurrency/rate): requests keep coming
    source: random         # prompt tokens: random ids, or python-docs / linux-docs text (needs a tokenizer)
    slo: {ttft_ms: 1000, tpot_ms: 100}   # goodput counts requests that meet these (also e2e_ms)
    out: results/sweep.parquet

An engine built `--for-sweep sweep.yaml` gets limits that fit every shape here; a benchmark refuses shapes
beyond an engine's limits before it starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from compactlm.core.config import build, load_yaml
from compactlm.core.errors import CompactLMError

DEFAULT_SHAPES = ((128, 128), (128, 2048), (2048, 128), (2048, 2048))
MODES = ("offline", "concurrency", "rate")
ARRIVALS = ("poisson", "constant")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass(frozen=True)
class Sweep:
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    scale: int = 1
    input_stdev: float = 0.0
    output_stdev: float = 0.0
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 1
    engines: tuple[str, ...] = ()
    """Targets: engine folders or server URLs (see compactlm.bench.targets)."""
    source: str = "random"
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, metadata={"config": False})
    names: tuple[str, ...] = field(default=(), metadata={"config": False})
    """A name per engine (the mapping form of `engines`); empty: names come from the engines' manifests."""
    mode: str = "concurrency"
    rates: tuple[float, ...] = ()
    arrivals: str = "poisson"
    requests: int | str = 32
    """Measured requests per point, or "Nx": N times the point's concurrency (concurrency mode)."""
    warmup: int = 2
    duration: float | None = None
    slo: dict = field(default_factory=dict)
    out: str | None = None
    tokenizer: str | None = None
    """A tokenizer folder for remote targets (text sources, vocabulary size)."""
    vocab_size: int | None = None
    """Random prompts' id range for remote targets without a tokenizer."""
    request_timeout: float = 600.0

    @classmethod
    def config_prepare(cls, data: dict) -> dict:
        """The mapping form of `engines` (name: target) gives each engine its name."""
        if "names" in data:
            raise CompactLMError(
                "sweep field 'names': give names with the mapping form of 'engines' (name: target)", key="names"
            )
        if isinstance(data.get("engines"), dict):
            mapping = data.pop("engines")
            if any(not isinstance(v, str) for v in mapping.values()):
                raise CompactLMError(
                    "sweep field 'engines': every engine needs a target string (quote `null` to mean the null engine)",
                    key="engines",
                )
            data["names"], data["engines"] = [str(k) for k in mapping], list(mapping.values())
        return data

    def __post_init__(self):
        if self.scale < 1:
            raise CompactLMError(f"sweep field 'scale' must be >= 1, got {self.scale}", key="scale")
        if not self.shapes:
            raise CompactLMError("sweep field 'shapes' is empty: give at least one [ISL, OSL] pair", key="shapes")
        for shape in self.shapes:
            if len(shape) != 2 or any(not isinstance(v, int) or v < 1 for v in shape):
                raise CompactLMError(
                    f"sweep field 'shapes' takes [ISL, OSL] pairs of positive integers, got {shape}", key="shapes"
                )
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise CompactLMError(
                f"sweep field 'batch_sizes' takes positive integers, got {list(self.batch_sizes)}", key="batch_sizes"
            )
        if self.input_stdev < 0 or self.output_stdev < 0:
            raise CompactLMError("sweep fields 'input_stdev' and 'output_stdev' must be >= 0", key="input_stdev")
        if self.repeats < 1:
            raise CompactLMError(f"sweep field 'repeats' must be >= 1, got {self.repeats}", key="repeats")
        self._check_load()

    def _check_load(self) -> None:
        if self.mode not in MODES:
            raise CompactLMError(f"sweep field 'mode' must be one of {', '.join(MODES)}, got {self.mode!r}", key="mode")
        if self.arrivals not in ARRIVALS:
            raise CompactLMError(
                f"sweep field 'arrivals' must be one of {', '.join(ARRIVALS)}, got {self.arrivals!r}", key="arrivals"
            )
        if self.mode == "rate" and (not self.rates or any(r <= 0 for r in self.rates)):
            raise CompactLMError(
                f"sweep field 'rates' needs positive requests/s in rate mode, got {list(self.rates)}", key="rates"
            )
        if isinstance(self.requests, str):
            if not re.fullmatch(r"[1-9][0-9]*x", self.requests) or self.mode != "concurrency":
                raise CompactLMError(
                    f"sweep field 'requests' takes a count or 'Nx' (N per in-flight request, concurrency mode), "
                    f"got {self.requests!r}",
                    key="requests",
                )
        elif self.requests < 1:
            raise CompactLMError(f"sweep field 'requests' must be >= 1, got {self.requests}", key="requests")
        elif self.mode == "concurrency" and self.duration is None and self.requests < max(self.batch_sizes):
            raise CompactLMError(
                f"sweep field 'requests' ({self.requests}) is below the largest batch size ({max(self.batch_sizes)}): "
                "every point needs at least one full batch",
                key="requests",
            )
        if self.warmup < 0:
            raise CompactLMError(f"sweep field 'warmup' must be >= 0, got {self.warmup}", key="warmup")
        if self.duration is not None and (self.duration <= 0 or self.mode == "offline"):
            raise CompactLMError(
                "sweep field 'duration' must be positive, and needs mode concurrency or rate", key="duration"
            )
        unknown = set(self.slo) - set(SLO_KEYS)
        if unknown:
            raise CompactLMError(
                f"sweep field 'slo' takes {', '.join(SLO_KEYS)}; unknown: {', '.join(sorted(unknown))}", key="slo"
            )
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 for v in self.slo.values()):
            raise CompactLMError(f"sweep field 'slo' takes positive milliseconds, got {self.slo}", key="slo")
        if self.names and len(self.names) != len(self.engines):
            raise CompactLMError("sweep field 'engines': give a name to every engine or to none", key="engines")
        if self.request_timeout <= 0:
            raise CompactLMError(
                f"sweep field 'request_timeout' must be positive, got {self.request_timeout}", key="request_timeout"
            )

    def targets(self) -> list[tuple[str | None, str]]:
        """(name or None, target string) for each engine of the sweep."""
        names = self.names or (None,) * len(self.engines)
        return list(zip(names, self.engines, strict=True))

    def scaled_shapes(self) -> list[tuple[int, int]]:
        """The ISL/OSL pairs actually run: each length divided by `scale` (at least 1 token)."""
        return [(max(1, isl // self.scale), max(1, osl // self.scale)) for isl, osl in self.shapes]

    def max_lengths(self) -> tuple[int, int]:
        """The longest input and the longest sequence (input + output) any request of this sweep can have."""
        from compactlm.bench.workload import WorkloadSpec  # compactlm.bench.workload imports this module

        stdevs = (self.input_stdev, self.output_stdev)
        longest = [WorkloadSpec(isl, osl, *stdevs).max_lengths() for isl, osl in self.scaled_shapes()]
        return max(i for i, _ in longest), max(i + o for i, o in longest)

    def limits(self, max_num_tokens: int | None = None):
        """Engine limits that fit this sweep exactly (`engines build --for-sweep`)."""
        from compactlm.engines.config import Limits

        max_input, max_seq = self.max_lengths()
        return Limits(
            max_batch_size=max(self.batch_sizes),
            max_input_len=max_input,
            max_seq_len=max(max_seq, max_input + 1),
            max_num_tokens=max_num_tokens or max(2048, max_input),
        )


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep file; an unknown or ill-typed field is an error naming the field and its line."""
    return build(Sweep, load_yaml(path, "sweep file", empty_ok=True), what="the sweep file")
