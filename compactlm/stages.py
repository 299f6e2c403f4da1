"""Stages of a job: each one's inputs are fingerprinted, its record is written when it finishes, and a re-run
skips it when the fingerprint matches and its outputs are still there. A stage that was killed restarts (or,
for training, resumes from its last checkpoint: the stage is told). The job prints an ETA before each stage
from per-stage estimates, corrected by how fast the stages run on this machine so far.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompactLMError
from compress.progress import console

MARKER = "job.json"
"""Marks a folder as a compactlm run folder (a job never writes into a folder without it, unless it is empty)."""


def fingerprint(*parts) -> str:
    """A stable short hash of JSON-able parts (configs, upstream fingerprints, file hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def claim_run_folder(out: Path, recipe_name: str) -> None:
    """Make `out` this job's run folder; refuse a non-empty folder that is not one (it is someone's data)."""
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise CompactLMError(f"{out} is a file: give --out a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise CompactLMError(
            f"{out} exists and is not a compactlm run folder (no {MARKER}): choose another --out; nothing was written"
        )
    if marker.is_file():
        owner = json.loads(marker.read_text()).get("recipe")
        if owner != recipe_name:
            raise CompactLMError(
                f"{out} is the run folder of recipe {owner!r}, not {recipe_name!r}: choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"recipe": recipe_name, "created": now()})


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data) -> None:
    """Atomically (temp file then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class StageRecord:
    name: str
    fingerprint: str
    outputs: dict
    seconds: float
    reused: bool = False


class Job:
    """Runs named stages in order (see `stage`); knows the plan (names and estimated seconds) for the ETA."""

    def __init__(self, out: Path, plan: dict[str, float]):
        self.out = out
        self.plan = dict(plan)
        self.folder = out / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}
        self.estimated_done = 0.0
        self.actual_done = 0.0
        self.started = time.perf_counter()

    def _file(self, name: str, started: bool = False) -> Path:
        """The stage's record; `started`: the marker of an attempt in progress (or killed)."""
        safe = name.replace("/", "--")
        return self.folder / (f".{safe}.started" if started else f"{safe}.json")

    def previous(self, name: str, key: str) -> dict | None:
        path = self._file(name)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if data.get("fingerprint") == key else None

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
        key = fingerprint(name, config, [self.records[d].fingerprint for d in deps])
        index = list(self.plan).index(name) + 1 if name in self.plan else len(self.records) + 1
        done = self.previous(name, key)
        if done is not None and present(done["outputs"]):
            record = StageRecord(name, key, done["outputs"], done["seconds"], reused=True)
            self.records[name] = record
            self._account(name, None)
            console.print(f"[dim][{index}/{len(self.plan)}] {name}: done earlier ({done['seconds']:.0f} s), reused[/]")
            return record
        started_file = self._file(name, started=True)
        resume = started_file.is_file() and json.loads(started_file.read_text()).get("fingerprint") == key
        console.rule(
            f"[bold][{index}/{len(self.plan)}] {name}[/]" + (f": {describe}" if describe else "") + self._eta(name)
        )
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
        return f" [dim](~{_span(this)}; job ETA {finish}, ~{_span(left)} left)[/]"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _span(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
