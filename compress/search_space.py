"""The architecture search space: every uniform architecture within a parameter budget, deployable by construction.

An architecture is a `PruneTarget` of the source model: layers (depth), hidden size (width), MLP size (ffn) and
attention heads with their KV groups (heads). Each axis runs on a grid from the original size down to
`min_fraction` of it in steps of `step` (fractions of the original), rounded to deployable sizes:

- head_dim is kept (pruning never changes it) and heads are a whole number of KV groups with at most the
  model's heads per group, so grouped-query attention stays valid;
- hidden and MLP sizes are multiples of `multiple_of` (16: FP8 GEMMs and the int4 group sizes of both
  engines need it), and the hidden size is a multiple of the head count when the config class the checkpoint
  loads with insists on it (transformers' LlamaConfig does, even with head_dim set);
- each candidate is checked by `compactlm.compress.prune.plan`, the same check `compress prune` runs.

Parameters are counted analytically (`compactlm.compress.arch.count_params`, embeddings counted once when tied), so
enumerating thousands of shapes costs milliseconds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from compactlm.compress.arch import ModelShape, count_params, shape_of, validate_config
from compactlm.compress.prune import PruneTarget, plan
from compactlm.core.errors import CompactLMError

AXES = ("depth", "width", "heads", "ffn")
ALIASES = {"layers": "depth", "hidden": "width", "embedding": "width", "mlp": "ffn", "attention": "heads"}
AXIS_WORDS = {
    "depth": "layers",
    "width": "hidden size",
    "heads": "attention heads",
    "ffn": "MLP size",
}


def parse_axes(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'depth,width' -> ('depth', 'width'), aliases resolved, order as in AXES."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    resolved = {ALIASES.get(n, n) for n in names}
    unknown = sorted(resolved - set(AXES))
    if unknown or not resolved:
        raise CompactLMError(
            f"unknown search axis {', '.join(unknown) or '(none given)'}; axes: {', '.join(AXES)} "
            f"(aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())})"
        )
    return tuple(a for a in AXES if a in resolved)


def parse_budget(text: str | float | int) -> float:
    """'50%' -> 0.5; '67M' / '1.2B' / '67000000' -> an absolute count; a bare number below 1 -> a fraction."""
    if isinstance(text, (int, float)):
        return float(text)
    raw = str(text).strip().upper().replace("_", "").replace(",", "")
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100
            if not 0 < value < 1:
                raise CompactLMError(f"the budget {text!r} must be a percentage between 0% and 100% of the model")
            return value
        for suffix, scale in (("K", 1e3), ("M", 1e6), ("B", 1e9)):
            if raw.endswith(suffix):
                return float(raw[:-1]) * scale
        value = float(raw)
    except ValueError as exc:
        raise CompactLMError(f"cannot read the budget {text!r}: give a percentage (50%), a count (67M) or 0.5") from exc
    if value <= 0 or value != value:
        raise CompactLMError(f"the budget {text!r} must be positive")
    return value


@dataclass(frozen=True)
class SearchSpace:
    """The grid and the budget."""

    params: float
    """Target parameters: a fraction of the model's (below 1) or an absolute count."""
    tolerance: float = 0.05
    """Accepted distance from the target, as a fraction of the target (0.05: within +-5% of it)."""
    axes: tuple[str, ...] = AXES
    step: float = 0.125
    """Grid step of every axis, as a fraction of the original size."""
    min_fraction: float = 0.25
    """No axis goes below this fraction of its original size."""
    multiple_of: int = 16
    """Hidden and MLP sizes are multiples of this (FP8 GEMMs and int4 groups need 16)."""

    def __post_init__(self):
        if self.params <= 0:
            raise CompactLMError(f"--params must be positive, not {self.params}")
        if not 0 <= self.tolerance < 1:
            raise CompactLMError(f"--tolerance must be between 0% and 100%, not {self.tolerance:.0%}")
        if not 0 < self.step <= 0.5:
            raise CompactLMError(f"--step must be in (0, 50%], not {self.step:.1%}")
        if not 0 < self.min_fraction <= 1:
            raise CompactLMError(f"--min-fraction must be in (0, 100%], not {self.min_fraction:.0%}")
        if self.multiple_of < 1:
            raise CompactLMError("--multiple-of must be a positive integer")
        object.__setattr__(self, "axes", parse_axes(self.axes))

    def target_params(self, total: int) -> float:
        return self.params * total if self.params < 1 else self.params


@dataclass(frozen=True)
class Candidate:
    """One architecture of the search space."""

    name: str
    target: PruneTarget
    shape: ModelShape
    params: int
    fraction: float
    """params / the source model's params."""

    def row(self) -> dict:
        s = self.shape
        return {
            "candidate": self.name,
            "layers": s.num_layers,
            "hidden": s.hidden_size,
            "ffn": s.ffn_hidden_size,
            "heads": s.num_attention_heads,
            "kv_groups": s.num_query_groups,
            "params": self.params,
            "params_fraction": round(self.fraction, 4),
        }


def candidate_name(shape: ModelShape) -> str:
    return (
        f"L{shape.num_layers}-d{shape.hidden_size}-f{shape.ffn_hidden_size}"
        f"-h{shape.num_attention_heads}g{shape.num_query_groups}"
    )


def grid(original: int, unit: int, step: float, min_fraction: float) -> list[int]:
    """original x (1, 1 - step, 1 - 2 step, ... >= min_fraction), each rounded to the nearest multiple of `unit`
    (at least `unit`); the original itself is always first. Descending, without repeats."""
    values = [original]
    for i in itertools.count(1):
        fraction = 1 - i * step
        if fraction < min_fraction - 1e-9:
            break
        value = max(unit, int(round(original * fraction / unit)) * unit)
        if value < original and value not in values:
            values.append(value)
    return values


def head_options(shape: ModelShape, axes: tuple[str, ...], step: float, min_fraction: float) -> list[tuple[int, int]]:
    """(heads, groups) pairs: whole KV groups dropped (GQA group pruning), or heads dropped within every group."""
    groups, per_group = shape.num_query_groups, shape.num_attention_heads // shape.num_query_groups
    if "heads" not in axes:
        return [(shape.num_attention_heads, groups)]
    options = [(g * per_group, g) for g in grid(groups, 1, step, min_fraction)]
    options += [(groups * p, groups) for p in grid(per_group, 1, step, min_fraction)]
    return list(dict.fromkeys(options))


def _hidden_unit(config, heads: int, multiple_of: int) -> int:
    """multiple_of, or lcm(multiple_of, heads) when the config class refuses hidden % heads != 0."""
    if multiple_of % heads == 0:
        return multiple_of
    probe = config.to_dict() | {"hidden_size": multiple_of * heads + multiple_of, "num_attention_heads": heads}
    probe["num_key_value_heads"] = math.gcd(heads, probe.get("num_key_value_heads") or heads)
    try:
        validate_config(probe, type(config))
    except CompactLMError:
        return math.lcm(multiple_of, heads)
    return multiple_of


def axis_grids(config, space: SearchSpace) -> dict:
    """The values each axis takes (a non-searched axis keeps the original size)."""
    shape = shape_of(config)
    on = space.axes
    heads = head_options(shape, on, space.step, space.min_fraction)
    return {
        "depth": grid(shape.num_layers, 1, space.step, space.min_fraction) if "depth" in on else [shape.num_layers],
        "heads": heads,
        "width": {
            h: (
                grid(shape.hidden_size, _hidden_unit(config, h, space.multiple_of), space.step, space.min_fraction)
                if "width" in on
                else [shape.hidden_size]
            )
            for h, _ in heads
        },
        "ffn": grid(shape.ffn_hidden_size, space.multiple_of, space.step, space.min_fraction)
        if "ffn" in on
        else [shape.ffn_hidden_size],
    }


def _shapes(config, space: SearchSpace):
    shape = shape_of(config)
    grids = axis_grids(config, space)
    for layers in grids["depth"]:
        for heads, groups in grids["heads"]:
            for hidden in grids["width"][heads]:
                for ffn in grids["ffn"]:
                    yield replace(
                        shape,
                        num_layers=layers,
                        hidden_size=hidden,
                        ffn_hidden_size=ffn,
                        num_attention_heads=heads,
                        num_query_groups=groups,
                    )


def _target(source: ModelShape, shape: ModelShape) -> PruneTarget:
    changed = lambda new, old: new if new != old else None  # noqa: E731
    return PruneTarget(
        hidden_size=changed(shape.hidden_size, source.hidden_size),
        ffn_hidden_size=changed(shape.ffn_hidden_size, source.ffn_hidden_size),
        num_attention_heads=changed(shape.num_attention_heads, source.num_attention_heads),
        num_query_groups=changed(shape.num_query_groups, source.num_query_groups),
        num_layers=changed(shape.num_layers, source.num_layers),
    )


def enumerate_candidates(config, space: SearchSpace) -> list[Candidate]:
    """Every deployable architecture on the grid within the budget, closest to the target first.

    Raises a CompactLMError that says which axis bounds the budget when none is.
    """
    source = shape_of(config)
    if source.num_experts:
        raise CompactLMError(
            f"the architecture search covers dense models; this {config.model_type} is a mixture of experts: prune "
            "it with explicit sizes (--num-experts, --moe-ffn-hidden-size, --hidden-size, --num-layers)"
        )
    total = count_params(source)
    target = space.target_params(total)
    if target >= total:
        raise CompactLMError(
            f"--params {_describe(target, total)} is not below the model's {count_text(total)} parameters: "
            "nothing to prune"
        )
    low, high = target * (1 - space.tolerance), target * (1 + space.tolerance)
    found = []
    for shape in _shapes(config, space):
        params = count_params(shape)
        if not low <= params <= high or shape == source:
            continue
        prune_target = _target(source, shape)
        plan(config, prune_target)  # the grid is deployable by construction: a refusal here is a bug, let it show
        found.append(Candidate(candidate_name(shape), prune_target, shape, params, params / total))
    if not found:
        raise CompactLMError(budget_problem(config, space))
    return sorted(found, key=lambda c: (abs(c.params - target), c.name))


def count_text(n: float) -> str:
    """134515008 -> '134.5M'; 456000 -> '456k'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _describe(params: float, total: int) -> str:
    return f"{count_text(params)} ({params / total:.1%})"


def _extreme(config, space: SearchSpace, axes: tuple[str, ...]) -> tuple[int, int, ModelShape]:
    """(smallest, largest) parameter count on the grid of `axes`, and the smallest shape."""
    sizes = [(count_params(s), s) for s in _shapes(config, replace(space, axes=axes))]
    smallest = min(sizes, key=lambda x: x[0])
    return smallest[0], max(p for p, _ in sizes), smallest[1]


def budget_problem(config, space: SearchSpace) -> str:
    """Why no architecture meets the budget: which axes bound it, and what would reach it."""
    source = shape_of(config)
    total = count_params(source)
    target = space.target_params(total)
    band = f"{_describe(target, total)} +-{space.tolerance:.0%}"
    smallest, _, shape = _extreme(config, space, space.axes)
    if target * (1 + space.tolerance) < smallest:
        alone = []
        for axis in space.axes:
            low, _, s = _extreme(config, space, (axis,))
            alone.append(
                f"{axis} alone reaches at most -{1 - low / total:.0%} ({_floor(axis, source, s)} at "
                f"--min-fraction {space.min_fraction:.0%})"
            )
        others = [a for a in AXES if a not in space.axes]
        fits = lambda axes: _extreme(config, space, axes)[0] <= target * (1 + space.tolerance)  # noqa: E731
        reach = [(*space.axes, a) for a in others if fits((*space.axes, a))]
        if not reach and others and fits(AXES):
            reach = [AXES]
        embedding = source.vocab_size * source.hidden_size
        hint = (
            f"; add --axes {','.join(reach[0])} to get there"
            if reach
            else f"; nothing gets there on this grid: lower --min-fraction (now {space.min_fraction:.0%})"
        )
        embedding_note = (
            f" (the {count_text(embedding)} embedding table shrinks only with width)"
            if "width" not in space.axes
            else ""
        )
        return (
            f"no architecture meets {band} of {count_text(total)} parameters with axes {','.join(space.axes)}: the "
            f"smallest is {_describe(smallest, total)}; {'; '.join(alone)}{embedding_note}{hint}"
        )
    closest = sorted(_shapes(config, space), key=lambda s: abs(count_params(s) - target))[:2]
    near = ", ".join(f"{candidate_name(s)} {_describe(count_params(s), total)}" for s in closest)
    return (
        f"no architecture on the grid lands within {band}: the closest are {near}; widen --tolerance or use a "
        f"finer --step (now {space.step:.1%})"
    )


def _floor(axis: str, source: ModelShape, smallest: ModelShape) -> str:
    if axis == "depth":
        return f"{smallest.num_layers} of {source.num_layers} layers"
    if axis == "width":
        return f"hidden {smallest.hidden_size} of {source.hidden_size}"
    if axis == "ffn":
        return f"MLP {smallest.ffn_hidden_size} of {source.ffn_hidden_size}"
    return f"{smallest.num_attention_heads} of {source.num_attention_heads} heads"
