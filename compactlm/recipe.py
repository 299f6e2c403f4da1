"""The job recipe: one YAML file naming every stage's settings (see recipes/smollm2-minitron.yaml).

Sections map onto dataclasses (below) and onto the configs the stages already use (PruneTarget, bench's Sweep).
A recipe may define named `budgets`: mappings laid over the base recipe key by key (`--budget full`);
`--set a.b=v` lays single values over that. Every key is checked: an unknown key or an ill-typed value is an
error naming the key and its line, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.sweep import Sweep, parse_sweep
from compress.errors import CompactLMError
from compress.prune import PruneTarget
from compress.recipe import read_yaml

BASE_BUDGET = "small"
NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
RESERVED = ("teacher", "teacher-corrected")


@dataclass(frozen=True)
class Training:
    """A training run's length and schedule (the paper's: lr 1e-4 cosine to 1e-5 after a warm-up)."""

    tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-4
    min_lr: float = 1e-5

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size")
        if self.tokens < 0:
            raise CompactLMError(f"{type(self).__name__.lower()}.tokens must be >= 0")


@dataclass(frozen=True)
class Correction(Training):
    """Teacher correction (Minitron step 1): CE fine-tuning of the teacher on the distillation data.
    `tokens: 0` skips it (the teacher is used as shipped)."""


@dataclass(frozen=True)
class Importance:
    """The one importance pass (forward passes only) that every student is pruned from."""

    samples: int = 64
    seq_len: int = 256

    def __post_init__(self):
        _positive(self, "samples", "seq_len")


@dataclass(frozen=True)
class Distill(Training):
    """Retraining every student by distillation from the (corrected) teacher, with the same budget."""

    tokens: int = 24576
    loss: str = "logit"
    """logit | logit+hidden | logit+hidden+embedding | auto | ce (see compress distill)."""
    temperature: float = 1.0
    teacher_cache: bool = True
    """Cache the teacher's top-k logits once for every student (logit loss only): no teacher in training memory."""
    top_k: int = 64

    def __post_init__(self):
        _positive(self, "tokens", "seq_len", "batch_size", "top_k")
        from compress.distill import DistillConfig

        DistillConfig(loss=self.loss, temperature=self.temperature)  # its own checks
        if self.teacher_cache and self.loss != "logit":
            raise CompactLMError(
                f"distill.teacher_cache serves the logit loss only (distill.loss is {self.loss!r}): "
                "set teacher_cache: false to distill from the live teacher"
            )


@dataclass(frozen=True)
class Evaluate:
    """Held-out perplexity and multiple-choice task accuracy, every model on the same examples."""

    samples: int = 16
    seq_len: int = 512
    tasks: tuple[str, ...] = ("general_knowledge", "social_iqa")
    task_limit: int | None = 100

    def __post_init__(self):
        _positive(self, "samples", "seq_len")
        if self.task_limit is not None and self.task_limit < 1:
            raise CompactLMError("evaluate.task_limit must be >= 1 (or null: every example)")
        from compress.tasks import resolve_task_names

        resolve_task_names(list(self.tasks))


@dataclass(frozen=True)
class Engines:
    """The engines built for the teacher and every student."""

    backend: str = "cpu"
    precisions: tuple[str, ...] = ("bf16", "int8")

    def __post_init__(self):
        if not self.precisions:
            raise CompactLMError("engines.precisions is empty: give at least one precision")
        from engines.registry import get_backend

        backend = get_backend(self.backend)
        for precision in self.precisions:
            if precision not in backend.precisions:
                raise CompactLMError(
                    f"engines.precisions: the {self.backend} backend has no precision {precision!r}; "
                    f"it has {', '.join(backend.precisions)}"
                )


@dataclass(frozen=True)
class Report:
    """Where the report's headline table reads throughput: one shape and one batch size of the sweep."""

    shape: tuple[int, int] | None = None
    """[ISL, OSL]; default the sweep's first shape."""
    batch_size: int | None = None
    """Default: the sweep's largest batch size."""


@dataclass(frozen=True)
class JobRecipe:
    name: str
    teacher: str = "smollm2-135m"
    data: str = "python-docs"
    seed: int = 0
    out: str | None = None
    """The run folder; default runs/<name>-<budget>."""
    correction: Correction = field(default_factory=Correction)
    importance: Importance = field(default_factory=Importance)
    students: dict[str, PruneTarget] = field(default_factory=dict)
    distill: Distill = field(default_factory=Distill)
    evaluate: Evaluate = field(default_factory=Evaluate)
    engines: Engines = field(default_factory=Engines)
    sweep: Sweep = field(default_factory=Sweep)
    report: Report = field(default_factory=Report)
    budget: str = BASE_BUDGET
    source: str = ""
    """The recipe file, for the record."""
    overrides: tuple[str, ...] = ()
    """The --set values laid over it."""

    def __post_init__(self):
        if not NAME.match(self.name):
            raise CompactLMError(f"recipe name {self.name!r}: use lowercase letters, digits, '-' and '_'")
        if not self.students:
            raise CompactLMError("the recipe names no students: give at least one under `students:`")
        for name in self.students:
            if not NAME.match(name) or name in RESERVED:
                raise CompactLMError(
                    f"student name {name!r}: use lowercase letters, digits, '-' and '_' "
                    f"(and not {' or '.join(RESERVED)})"
                )
        if self.sweep.engines:
            raise CompactLMError("sweep.engines: the job benchmarks the engines it builds; leave `engines` out")
        if self.report.shape is not None and tuple(self.report.shape) not in {tuple(s) for s in self.sweep.shapes}:
            raise CompactLMError(f"report.shape {list(self.report.shape)} is not one of sweep.shapes")
        if self.report.batch_size is not None and self.report.batch_size not in self.sweep.batch_sizes:
            raise CompactLMError(f"report.batch_size {self.report.batch_size} is not one of sweep.batch_sizes")

    @property
    def headline(self) -> tuple[int, int, int]:
        """(ISL, OSL, batch size) of the report's headline throughput, in the sweep's scaled lengths."""
        shape = self.report.shape or self.sweep.shapes[0]
        isl, osl = (max(1, v // self.sweep.scale) for v in shape)
        return isl, osl, self.report.batch_size or max(self.sweep.batch_sizes)

    def default_out(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.name}-{self.budget}"


SECTIONS = {
    "correction": Correction,
    "importance": Importance,
    "distill": Distill,
    "evaluate": Evaluate,
    "engines": Engines,
    "report": Report,
}
TOP_LEVEL = {"name", "teacher", "data", "seed", "out", "students", "sweep", "budgets", *SECTIONS}


def load_job_recipe(path: str | Path, budget: str = BASE_BUDGET, overrides: list[str] | None = None) -> JobRecipe:
    """Read, lay `budget` and `--set` overrides over, check and build the recipe."""
    path = Path(path).expanduser()
    node, data = read_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise CompactLMError(f"recipe {path} must be a mapping (name:, teacher:, students:, ...)")
    lines = _lines(node)
    where = {key: f"{path}:{line}" for key, line in lines.items()}
    budgets = data.pop("budgets", None) or {}
    if not isinstance(budgets, dict):
        raise CompactLMError(f"{where.get('budgets', path)}: budgets must map a budget name to settings")
    if budget != BASE_BUDGET:
        if budget not in budgets:
            known = ", ".join([BASE_BUDGET, *budgets])
            raise CompactLMError(f"recipe {path} has no budget {budget!r}; it has: {known}")
        prefix = f"budgets.{budget}."
        overlay = {k[len(prefix) :]: v for k, v in where.items() if k.startswith(prefix)}
        _merge(data, budgets[budget] or {}, where, overlay, "")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CompactLMError(f"--set {item!r}: write it as section.key=value (e.g. distill.tokens=40960)")
        value = yaml.safe_load(text)
        overlay = {key.strip(): f"--set {item}"}
        _merge(data, _nested(key.strip().split("."), value), where, overlay, "")
    recipe = _build(data, where, str(path))
    return dataclasses.replace(recipe, budget=budget, source=str(path), overrides=tuple(overrides or ()))


def command_line(recipe: JobRecipe, out: Path | None = None) -> str:
    """The `compactlm run` command that runs this recipe."""
    import shlex

    args = ["compactlm", "run", recipe.source]
    if recipe.budget != BASE_BUDGET:
        args += ["--budget", recipe.budget]
    for item in recipe.overrides:
        args += ["--set", item]
    if out is not None:
        args += ["--out", str(out)]
    return " ".join(shlex.quote(a) for a in args)


def _lines(node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> line (1-based) for every mapping key of a YAML node tree."""
    found = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{prefix}{key.value}"
            found[dotted] = key.start_mark.line + 1
            found.update(_lines(value, dotted + "."))
    return found


def _nested(keys: list[str], value) -> dict:
    return {keys[0]: _nested(keys[1:], value)} if len(keys) > 1 else {keys[0]: value}


def _merge(base: dict, overlay: dict, where: dict, overlay_where: dict, prefix: str) -> None:
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if dotted in overlay_where:
            where[dotted] = overlay_where[dotted]
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, where, overlay_where, dotted + ".")
        else:
            base[key] = value
            for sub, origin in overlay_where.items():
                if sub.startswith(dotted + "."):
                    where[sub] = origin


def _unknown(key: str, known, where: str, what: str, context: str = "") -> CompactLMError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CompactLMError(f"{where}: unknown {what} {key!r}{context}{hint}; known: {', '.join(sorted(known))}")


def _build(data: dict, where: dict, origin: str) -> JobRecipe:
    values = {}
    for key, value in data.items():
        at = where.get(str(key), origin)
        if key not in TOP_LEVEL:
            raise _unknown(str(key), TOP_LEVEL, at, "recipe key")
        if key in SECTIONS:
            values[key] = _section(SECTIONS[key], value or {}, where, origin, key)
        elif key == "students":
            values[key] = _students(value, where, origin)
        elif key == "sweep":
            if not isinstance(value, dict):
                raise CompactLMError(f"{at}: sweep must be a mapping of sweep fields (shapes, batch_sizes, ...)")
            values[key] = parse_sweep(value, {k: where.get(f"sweep.{k}", at) for k in value}, origin)
        else:
            hint = JobRecipe.__dataclass_fields__[key].type
            values[key] = _typed(value, hint, at, key)
    if "name" not in values:
        raise CompactLMError(f"{origin}: the recipe needs a `name:` (it names the run folder)")
    return _checked(JobRecipe, values, where, origin, "")


def _section(cls, value, where: dict, origin: str, name: str):
    at = where.get(name, origin)
    if not isinstance(value, dict):
        raise CompactLMError(f"{at}: {name} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, item in value.items():
        key_at = where.get(f"{name}.{key}", at)
        if key not in hints:
            raise _unknown(str(key), hints, key_at, f"{name} key")
        values[key] = _typed(item, hints[key], key_at, f"{name}.{key}")
    return _checked(cls, values, where, origin, name + ".")


def _students(value, where: dict, origin: str) -> dict[str, PruneTarget]:
    at = where.get("students", origin)
    if not isinstance(value, dict):
        raise CompactLMError(f"{at}: students must map a student name to its pruning target")
    hints = typing.get_type_hints(PruneTarget)
    students = {}
    for name, target in value.items():
        name_at = where.get(f"students.{name}", at)
        if not isinstance(target, dict) or not target:
            raise CompactLMError(f"{name_at}: student {name!r} needs a target, e.g. {{num_layers: 16}}")
        fields = {}
        for key, item in target.items():
            key_at = where.get(f"students.{name}.{key}", name_at)
            if key not in hints:
                raise _unknown(str(key), hints, key_at, "pruning target key", f" for student {name!r}")
            fields[key] = _typed(item, hints[key], key_at, f"students.{name}.{key}")
        students[str(name)] = _checked(PruneTarget, fields, {}, name_at, "")
    return students


def _checked(cls, values: dict, where: dict, origin: str, prefix: str):
    """Build the dataclass; its own validation errors get the line of the key they name, if any."""
    try:
        return cls(**values)
    except CompactLMError as exc:
        named = [k for k in values if re.search(rf"\b{re.escape(prefix + k)}\b|--{k.replace('_', '-')}\b", str(exc))]
        at = where.get(prefix + named[0]) if named else None
        raise CompactLMError(f"{at or origin}: {exc}") from exc


def _typed(value, hint, at: str, key: str):
    """`value` checked against a type hint (int, float, str, bool, tuple[...], X | None); tuples from lists."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _typed(value, option, at, key)
            except CompactLMError:
                continue
        raise CompactLMError(f"{at}: {key} must be {_describe(hint)}, not {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise CompactLMError(f"{at}: {key} must be a list ({_describe(hint)}), not {value!r}")
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise CompactLMError(f"{at}: {key} must have {len(items)} items, not {len(value)}")
        return tuple(_typed(v, t, at, key) for v, t in zip(value, items, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise CompactLMError(f"{at}: {key} must be {_describe(hint)}, not {value!r}")
        return value
    return value


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        hint, str(hint)
    )


def _positive(obj, *names: str) -> None:
    section = type(obj).__name__.lower()
    for name in names:
        if getattr(obj, name) < 1:
            raise CompactLMError(f"{section}.{name} must be >= 1, not {getattr(obj, name)}")
