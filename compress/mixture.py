"""Data mixtures: several text sources with weights, wherever one source is accepted (`--data`, a recipe's
`distill.data`): `python-docs:0.6,linux-docs:0.2,runs/gen:0.2`, or in YAML a mapping `{python-docs: 0.6, ...}`.

A mix of N sequences takes from each source its share of the rows (weights normalized; the largest remainders
rounded up, so the counts sum to N exactly), each source packed on its own, then interleaves the rows in an order
seeded by `seed`. Each source keeps its own fixed held-out split, so the held-out split of a mix is the mix of the
held-out splits. A source that cannot give its share is an error naming it (never a silent re-weighting).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from compactlm.core.errors import CompactLMError

_PART = re.compile(r"^(?P<source>.+):(?P<weight>[^:]*)$")


@dataclass(frozen=True)
class Mix:
    parts: tuple[tuple[str, float], ...]
    """(source, weight), in the order given; weights >= 0, summing to a positive number."""

    def __str__(self) -> str:
        return ",".join(f"{source}:{weight:g}" for source, weight in self.parts)

    def counts(self, total: int) -> list[int]:
        """Rows of each source in a mix of `total` rows: proportional, largest remainders first, summing to total."""
        weight_sum = sum(w for _, w in self.parts)
        exact = [total * w / weight_sum for _, w in self.parts]
        counts = [math.floor(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
            counts[i] += 1
        return counts


def is_mix(source) -> bool:
    """A mix is a string with a `source:weight` part (a mapping from YAML is turned into one by `mix_string`)."""
    if not isinstance(source, str) or os.path.exists(source):
        return False
    return any(_PART.match(part.strip()) for part in source.split(","))


def parse_mix(source: str) -> Mix:
    """The mix a string names; a clear error for a weight that is not a number >= 0, a repeated source, or weights
    that do not sum to a positive number."""
    parts, seen = [], set()
    for part in source.split(","):
        match = _PART.match(part.strip())
        if not match:
            raise CompactLMError(f"data mix {source!r}: {part.strip()!r} is not SOURCE:WEIGHT")
        name, text = match["source"].strip(), match["weight"].strip()
        try:
            weight = float(text)
        except ValueError:
            raise CompactLMError(f"data mix {source!r}: the weight of {name} ({text!r}) is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise CompactLMError(f"data mix {source!r}: the weight of {name} must be a number >= 0, not {text}")
        if name in seen:
            raise CompactLMError(f"data mix {source!r}: {name} is named twice")
        seen.add(name)
        parts.append((name, weight))
    if not sum(w for _, w in parts) > 0:
        raise CompactLMError(f"data mix {source!r}: the weights must sum to a positive number")
    return Mix(tuple(parts))


def mix_string(value) -> str:
    """A recipe's data value as the one string form: a mapping {source: weight} becomes `source:weight,...`."""
    if isinstance(value, dict):
        if not value:
            raise CompactLMError("a data mix needs at least one source: weight")
        return str(Mix(tuple((str(k), _weight(k, v)) for k, v in value.items())))
    return value


def _weight(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CompactLMError(f"data mix: the weight of {name} must be a number, not {value!r}")
    return float(value)
