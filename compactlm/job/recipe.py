"""The job recipe: one YAML file naming every stage's settings (see recipes/smollm2-minitron.yaml).

Sections are dataclasses (below) built on the configs the stages use: `correction:` is a TrainConfig, `distill:`
a DistillRun (TrainConfig + DistillConfig), `students:` PruneTargets, `sweep:` bench's Sweep. A recipe may define
named `budgets`: mappings laid over the base recipe key by key (`--budget full`); `--set a.b=v` lays single values
over that. It is read by compactlm.core.config: an unknown key or an ill-typed value is an error naming the key
and its line, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from compactlm.bench.sweep import Sweep
from compactlm.compress.mixture import Mix, is_mix, parse_mix
from compactlm.compress.prune import PruneTarget
from compactlm.compress.train_config import DistillRun, TrainConfig
from compactlm.core.config import Located, build, default, load_yaml, overlay, part, set_values
from compactlm.core.errors import CompactLMError
from compactlm.engines.generate import GenerateConfig

BASE_BUDGET = "small"
NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
TEACHER = "teacher"
CORRECTED = "teacher-corrected"
RESERVED = (TEACHER, CORRECTED)
"""The names of the teacher as shipped and corrected: no student may take them."""


@dataclass(frozen=True)
class Correction(TrainConfig):
    """Teacher correction (Minitron step 1): CE fine-tuning of the teacher on the distillation data. Its keys are
    TrainConfig's; `tokens: 0` skips it (the teacher is used as shipped)."""

    tokens: int | None = default(TrainConfig, "tokens", 16384)
    save_every: int = default(TrainConfig, "save_every", 10)

    def __post_init__(self):
        if self.tokens != 0:
            super().__post_init__()
            self.require_length()

    @property
    def enabled(self) -> bool:
        return self.tokens != 0


@dataclass(frozen=True)
class Importance:
    """The one importance pass (forward passes only) that every student is pruned from."""

    samples: int = 64
    seq_len: int = 256
    task_samples: int = 128
    """Examples of the task a `depth_metric: task:NAME` student is chosen by (the task's last, see load_task)."""

    def __post_init__(self):
        _positive(self, "samples", "seq_len", "task_samples")


GENERATED = "generated"
"""The name of the job's teacher-generated text in `distill.data`."""


@dataclass(frozen=True)
class Generate(GenerateConfig):
    """Text sampled from the teacher as shipped, on the cpu engine (engines/generate.py): `tokens: 0` makes none.
    Name it `generated` in distill.data to train on it."""

    tokens: int = default(GenerateConfig, "tokens", 0)

    def __post_init__(self):
        if self.tokens != 0:
            super().__post_init__()

    @property
    def enabled(self) -> bool:
        return self.tokens != 0


@dataclass(frozen=True)
class Distill(DistillRun):
    """Retraining every student by distillation from the (corrected) teacher, with the same budget. Its keys are
    TrainConfig's and DistillConfig's, and the teacher cache's."""

    tokens: int | None = default(TrainConfig, "tokens", 24576)
    save_every: int = default(TrainConfig, "save_every", 10)
    teacher_cache: bool = True
    """Cache the teacher's top-k logits once for every student (logit loss only): no teacher in training memory."""
    top_k: int = 64
    data: str | None = None
    """What teacher correction and distillation train on: a source or a mix `a:w,b:w` (compress/mixture.py), where
    `generated` names the job's teacher-generated text (`generate:`); null: the recipe's `data`."""

    def __post_init__(self):
        super().__post_init__()
        self.require_length()
        if self.data is not None and is_mix(self.data):
            try:
                parse_mix(self.data)
            except CompactLMError as exc:
                raise CompactLMError(str(exc), key="data") from exc
        if self.top_k < 1:
            raise CompactLMError(f"distill.top_k must be >= 1, not {self.top_k}", key="top_k")
        if self.teacher_cache and self.loss != "logit":
            raise CompactLMError(
                f"distill.teacher_cache serves the logit loss only (distill.loss is {self.loss!r}): "
                "set teacher_cache: false to distill from the live teacher",
                key="teacher_cache",
            )


@dataclass(frozen=True)
class Evaluate:
    """Held-out perplexity and multiple-choice task accuracy, every model on the same examples."""

    samples: int = 16
    seq_len: int = 512
    tasks: tuple[str, ...] = ("general_knowledge", "social_iqa")
    task_limit: int | None = 100
    general: str | None = "english"
    """A second held-out text, perplexity on the same number of sequences (compactlm.compress.english); null: none."""

    def __post_init__(self):
        _positive(self, "samples", "seq_len")
        if self.task_limit is not None and self.task_limit < 1:
            raise CompactLMError("evaluate.task_limit must be >= 1 (or null: every example)", key="task_limit")
        from compactlm.compress.tasks import resolve_task_names

        try:
            resolve_task_names(list(self.tasks))
        except CompactLMError as exc:
            raise CompactLMError(str(exc), key="tasks") from exc


@dataclass(frozen=True)
class Engines:
    """The engines built for the teacher and every student."""

    backend: str = "cpu"
    precisions: tuple[str, ...] = ("bf16", "int8")

    def __post_init__(self):
        if not self.precisions:
            raise CompactLMError("engines.precisions is empty: give at least one precision", key="precisions")
        from compactlm.engines.registry import get_backend

        try:
            backend = get_backend(self.backend)
        except CompactLMError as exc:
            raise CompactLMError(str(exc), key="backend") from exc
        for precision in self.precisions:
            if precision not in backend.precisions:
                raise CompactLMError(
                    f"engines.precisions: the {self.backend} backend has no precision {precision!r}; "
                    f"it has {', '.join(backend.precisions)}",
                    key="precisions",
                )


@dataclass(frozen=True)
class Draft:
    """Speculative decoding (compactlm/job/draft.py): the teacher's cpu engine with a student as its draft. Each
    student's engine is tried; the one whose proposals the teacher keeps most is timed against the teacher alone and
    built with it into engines/<teacher>-<precision>+draft, ready to serve. `tokens: []` (the default) skips it."""

    tokens: tuple[int, ...] = ()
    """Draft tokens per step to try; the built engine takes the fastest at the first batch size."""
    precision: str | None = None
    """The engine precision it runs on; default the last of engines.precisions."""
    batch_sizes: tuple[int, ...] = (1, 8)
    prompts: int = 8
    """Held-out prompts of the recipe's data the acceptance is measured on, all at once."""
    repeats: int = 2

    def __post_init__(self):
        from compactlm.engines.config import check_draft_tokens

        for k in self.tokens:
            try:
                check_draft_tokens(k)
            except CompactLMError as exc:
                raise CompactLMError(f"draft.tokens: {exc}", key="tokens") from exc
        if len(set(self.tokens)) != len(self.tokens):
            raise CompactLMError(f"draft.tokens {list(self.tokens)} names a value twice", key="tokens")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise CompactLMError("draft.batch_sizes: give one or more sizes >= 1", key="batch_sizes")
        _positive(self, "prompts", "repeats")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


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
    out: str | None = None
    """The run folder; default runs/<name>-<budget>."""
    correction: Correction = field(default_factory=Correction)
    importance: Importance = field(default_factory=Importance)
    students: dict[str, PruneTarget] = field(default_factory=dict)
    generate: Generate = field(default_factory=Generate)
    distill: Distill = field(default_factory=Distill)
    evaluate: Evaluate = field(default_factory=Evaluate)
    engines: Engines = field(default_factory=Engines)
    sweep: Sweep = field(default_factory=Sweep)
    draft: Draft = field(default_factory=Draft)
    report: Report = field(default_factory=Report)
    budget: str = field(default=BASE_BUDGET, metadata={"config": False})
    source: str = field(default="", metadata={"config": False})
    """The recipe file, for the record."""
    overrides: tuple[str, ...] = field(default=(), metadata={"config": False})
    """The --set values laid over it."""

    def __post_init__(self):
        if not NAME.match(self.name):
            raise CompactLMError(f"recipe name {self.name!r}: use lowercase letters, digits, '-' and '_'", key="name")
        if not self.students:
            raise CompactLMError("the recipe names no students: give at least one under `students:`", key="students")
        for name in self.students:
            if not NAME.match(name) or name in RESERVED:
                raise CompactLMError(
                    f"student name {name!r}: use lowercase letters, digits, '-' and '_' "
                    f"(and not {' or '.join(RESERVED)})",
                    key=f"students.{name}",
                )
        named = GENERATED in sources(self.train_data)
        if named and not self.generate.enabled:
            raise CompactLMError(
                "distill.data names `generated`, but generate.tokens is 0: give generate.tokens", key="distill.data"
            )
        if self.generate.enabled and not named:
            raise CompactLMError(
                "generate.tokens is set, but distill.data does not name `generated`: nothing would read it",
                key="generate.tokens",
            )
        if named:
            self._check_generated_share()
        if self.sweep.engines:
            raise CompactLMError(
                "sweep.engines: the job benchmarks the engines it builds; leave `engines` out", key="sweep.engines"
            )
        if self.draft.enabled:
            self._check_draft()
        if self.report.shape is not None and tuple(self.report.shape) not in {tuple(s) for s in self.sweep.shapes}:
            raise CompactLMError(
                f"report.shape {list(self.report.shape)} is not one of sweep.shapes", key="report.shape"
            )
        if self.report.batch_size is not None and self.report.batch_size not in self.sweep.batch_sizes:
            raise CompactLMError(
                f"report.batch_size {self.report.batch_size} is not one of sweep.batch_sizes", key="report.batch_size"
            )

    def _check_draft(self) -> None:
        if self.engines.backend != "cpu":
            raise CompactLMError(
                f"draft: speculative decoding runs on the cpu engine; engines.backend is {self.engines.backend!r} "
                "(give draft.tokens: [] to skip it)",
                key="draft.tokens",
            )
        if self.draft.precision is not None and self.draft.precision not in self.engines.precisions:
            raise CompactLMError(
                f"draft.precision {self.draft.precision!r} is not one of engines.precisions "
                f"{list(self.engines.precisions)}",
                key="draft.precision",
            )

    @property
    def draft_precision(self) -> str:
        """The engine precision the draft stage runs on."""
        return self.draft.precision or self.engines.precisions[-1]

    def _check_generated_share(self) -> None:
        """The generated text's share of the longest training read fits in its train split (90% of it, by the
        hash split; 85% asked, for the split's spread), so an undersized generation fails here, not after it."""
        from compactlm.compress.data import HELDOUT_PERCENT

        mix = parse_mix(self.train_data) if is_mix(self.train_data) else Mix(((GENERATED, 1.0),))
        share = dict(mix.parts)[GENERATED] / sum(w for _, w in mix.parts)
        reads = [self.distill.planned_tokens()]
        if self.correction.enabled:
            reads.append(self.correction.planned_tokens())
        need = math.ceil(share * max(reads))
        usable = int(self.generate.tokens * (100 - HELDOUT_PERCENT - 5) / 100)
        if need > usable:
            raise CompactLMError(
                f"generate.tokens {self.generate.tokens:,} is too few: training reads {need:,} tokens of `generated` "
                f"({share:.0%} of {max(reads):,}) and its train split holds ~{usable:,}; give generate.tokens >= "
                f"{math.ceil(need * 100 / (100 - HELDOUT_PERCENT - 5)):,}",
                key="generate.tokens",
            )

    @property
    def train_data(self) -> str:
        """What correction and distillation train on (distill.data, else data)."""
        return self.distill.data if self.distill.data is not None else self.data

    @property
    def headline(self) -> tuple[int, int, int]:
        """(ISL, OSL, batch size) of the report's headline throughput, in the sweep's scaled lengths."""
        shape = self.report.shape or self.sweep.shapes[0]
        isl, osl = (max(1, v // self.sweep.scale) for v in shape)
        return isl, osl, self.report.batch_size or max(self.sweep.batch_sizes)

    def default_out(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.name}-{self.budget}"


def sources(data: str) -> list[str]:
    """The sources a data value names (one, or every source of a mix)."""
    return [name for name, _ in parse_mix(data).parts] if is_mix(data) else [data]


def model_names(recipe: JobRecipe) -> list[str]:
    """Every model evaluated: the teacher as shipped, the corrected teacher, the students."""
    return [TEACHER, *([CORRECTED] if recipe.correction.enabled else []), *recipe.students]


def engine_models(recipe: JobRecipe) -> list[str]:
    """Every model compiled and benchmarked: the teacher the students came from, and the students."""
    return [CORRECTED if recipe.correction.enabled else TEACHER, *recipe.students]


def load_job_recipe(path: str | Path, budget: str = BASE_BUDGET, overrides: list[str] | None = None) -> JobRecipe:
    """Read, lay `budget` and `--set` overrides over, check and build the recipe."""
    path = Path(path).expanduser()
    located = load_yaml(path, "recipe")
    budgets = located.data.get("budgets") or {}
    if not isinstance(budgets, dict):
        raise CompactLMError(f"{located.at('budgets')}: budgets must map a budget name to settings")
    base = Located({k: v for k, v in located.data.items() if k != "budgets"}, located.where, located.origin)
    if budget != BASE_BUDGET:
        if budget not in budgets:
            known = ", ".join([BASE_BUDGET, *budgets])
            raise CompactLMError(f"recipe {path} has no budget {budget!r}; it has: {known}")
        base = overlay(base, part(located, f"budgets.{budget}"))
    if overrides:
        base = overlay(base, set_values(overrides))
    recipe = build(JobRecipe, base, what="the recipe")
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


def _positive(obj, *names: str) -> None:
    section = type(obj).__name__.lower()
    for name in names:
        if getattr(obj, name) < 1:
            raise CompactLMError(f"{section}.{name} must be >= 1, not {getattr(obj, name)}", key=name)
