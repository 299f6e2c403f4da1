"""The one run mechanism: a run folder whose stages are fingerprinted, recorded and resumed. The main job, chains,
the architecture search and the pruning demo all run on it.

    run = Run.claim(out, kind="chain", name="family-61m", plan={"prune/86m": 10.0, ...})
    record = run.stage("prune/86m", config, deps=[], run=lambda resume: {...outputs...}, present=...)

A stage's fingerprint hashes its name, its config and the fingerprints of the stages it reads (`deps`); when it
finishes, its record (config, deps, outputs, seconds) is written to `stages/NAME.json`. A re-run skips a stage
whose record matches and whose outputs are still `present`; a stage that was killed restarts, told `resume=True`
when the killed attempt had the same fingerprint (a training stage then continues from its last checkpoint).
Change one setting and only the stages that depend on it run again. Before each stage the run prints an ETA from
the plan's estimates, corrected by how fast the stages ran on this machine so far.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compactlm.core.console import console
from compactlm.core.errors import CompactLMError
from compactlm.core.io import read_json, write_json

MARKER = "run.json"
"""Marks a folder as a compactlm run folder (a run never writes into a folder without it, unless it is empty)."""


def fingerprint(*parts) -> str:
    """A stable short hash of JSON-able parts (configs, upstream fingerprints, file hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_run_folder(out: Path, kind: str, name: str, overwrite: bool = False) -> None:
    """The checks of claim_run_folder, with nothing written: call it before slow checks or downloads."""
    marker, legacy = out / MARKER, out / "job.json"
    if out.exists() and not out.is_dir():
        raise CompactLMError(f"{out} is a file: give --out a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file() and not legacy.is_file():
        raise CompactLMError(
            f"{out} exists and is not a compactlm run folder (no {MARKER}): choose another --out; nothing was written"
        )
    if marker.is_file():
        owner = read_json(marker, "run marker")
        if owner.get("kind") != kind:
            raise CompactLMError(
                f"{out} is the run folder of a {owner.get('kind')}, not of a {kind}: choose another --out"
            )
        if not overwrite and owner.get("name") != name:
            raise CompactLMError(
                f"{out} is the run folder of {kind} {owner.get('name')!r}, not {name!r}: choose another --out"
                + (", or --overwrite to replace it" if kind != "job" else "")
            )


def claim_run_folder(out: Path, kind: str, name: str, overwrite: bool = False) -> None:
    """Make `out` the run folder of this `kind` of run named `name`; refuse a non-empty folder that is not a run
    folder (it is someone's data) or that holds another run. `overwrite` empties a run folder of this kind."""
    marker = out / MARKER
    legacy = out / "job.json"  # the main job's marker before the run mechanism was shared
    if legacy.is_file() and not marker.is_file():
        write_json(marker, {"kind": "job", "name": read_json(legacy, "run marker").get("recipe"), "created": now()})
    check_run_folder(out, kind, name, overwrite)
    if overwrite and marker.is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_json(marker, {"kind": kind, "name": name, "created": now()})


@dataclass
class StageRecord:
    name: str
    fingerprint: str
    outputs: dict
    seconds: float
    reused: bool = False


class Run:
    """Runs named stages in order (see `stage`); knows the plan (names and estimated seconds) for the ETA."""

    def __init__(self, out: Path, plan: dict[str, float] | None = None):
        self.out = out
        self.plan = dict(plan or {})
        self.folder = out / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}
        self.estimated_done = 0.0
        self.actual_done = 0.0
        self.started = time.perf_counter()

    @classmethod
    def claim(cls, out: Path, kind: str, name: str, plan: dict[str, float] | None = None, overwrite: bool = False):
        """Claim `out` (claim_run_folder) and open a run in it."""
        out = Path(out).expanduser()
        claim_run_folder(out, kind, name, overwrite)
        return cls(out, plan)

    def _file(self, name: str, started: bool = False) -> Path:
        """The stage's record; `started`: the marker of an attempt in progress (or killed)."""
        safe = name.replace("/", "--")
        return self.folder / (f".{safe}.started" if started else f"{safe}.json")

    def previous(self, name: str, key: str) -> dict | None:
        path = self._file(name)
        if not path.is_file():
            return None
        data = read_json(path, "stage record")
        return data if data.get("fingerprint") == key else None

    def key(self, name: str, config: dict, deps: list[str]) -> str:
        """The fingerprint of stage `name` with this config, after the stages `deps` (already run or reused)."""
        return fingerprint(name, config, [self.records[d].fingerprint for d in deps])

    def is_done(self, name: str, config: dict, deps: list[str], present=lambda outputs: True) -> bool:
        """Whether `stage(name, config, deps, ...)` would reuse an earlier record (and run nothing)."""
        done = self.previous(name, self.key(name, config, deps))
        return done is not None and present(done["outputs"])

    def stage(
        self,
        name: str,
        config: dict,
        deps: list[str],
        run: Callable[[bool], dict],
        present: Callable[[dict], bool] = lambda outputs: True,
        describe: str = "",
    ) -> StageRecord:
        """Run stage `name` unless it already ran with the same config and upstream stages and its outputs are
        `present`. `run(resume)` does the work and returns its outputs (JSON-able); `resume` is True when a
        killed attempt with the same fingerprint left state behind."""
        key = self.key(name, config, deps)
        index = list(self.plan).index(name) + 1 if name in self.plan else len(self.records) + 1
        total = max(len(self.plan), index)
        done = self.previous(name, key)
        if done is not None and present(done["outputs"]):
            record = StageRecord(name, key, done["outputs"], done["seconds"], reused=True)
            self.records[name] = record
            self._account(name, None)
            console.print(f"[dim][{index}/{total}] {name}: done earlier ({done['seconds']:.0f} s), reused[/]")
            return record
        started_file = self._file(name, started=True)
        resume = started_file.is_file() and read_json(started_file, "stage marker").get("fingerprint") == key
        console.rule(f"[bold][{index}/{total}] {name}[/]" + (f": {describe}" if describe else "") + self._eta(name))
        write_json(started_file, {"fingerprint": key, "started": now()})
        begin = time.perf_counter()
        outputs = run(resume)
        seconds = time.perf_counter() - begin
        data = {
            "name": name,
            "fingerprint": key,
            "config": config,
            "deps": {d: self.records[d].fingerprint for d in deps},
            "outputs": outputs,
            "seconds": round(seconds, 1),
            "finished": now(),
        }
        write_json(self._file(name), data)
        started_file.unlink(missing_ok=True)
        record = StageRecord(name, key, outputs, seconds)
        self.records[name] = record
        self._account(name, seconds)
        return record

    def _account(self, name: str, seconds: float | None) -> None:
        estimate = self.plan.get(name, 0.0)
        if seconds is not None:
            self.estimated_done += estimate
            self.actual_done += seconds
        self.plan[name] = 0.0  # nothing left to do for it

    def _eta(self, name: str) -> str:
        remaining = sum(self.plan.values())
        if remaining <= 0:
            return ""
        # how much slower (or faster) this machine runs than the estimates, from the stages run so far
        speed = self.actual_done / self.estimated_done if self.estimated_done > 30 else 1.0
        left = remaining * speed
        this = self.plan.get(name, 0.0) * speed
        finish = (dt.datetime.now() + dt.timedelta(seconds=left)).strftime("%H:%M")
        return f" [dim](~{_span(this)}; ETA {finish}, ~{_span(left)} left)[/]"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _span(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
