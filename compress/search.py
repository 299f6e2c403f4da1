"""Architecture search to a parameter budget (Minitron's lightweight NAS), ranked by loss and, optionally, by the
request throughput each candidate's engine measures.

    enumerate (compactlm.compress.search_space) -> one importance pass -> zero-shot screen -> prune + short distillation
    of the K best -> held-out loss -> [engine throughput, Pareto front] -> leaderboard, plot, winner

- Every candidate is pruned from the same importance scores (one pass, with the removal losses of every block
  size the depth grid needs).
- When there are more candidates than `candidates` (K), each is pruned in memory and scored by its held-out
  loss without retraining (the "zero-shot" loss), and K go on: the best of each (layers, heads, KV groups)
  structure first, so the retrained set differs in structure rather than by a few MLP neurons, then the next
  best. Zero-shot loss alone is a poor judge after retraining (the paper's observation), which is why the K
  are retrained before they are ranked.
- Retraining is the distillation job (`compactlm.compress.retrain.distill_checkpoint`, the one training loop) with the
  same data, tokens, schedule and loss for every candidate; by default from cached top-k teacher logits, made
  once, so the teacher runs once for all candidates.
- Throughput (rank_by loss+throughput) comes from a `measure([(checkpoint, engine_dir), ...]) -> [dict, ...]`
  function given by the caller, which times the candidates and the source model interleaved (repeat-major), so
  that a busy machine's drift hits all alike: the benchmark harness lives above compress (bench -> engines ->
  compress), so compress does not import it; the CLI passes `compactlm.bench.candidates.measure_throughput`.

Everything lands in OUT and a re-run resumes: `search.json` (settings; a re-run with other settings that change
results is refused), `scores.safetensors`, `screen.csv` (grown a row at a time), `teacher-cache/`,
`candidates/<name>/{pruned,retrained,result.json,throughput.json}` (each written atomically; finished ones are
skipped), `leaderboard.csv`/`.parquet`, `search.png`, and `winner/`: the winner's pruned checkpoint, ready for
full distillation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from compactlm.compress.checkpoint import inspect_checkpoint, load_model, load_tokenizer
from compactlm.compress.retrain import work_dir_for
from compactlm.compress.search_space import AXES, Candidate, SearchSpace, enumerate_candidates, parse_axes
from compactlm.compress.train_config import DistillConfig, TrainConfig
from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_dir, read_json, write_json

RANK_BY = ("loss", "loss+throughput")
Measure = Callable[[list[tuple[Path, Path]]], list[dict]]
"""measure([(checkpoint, engine_dir), ...]) -> one {"request_throughput": req/s, "output_throughput": tok/s, ...}
per pair, measured interleaved."""


@dataclass
class SearchConfig:
    """What to search and how to judge it."""

    params: float
    """Target parameters: a fraction of the model's (0.5) or an absolute count (67e6)."""
    tolerance: float = 0.05
    """Accepted distance from the target, as a fraction of the target."""
    axes: tuple[str, ...] = AXES
    """Which sizes may change: depth, width (hidden), heads (with KV groups), ffn."""
    candidates: int = 4
    """How many candidates are retrained and ranked (K)."""
    retrain_tokens: int = 16384
    """Short distillation per candidate (the paper: ~1.8B tokens on GPUs; CPU: 10^4-10^5)."""
    rank_by: str = "loss"
    """loss, or loss+throughput: also build each candidate's engine and measure its request throughput."""
    step: float = 0.125
    min_fraction: float = 0.25
    multiple_of: int = 16
    teacher: str | None = None
    """Distillation teacher (default: the searched model itself; a corrected teacher guides better)."""
    data: str = "python-docs"
    seq_len: int = TrainConfig.seq_len
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    min_lr: float = TrainConfig.min_lr
    loss: str = DistillConfig.loss
    """Distillation loss for every candidate (logit: the teacher cache can serve it)."""
    teacher_cache: bool = True
    """Cache the teacher's top-k logits once and distill every candidate from them."""
    top_k: int = 64
    importance_samples: int = 64
    depth_samples: int = 4
    depth_metric: str = "block-loss"
    screen_samples: int = 4
    """Held-out sequences (of seq_len) for the zero-shot screen."""
    eval_samples: int = 16
    """Held-out sequences (of seq_len) the ranking loss is measured on."""
    seed: int = TrainConfig.seed
    isl: int = 128
    osl: int = 128
    batch: int = 8
    """Requests in flight when throughput is measured (offline: all at once)."""
    repeats: int = 3
    engine_precision: str = "fp32"
    loss_slack: float = 0.02
    """loss+throughput: the winner is the fastest candidate on the Pareto front whose held-out loss is within
    this many nats/token of the best."""

    def __post_init__(self):
        from compactlm.compress.depth import DEPTH_METRICS
        from compactlm.compress.train_config import LOSSES

        self.axes = parse_axes(self.axes)
        if self.rank_by not in RANK_BY:
            raise CompactLMError(f"--rank-by must be one of {', '.join(RANK_BY)}, not {self.rank_by!r}")
        for name in ("candidates", "retrain_tokens", "batch_size", "importance_samples", "depth_samples"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("screen_samples", "eval_samples", "isl", "osl", "batch", "repeats", "top_k"):
            if getattr(self, name) < 1:
                raise CompactLMError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.seq_len < 2:
            raise CompactLMError("--seq-len must be at least 2")
        if self.loss not in LOSSES or self.loss == "auto":
            raise CompactLMError(
                f"--loss must be one of {', '.join(x for x in LOSSES if x != 'auto')}: every candidate is retrained "
                "with the same objective, whatever its depth"
            )
        if self.depth_metric not in DEPTH_METRICS:
            raise CompactLMError(f"--depth-metric must be one of {', '.join(DEPTH_METRICS)}")
        if self.loss_slack < 0:
            raise CompactLMError("--loss-slack must be >= 0")
        self.space()  # validates the budget and the grid

    def space(self) -> SearchSpace:
        return SearchSpace(self.params, self.tolerance, self.axes, self.step, self.min_fraction, self.multiple_of)

    def uses_cache(self) -> bool:
        return self.teacher_cache and self.loss == "logit"

    def train_config(self) -> TrainConfig:
        """The short distillation every candidate gets (the other training options: TrainConfig's defaults)."""
        return TrainConfig(
            tokens=self.retrain_tokens,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            seed=self.seed,
        )

    def throughput_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("isl", "osl", "batch", "repeats", "engine_precision")}


@dataclass
class SearchResult:
    candidates: pd.DataFrame
    """Every enumerated candidate (with its zero-shot loss when screened, and whether it was retrained)."""
    leaderboard: pd.DataFrame
    """Retrained candidates, best first, with the reference models (source, teacher) as extra rows."""
    winner: Path | None
    out: Path


def candidates_frame(candidates: list[Candidate]) -> pd.DataFrame:
    return pd.DataFrame([c.row() for c in candidates])


def plan_search(model: str | os.PathLike, cfg: SearchConfig) -> tuple[Path, list[Candidate]]:
    """Resolve the model and enumerate its candidates (cheap: no weights loaded)."""
    checkpoint = inspect_checkpoint(model)
    path, config = checkpoint.path, checkpoint.config
    if cfg.teacher is not None:
        inspect_checkpoint(cfg.teacher)
    return path, enumerate_candidates(config, cfg.space())


def select(screen: pd.DataFrame, k: int) -> list[str]:
    """K candidate names: the best zero-shot loss of each (layers, heads, groups) structure first, then the rest."""
    ordered = screen.sort_values(["zero_shot_loss", "candidate"])
    firsts = ordered.drop_duplicates(["layers", "heads", "kv_groups"])
    rest = ordered[~ordered["candidate"].isin(firsts["candidate"])]
    return pd.concat([firsts, rest])["candidate"].head(k).tolist()


def pareto_front(frame: pd.DataFrame, loss: str = "heldout_loss", speed: str = "request_throughput") -> pd.Series:
    """True for rows no other row beats on both lower loss and higher speed (NaN speed: never on the front)."""
    values = frame[[loss, speed]].to_numpy(dtype=float)
    front = []
    for i, (li, si) in enumerate(values):
        if math.isnan(si) or math.isnan(li):
            front.append(False)
            continue
        dominated = any(
            lj <= li and sj >= si and (lj < li or sj > si)
            for j, (lj, sj) in enumerate(values)
            if j != i and not (math.isnan(lj) or math.isnan(sj))
        )
        front.append(not dominated)
    return pd.Series(front, index=frame.index)


def choose_winner(board: pd.DataFrame, cfg: SearchConfig) -> str:
    """The best loss; with throughput: the fastest front candidate within loss_slack of the best loss."""
    best = board["heldout_loss"].min()
    if cfg.rank_by == "loss" or "on_front" not in board:
        return str(board.loc[board["heldout_loss"].idxmin(), "candidate"])
    near = board[board["on_front"] & (board["heldout_loss"] <= best + cfg.loss_slack)]
    return str(near.loc[near["request_throughput"].idxmax(), "candidate"])


# -- the run


def _heldout(path: Path, cfg: SearchConfig, samples: int):
    from compactlm.compress.data import load_sequences

    return load_sequences(cfg.data, load_tokenizer(path), num_sequences=samples, seq_len=cfg.seq_len, split="heldout")


def _checkpoint_stage(run, name: str, path: Path) -> str:
    """A stage that fingerprints a checkpoint's contents (what every stage that reads it depends on)."""
    from compactlm.compress.checkpoint import checkpoint_sha256

    def work(resume: bool) -> dict:
        return {"path": str(path), "sha256": checkpoint_sha256(path)}

    run.stage(name, {"path": str(path.resolve())}, [], work, lambda o: Path(o["path"]).is_dir())
    return name


def _scores(run, model, out: Path, cfg: SearchConfig, candidates: list[Candidate]):
    from compactlm.compress.importance import ImportanceConfig, ImportanceScores
    from compactlm.compress.operations import run_importance

    path = out / "scores.safetensors"
    layers = model.config.num_hidden_layers
    drops = sorted({layers - c.shape.num_layers for c in candidates} - {0})
    config = ImportanceConfig(
        batch_size=8,
        depth_samples=cfg.depth_samples,
        block_sizes=tuple(sorted({1, *drops})),
        removal_loss=bool(drops) and cfg.depth_metric != "block-influence",
    )

    def work(resume: bool) -> dict:
        run_importance(model, cfg.data, cfg.importance_samples, cfg.seq_len, config).save(path)
        return {"path": str(path)}

    settings = {"importance": asdict(config), "samples": cfg.importance_samples, "seq_len": cfg.seq_len}
    settings["data"] = cfg.data
    run.stage("importance", settings, ["source"], work, lambda o: Path(o["path"]).is_file(), "forward passes only")
    return ImportanceScores.load(path)


def _screen(run, model, scores, candidates: list[Candidate], out: Path, cfg: SearchConfig, update) -> pd.DataFrame:
    """Zero-shot held-out loss of each candidate, pruned in memory; rows appended to screen.csv as they finish
    (a killed screen resumes at the next candidate)."""
    from compactlm.compress.evaluate import perplexity
    from compactlm.compress.prune import prune

    file = out / "screen.csv"

    def work(resume: bool) -> dict:
        if not resume:
            file.unlink(missing_ok=True)
        done = pd.read_csv(file) if file.is_file() else pd.DataFrame(columns=["candidate", "zero_shot_loss"])
        todo = [c for c in candidates if c.name not in set(done["candidate"])]
        sequences = _heldout(Path(model.compactlm_path), cfg, cfg.screen_samples) if todo else None
        for i, candidate in enumerate(todo):
            student, _, _ = prune(model, scores, candidate.target)
            loss = perplexity(student, sequences).loss
            del student
            row = pd.DataFrame([{"candidate": candidate.name, "zero_shot_loss": loss}])
            row.to_csv(file, mode="a", header=not file.is_file(), index=False)
            update("screen: zero-shot loss", len(candidates) - len(todo) + i + 1, len(candidates))
        return {"path": str(file)}

    settings = {"candidates": [c.name for c in candidates], "samples": cfg.screen_samples, "seq_len": cfg.seq_len}
    settings["data"] = cfg.data
    run.stage("screen", settings, ["importance"], work, lambda o: Path(o["path"]).is_file(), "zero-shot loss")
    screened = pd.read_csv(file)
    return candidates_frame(candidates).merge(screened, on="candidate", how="left")


def _teacher_cache(run, teacher: Path, teacher_stage: str, out: Path, cfg: SearchConfig) -> Path | None:
    from compactlm.compress.retrain import cache_logits
    from compactlm.compress.train_config import CACHE_FIELDS

    if not cfg.uses_cache():
        return None
    cache = out / "teacher-cache"
    train = cfg.train_config()

    def work(resume: bool) -> dict:
        cache_logits(teacher, cache, data=cfg.data, train_cfg=train, top_k=cfg.top_k, overwrite=True)
        return {"path": str(cache)}

    settings = {k: getattr(train, k) for k in CACHE_FIELDS} | {"top_k": cfg.top_k, "data": cfg.data}
    run.stage("teacher-cache", settings, [teacher_stage], work, lambda o: Path(o["path"]).is_dir())
    return cache


def _retrain(run, model, scores, candidate: Candidate, teacher: Path, deps: list[str], cache, out: Path, cfg) -> dict:
    """Prune and distill briefly: candidates/<name>/{pruned,retrained,result.json}."""
    from compactlm.compress.operations import prune_checkpoint
    from compactlm.compress.retrain import distill_checkpoint

    folder = out / "candidates" / candidate.name
    pruned, retrained, result_file = folder / "pruned", folder / "retrained", folder / "result.json"

    def work(resume: bool) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        if not (resume and (pruned / "config.json").is_file()):
            prune_checkpoint(model, pruned, candidate.target, scores=scores, overwrite=True)
        record = distill_checkpoint(
            teacher,
            pruned,
            retrained,
            data=cfg.data,
            train_cfg=cfg.train_config(),
            distill_cfg=DistillConfig(loss=cfg.loss),
            teacher_cache=cache,
            resume=resume and work_dir_for(retrained).exists(),
            overwrite=True,
            eval_samples=cfg.eval_samples,
        )
        result = candidate.row() | {
            "heldout_loss": record["heldout_loss"],
            "perplexity": math.exp(record["heldout_loss"]),
            "final_train_loss": record["final_train_loss"],
            "retrain_tokens": record["tokens"],
            "retrain_seconds": record["seconds"],
            "pruned": str(pruned),
            "retrained": str(retrained),
        }
        write_json(result_file, result)
        return {"path": str(result_file)}

    settings = {"target": asdict(candidate.target), "train": asdict(cfg.train_config()), "loss": cfg.loss}
    settings |= {"eval_samples": cfg.eval_samples, "data": cfg.data}
    present = lambda o: Path(o["path"]).is_file() and (retrained / "config.json").is_file()  # noqa: E731
    run.stage(f"retrain/{candidate.name}", settings, deps, work, present, f"{cfg.retrain_tokens:,} tokens")
    return read_json(result_file, "candidate result")


def _throughputs(run, models: list[tuple[str, Path, Path]], cfg: SearchConfig, measure: Measure) -> list[dict]:
    """(stage, checkpoint, folder) -> one `throughput/<name>` stage each. The ones not measured yet with these
    settings are measured together, interleaved, so that a busy machine's drift hits them alike."""
    settings = cfg.throughput_settings()
    stages = [(f"throughput/{Path(folder).name}", dep, folder) for dep, _, folder in models]
    todo = [i for i, (name, dep, _) in enumerate(stages) if not run.is_done(name, settings, [dep])]
    measured = {}
    if todo:
        pairs = [(models[i][1], models[i][2] / f"engine-{cfg.engine_precision}") for i in todo]
        for i in todo:
            models[i][2].mkdir(parents=True, exist_ok=True)
        measured = dict(zip(todo, measure(pairs), strict=True))
    results = []
    for i, (name, dep, folder) in enumerate(stages):

        def work(resume: bool, i=i, folder=folder) -> dict:
            write_json(folder / "throughput.json", {"settings": settings, "result": measured[i]})
            return {"result": measured[i]}

        results.append(run.stage(name, settings, [dep], work).outputs["result"])
    return results


def _reference(name: str, path: Path, cfg: SearchConfig, role: str) -> dict:
    from compactlm.compress.arch import count_params, shape_of
    from compactlm.compress.evaluate import perplexity

    model = load_model(path)
    loss = perplexity(model, _heldout(path, cfg, cfg.eval_samples)).loss
    shape = shape_of(model.config)
    return {
        "candidate": name,
        "role": role,
        "layers": shape.num_layers,
        "hidden": shape.hidden_size,
        "ffn": shape.ffn_hidden_size,
        "heads": shape.num_attention_heads,
        "kv_groups": shape.num_query_groups,
        "params": count_params(shape),
        "heldout_loss": loss,
        "perplexity": math.exp(loss),
        "retrained": str(path),
    }


def run_search(
    model: str | os.PathLike,
    out: str | os.PathLike,
    cfg: SearchConfig,
    *,
    measure: Measure | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> SearchResult:
    """Search `model` for the best architecture within `cfg`'s budget; resumable in `out` (see the module doc)."""
    from compactlm.core.runs import Run

    if cfg.rank_by == "loss+throughput" and measure is None:
        raise CompactLMError("--rank-by loss+throughput needs a throughput measure (the CLI passes the benchmark's)")
    out = Path(out).expanduser()
    source, candidates = plan_search(model, cfg)
    teacher = inspect_checkpoint(cfg.teacher).path if cfg.teacher else source
    run = Run.claim(out, "search", source.name, overwrite=overwrite)
    write_json(
        out / "search.json", {"source": str(source.resolve()), "teacher": str(teacher.resolve()), "config": asdict(cfg)}
    )
    update = progress or (lambda stage, done, total: None)
    candidates_frame(candidates).to_csv(out / "candidates.csv", index=False)
    _checkpoint_stage(run, "source", source)
    teacher_stage = "source" if teacher == source else _checkpoint_stage(run, "teacher", teacher)

    base = load_model(source)
    scores = _scores(run, base, out, cfg, candidates)
    table = candidates_frame(candidates)
    if len(candidates) > cfg.candidates:
        table = _screen(run, base, scores, candidates, out, cfg, update)
        chosen = select(table, cfg.candidates)
    else:
        chosen = [c.name for c in candidates]
    table["retrained"] = table["candidate"].isin(chosen)
    table.to_csv(out / "candidates.csv", index=False)

    cache = _teacher_cache(run, teacher, teacher_stage, out, cfg)
    deps = ["importance", "teacher-cache" if cache else teacher_stage]
    by_name = {c.name: c for c in candidates}
    results = []
    for i, name in enumerate(chosen):
        results.append(_retrain(run, base, scores, by_name[name], teacher, deps, cache, out, cfg))
        update("search: candidates retrained", i + 1, len(chosen))
    del base

    board = pd.DataFrame(results)
    board.insert(1, "role", "candidate")
    screened = table.set_index("candidate")
    if "zero_shot_loss" in screened:
        board["zero_shot_loss"] = board["candidate"].map(screened["zero_shot_loss"])
    references = [_reference("source", source, cfg, "source")]
    if teacher != source:
        references.append(_reference("teacher", teacher, cfg, "teacher"))
    if cfg.rank_by == "loss+throughput":
        models = [("source", source, out / "source")]
        models += [
            (f"retrain/{r['candidate']}", Path(r["retrained"]), out / "candidates" / r["candidate"]) for r in results
        ]
        ref, *measured = _throughputs(run, models, cfg, measure)
        for key in ("request_throughput", "output_throughput"):
            board[key] = [m[key] for m in measured]
        for key in ("request_throughput", "output_throughput"):
            references[0][key] = ref[key]
        board["speedup_vs_source"] = board["request_throughput"] / ref["request_throughput"]
        board["on_front"] = pareto_front(board)
    board = board.sort_values(["heldout_loss", "candidate"]).reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    winner_name = choose_winner(board, cfg)
    board["winner"] = board["candidate"] == winner_name
    board = pd.concat([board, pd.DataFrame(references)], ignore_index=True)
    board.to_csv(out / "leaderboard.csv", index=False)
    board.to_parquet(out / "leaderboard.parquet", index=False)
    from compactlm.compress.search_plot import plot_search

    plot_search(board, out / "search.png", title=f"{source.name}: search at {_budget_text(cfg)}")
    winner = _publish_winner(out, by_name[winner_name], board)
    return SearchResult(candidates=table, leaderboard=board, winner=winner, out=out)


def _budget_text(cfg: SearchConfig) -> str:
    target = f"{cfg.params:.0%}" if cfg.params < 1 else f"{cfg.params / 1e6:.1f}M"
    return f"{target} +-{cfg.tolerance:.0%} params, {cfg.retrain_tokens:,} retraining tokens each"


def _publish_winner(out: Path, winner: Candidate, board: pd.DataFrame) -> Path:
    """Copy the winner's pruned checkpoint to OUT/winner (replaced only when the winner changed)."""
    dest = out / "winner"
    row = board[board["candidate"] == winner.name].iloc[0]
    info_file = out / "winner.json"
    if dest.is_dir() and info_file.is_file() and json.loads(info_file.read_text()).get("candidate") == winner.name:
        return dest
    with atomic_dir(dest, overwrite=True) as tmp:
        for item in Path(row["pruned"]).iterdir():
            shutil.copy2(item, tmp / item.name)
    write_json(
        info_file,
        {
            "candidate": winner.name,
            "checkpoint": str(dest),
            "retrained": row["retrained"],
            "heldout_loss": float(row["heldout_loss"]),
            "params": int(row["params"]),
            "note": "winner/ is the pruned checkpoint (before the short retraining): give it the full distillation",
        },
    )
    return dest
